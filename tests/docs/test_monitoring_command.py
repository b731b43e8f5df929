"""`stack monitoring` as a user runs it: files written, tokens private, secrets never printed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from stack.secrets import derive_key

ROOT = Path(__file__).resolve().parents[2]
STACK = [sys.executable, "-c", "import sys; from stack.cli import main; sys.exit(main())"]
SECRET = "test-stack-secret-0123456789abcdef"
KEY_HASH = "sha256:" + "b" * 64


def stack(cwd: Path, *args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STACK_SECRET"}
    env["PYTHONPATH"] = str(ROOT)
    if secret is not None:
        env["STACK_SECRET"] = secret
    return subprocess.run([*STACK, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def write_stack(folder: Path) -> None:
    (folder / "stack.toml").write_text(
        '[stack]\nname = "prod"\n\n'
        '[hosts.gpu-01]\naddress = "10.0.0.11"\n\n'
        '[hosts.cpu-01]\naddress = "10.0.0.21"\n\n'
        '[router]\nhosts = ["cpu-*"]\nlisten = "0.0.0.0:8080"\n\n'
        f'[[keys]]\nname = "ci"\nhash = "{KEY_HASH}"\n')


def test_monitoring_writes_config_dashboard_and_private_tokens_without_printing_them(
        tmp_path: Path) -> None:
    write_stack(tmp_path)
    result = stack(tmp_path, "monitoring", "--out", "mon", "--write-tokens")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "mon" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["modelstack-router"]["static_configs"][0]["targets"] == ["10.0.0.21:8080"]
    tokens = tmp_path / "mon" / "tokens"
    for node, address in (("gpu-01", "10.0.0.11:7070"), ("cpu-01", "10.0.0.21:7070")):
        job = jobs[f"modelstack-agent-{node}"]
        assert job["static_configs"][0]["targets"] == [address]
        token_file = Path(job["authorization"]["credentials_file"])
        assert token_file == tokens / f"{node}.token"
        token = derive_key(SECRET.encode(), f"agent:{node}")
        assert token_file.read_text() == token + "\n"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token not in result.stdout + result.stderr
    assert "sk-" not in result.stdout + result.stderr
    dashboard = (tmp_path / "mon" / "grafana-dashboard.json").read_text()
    assert dashboard == (ROOT / "templates" / "grafana-dashboard.json").read_text()
    assert "2 agent token files" in result.stdout


def test_monitoring_from_a_facts_snapshot_needs_no_hosts_and_writes_no_tokens(
        tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('[stack]\nname = "ci"\n')
    facts = {"format_version": 1, "nodes": {"gpu-07": {"address": "10.1.0.7"}}}
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    result = stack(tmp_path, "monitoring", "--facts", "facts.json", "--out", "m",
                   "--token-dir", "/etc/prometheus/ci")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "m" / "prometheus.yml").read_text())
    agent = config["scrape_configs"][1]
    assert agent["authorization"]["credentials_file"] == "/etc/prometheus/ci/gpu-07.token"
    assert not (tmp_path / "m" / "tokens").exists()
    assert "copy each host's PREFIX/etc/agent.token there" in result.stdout


def test_write_tokens_without_a_stack_secret_is_an_error_and_makes_no_secret(
        tmp_path: Path) -> None:
    write_stack(tmp_path)
    result = stack(tmp_path, "monitoring", "--write-tokens", secret=None)
    assert result.returncode == 1
    assert result.stderr.startswith("error: `--write-tokens` needs the stack secret")
    assert "\nhint: " in result.stderr
    assert not (tmp_path / ".stack").exists()
    assert not (tmp_path / "monitoring").exists()


def test_missing_facts_file_names_the_flag(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('[stack]\nname = "ci"\n')
    result = stack(tmp_path, "monitoring", "--facts", "nope.json")
    assert result.returncode == 1
    assert "`--facts nope.json` does not exist" in result.stderr
