"""The loopback fleet harness: real sshd hosts that pyinfra's @ssh connector reaches."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fleet import Fleet
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.facts import get_facts
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.facts.server import Command

H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"
NO_DRIVER = "nvidia/error_nvidia-smi-has-failed_no-driver.txt"


def _pyinfra_state(fleet: Fleet) -> State:
    hosts = [(name, fleet.pyinfra_host_data(name)) for name in fleet.hosts]
    state = State(Inventory((hosts, {})), Config(CONNECT_TIMEOUT=5))  # type: ignore[no-untyped-call]
    connect_all(state)
    return state


def _run(state: State, command: str) -> dict[str, Any]:
    results = get_facts(state, Command, kwargs={"command": command})  # type: ignore[no-untyped-call]
    return {host.name: value for host, value in results.items()}


def test_pyinfra_reaches_every_host_and_each_sees_its_own_identity_and_tools() -> None:
    with Fleet(n=3, gpu_tools={"gpu-01": H100, "gpu-02": NO_DRIVER}) as fleet:
        state = _pyinfra_state(fleet)
        assert {h.name for h in state.activated_hosts} == {"gpu-01", "gpu-02", "node-01"}
        names = _run(state, "echo $STACK_TEST_HOST")
        assert names == {"gpu-01": "gpu-01", "gpu-02": "gpu-02", "node-01": "node-01"}
        tools = _run(state, "nvidia-smi --query-gpu=name --format=csv 2>&1 | head -c 60;"
                            " echo; command -v nvidia-smi || echo none")
        assert tools["gpu-01"].startswith("timestamp, driver_version")
        assert tools["gpu-01"].endswith(f"{fleet.hosts['gpu-01'].bin}/nvidia-smi")
        assert tools["gpu-02"].startswith("NVIDIA-SMI has failed")
        assert tools["node-01"].endswith("none")
        pci = _run(state, 'cat "$STACK_SYSFS_ROOT"/bus/pci/devices/*/vendor 2>/dev/null; true')
        assert pci == {"gpu-01": "0x10de", "gpu-02": "0x10de", "node-01": None}


def test_stopped_host_refuses_connections_and_its_processes_die_until_started_again() -> None:
    with Fleet(n=2) as fleet:
        started = fleet.ssh("node-01", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!")
        daemon_pid = int(started.stdout.strip())
        fleet.stop_host("node-01")
        assert not fleet.is_running("node-01")
        assert fleet.ssh("node-01", "true").returncode == 255
        assert fleet.ssh("node-02", "echo up").stdout == "up\n"
        # the daemon started over SSH is gone (or a zombie waiting for init to reap it)
        path = Path(f"/proc/{daemon_pid}/stat")
        assert not path.exists() or path.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        fleet.start_host("node-01")
        assert fleet.ssh("node-01", "echo back").stdout == "back\n"


def test_inventory_toml_names_every_host_with_its_address_port_key_and_prefix() -> None:
    with Fleet(n=2, names=["a-1", "b-1"]) as fleet:
        data = tomllib.loads(fleet.inventory_toml())
        assert set(data["hosts"]) == {"a-1", "b-1"}
        for name, host in fleet.hosts.items():
            table = data["hosts"][name]
            assert (table["address"], table["port"]) == (host.address, host.port)
            assert table["key"] == str(fleet.client_key)
            assert data["nodes"][name]["prefix"] == str(host.prefix)
