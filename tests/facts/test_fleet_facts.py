"""`stack facts` against the loopback fleet over real SSH (pyinfra @ssh, real sshd)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fleet import Fleet

ROOT = Path(__file__).resolve().parents[2]
STACK = [sys.executable, "-m", "stack.cli"]
H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"
L40S = "nvidia/query-gpu-allfields_csv_l40s_595.80_linux.csv"


def _stack(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*STACK, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def _facts(fleet: Fleet, stack_toml: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    folder = fleet.root / "repo"
    folder.mkdir(exist_ok=True)
    (folder / "stack.toml").write_text(stack_toml)
    done = _stack(["facts", "--out", "facts.json"], folder)
    snapshot = json.loads((folder / "facts.json").read_text())
    return done, snapshot


def test_facts_over_ssh_read_each_hosts_gpus_and_name_the_stopped_host() -> None:
    with Fleet(n=4, gpu_tools={"gpu-01": H100, "gpu-02": L40S}) as fleet:
        fleet.stop_host("node-02")
        done, snapshot = _facts(fleet, fleet.inventory_toml())
        assert done.returncode == 1, done.stderr
        nodes = snapshot["nodes"]
        assert snapshot["format_version"] == 1
        assert set(nodes) == {"gpu-01", "gpu-02", "node-01", "node-02"}
        gpus = {name: [(g["vendor"], g["name"], g["memory_bytes"]) for g in node["gpus"]]
                for name, node in nodes.items()}
        assert gpus == {
            "gpu-01": [("nvidia", "NVIDIA H100 80GB HBM3", 81559 * 1024**2)],
            "gpu-02": [("nvidia", "NVIDIA L40S", 46068 * 1024**2)],
            "node-01": [],
            "node-02": [],
        }
        assert nodes["gpu-01"]["gpus"][0]["driver"] == "590.48.01"
        assert nodes["gpu-01"]["address"] == fleet.hosts["gpu-01"].address
        assert all(nodes[n]["reachable"] for n in ("gpu-01", "gpu-02", "node-01"))
        assert not nodes["node-02"]["reachable"]
        assert "`node-02`" in nodes["node-02"]["error"] and "hint:" not in nodes["node-02"]["error"]
        assert "check that `node-02` is up" in nodes["node-02"]["hint"]
        assert "host `node-02`" in done.stderr and "unreachable" in done.stderr
        assert "wrote facts of 3/4 hosts" in done.stdout


def test_facts_from_a_pyinfra_inventory_file_and_the_summary_table() -> None:
    with Fleet(n=2, gpu_tools={"gpu-01": H100}) as fleet:
        folder = fleet.root / "repo"
        (folder / "inventories").mkdir(parents=True)
        (folder / "inventories" / "test.py").write_text(fleet.inventory_py())
        nodes = "".join(f'[nodes."{n}"]\nprefix = "{h.prefix}"\n' for n, h in fleet.hosts.items())
        (folder / "stack.toml").write_text(f'[stack]\ninventory = "inventories/test.py"\n{nodes}')
        done = _stack(["facts"], folder)
        assert done.returncode == 0, done.stderr
        assert "NVIDIA H100 80GB HBM3" in done.stdout
        assert "gpu-01" in done.stdout and "node-01" in done.stdout


def test_a_refused_key_is_named_with_the_host_and_a_hint() -> None:
    with Fleet(n=2) as fleet:
        other_key = fleet.root / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                       check=True)
        text = fleet.inventory_toml().replace(
            f'key = "{fleet.client_key}"\nknown_hosts = "{fleet.known_hosts}"\n\n[hosts."node-02"]',
            f'key = "{other_key}"\nknown_hosts = "{fleet.known_hosts}"\n\n[hosts."node-02"]', 1)
        done, snapshot = _facts(fleet, text)
        assert done.returncode == 1
        assert snapshot["nodes"]["node-02"]["reachable"]
        error = snapshot["nodes"]["node-01"]["error"]
        assert "`node-01`" in error and "key" in error
        assert "authorized_keys" in snapshot["nodes"]["node-01"]["hint"]
