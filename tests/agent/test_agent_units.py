"""Small pure behaviours of the agent: backoff, log rotation, metrics text, config."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import load_config, read_token
from agent.errors import AgentError
from agent.logs import rotate_if_large, tail
from agent.metrics import render_metrics
from agent.procs import write_private
from agent.runner import backoff_delay


def test_backoff_restarts_at_once_then_doubles_from_one_second_to_five_minutes() -> None:
    assert [backoff_delay(n) for n in range(1, 8)] == [0, 1, 2, 4, 8, 16, 32]
    assert backoff_delay(20) == 300


def test_log_rotation_keeps_n_files_and_tail_reads_the_end(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    for round_ in range(4):
        log.write_text("".join(f"round {round_} line {i}\n" for i in range(200)))
        assert rotate_if_large(log, max_bytes=1024, keep=2)
    assert log.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.log", "x.log.1", "x.log.2"]
    assert tail(tmp_path / "x.log.1", 2) == ["round 3 line 198", "round 3 line 199"]
    assert tail(tmp_path / "x.log.2", 1) == ["round 2 line 199"]
    assert not rotate_if_large(log, max_bytes=1024, keep=2)


def test_metrics_one_hot_state_gpu_gauges_and_escaped_labels() -> None:
    status = {"node": "n1", "instances": [
        {"id": "a-0", "model": 'we"ird', "state": "downloading", "restarts": 2,
         "progress": {"fraction": 0.25, "bytes_done": 100, "bytes_total": 400}}]}
    gpus = [{"index": 0, "uuid": "GPU-1", "vendor": "nvidia", "name": "H100",
             "utilization_percent": 37.0, "memory_bytes": 85520809984,
             "memory_used_bytes": 1024, "temperature_c": 41.0, "power_w": None}]
    text = render_metrics(status, "nvml", gpus)
    labels = 'node="n1",instance="a-0",model="we\\"ird"'
    assert f'modelstack_instance_state{{{labels},state="downloading"}} 1' in text
    assert f'modelstack_instance_state{{{labels},state="ready"}} 0' in text
    assert f"modelstack_instance_restarts_total{{{labels}}} 2" in text
    assert f"modelstack_instance_download_progress{{{labels}}} 0.25" in text
    gpu = 'node="n1",gpu="0",uuid="GPU-1",vendor="nvidia",name="H100"'
    assert f"modelstack_gpu_utilization_percent{{{gpu}}} 37" in text
    assert f"modelstack_gpu_memory_total_bytes{{{gpu}}} 85520809984" in text
    assert "modelstack_gpu_power_watts{" not in text  # unknown fields are left out


def test_config_errors_name_the_key_and_token_mode(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('node = "n"\nlisten = "nohost"\ntoken_file = "/t"\nprefix = "/p"\n')
    with pytest.raises(AgentError, match="`listen` must be HOST:PORT"):
        load_config(cfg_file)
    cfg_file.write_text('node = "n"\ntoken_file = "/t"\nprefix = "/p"\nport = 1\n')
    with pytest.raises(AgentError, match="`port` in"):
        load_config(cfg_file)
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o640)
    cfg_file.write_text(f'node = "n"\ntoken_file = "{token}"\nprefix = "{tmp_path}"\n')
    cfg = load_config(cfg_file)
    assert cfg.state_dir == tmp_path / "state" and cfg.logs_dir == tmp_path / "logs"
    with pytest.raises(AgentError) as err:
        read_token(cfg)
    assert "has mode 0640" in err.value.message and "chmod 600" in err.value.hint
    token.chmod(0o600)
    assert read_token(cfg) == "secret"


def test_private_files_are_0600_even_over_a_temp_file_left_readable(tmp_path: Path) -> None:
    target = tmp_path / "assignment.json"
    stale = tmp_path / f".assignment.json.{os.getpid()}.tmp"
    stale.write_text("old")
    stale.chmod(0o644)
    write_private(target, "{}")
    assert target.read_text() == "{}" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not stale.exists()


def test_the_nodes_env_is_the_agents_own_until_an_assignment_drops_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.reconcile import set_node_env

    monkeypatch.setenv("HTTPS_PROXY", "http://before:1")
    monkeypatch.delenv("STACK_T_TOKEN", raising=False)
    kept = set_node_env({"HTTPS_PROXY": "http://proxy:3128", "STACK_T_TOKEN": "t1"}, {})
    assert (os.environ["HTTPS_PROXY"], os.environ["STACK_T_TOKEN"]) == ("http://proxy:3128", "t1")
    kept = set_node_env({"STACK_T_TOKEN": "t2"}, kept)
    assert (os.environ["HTTPS_PROXY"], os.environ["STACK_T_TOKEN"]) == ("http://before:1", "t2")
    set_node_env({}, kept)
    assert "STACK_T_TOKEN" not in os.environ and os.environ["HTTPS_PROXY"] == "http://before:1"
