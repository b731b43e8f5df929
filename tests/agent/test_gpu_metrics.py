"""GPU metrics of the agent: vendor tools for real, and NVML at its import seam.

`gpu_hosts/*.json` (real `stack-agent` processes, about 1 s each): the agent's PATH starts
with fake vendor tools (`tests/fleet_tools/fake-tool`) that print RECORDED real outputs
from `tests/facts/fixtures/` (see SOURCES.md there); `pynvml` is shadowed by a module that
fails to import, so the numbers can only come from the tools. Each case names the tools'
responses and the status and metrics lines the agent must serve.

`nvml/*.json` (in-process): a fake `pynvml` module in `sys.modules` serves the devices of
the case; a field listed under `errors` raises the real nvidia-ml-py error for it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import pytest
from agent_harness import ROOT, Agent, wait_for

from agent import gpu_metrics
from agent.gpu_metrics import GpuReader
from agent.metrics import render_metrics

HERE = Path(__file__).parent
FIXTURES = ROOT / "tests" / "facts" / "fixtures"
FAKE_TOOL = ROOT / "tests" / "fleet_tools" / "fake-tool"
HOST_CASES = sorted((HERE / "gpu_hosts").glob("*.json"))
NVML_CASES = sorted((HERE / "nvml").glob("*.json"))


# ---- fake vendor tools ----------------------------------------------------------------

def tool_path(root: Path, tools: dict[str, list[dict[str, Any]]]) -> str:
    """PATH of fake tools answering with recorded outputs, then only what the fake needs.

    The system folders are left out so a real vendor tool on the test machine cannot answer.
    """
    host, system = root / "host", root / "system-bin"
    system.mkdir(parents=True)
    for command in ("sh", "cat", "basename", "dirname"):
        found = shutil.which(command)
        assert found, command
        (system / command).symlink_to(found)
    (host / "bin").mkdir(parents=True)
    for tool, responses in tools.items():
        set_responses(host, tool, responses)
    return f"{host / 'bin'}:{system}"


def set_responses(host: Path, tool: str, responses: list[dict[str, Any]]) -> None:
    """Install `tool` as the fake tool, answering `responses` (replacing earlier ones)."""
    shutil.copy(FAKE_TOOL, host / "bin" / tool)
    (host / "bin" / tool).chmod(0o755)
    data = host / "tool-data" / tool
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for n, response in enumerate(responses):
        (data / f"{n:02d}.args").write_text(response["args"])
        recorded = FIXTURES / response["output"]
        assert recorded.is_file(), recorded
        (data / f"{n:02d}.out").symlink_to(recorded)  # the recorded file itself, not a copy
        if response.get("status"):
            (data / f"{n:02d}.rc").write_text(str(response["status"]))


# ---- what a case expects -------------------------------------------------------------

def check_reading(case: dict[str, Any], status: dict[str, Any], metrics: str) -> None:
    assert status["gpu_source"] == case["gpu_source"], status
    gpus = status["gpus"]
    assert len(gpus) == len(case["gpus"]), gpus
    for got, want in zip(gpus, case["gpus"], strict=True):
        assert {key: got.get(key) for key in want} == want, got
    uuids = [g["uuid"] for g in gpus if g.get("uuid")]
    assert all(isinstance(u, str) for u in uuids), uuids
    if case["gpu_error"]:
        for part in case["gpu_error"]:
            assert part in (status["gpu_error"] or ""), status["gpu_error"]
    else:
        assert status["gpu_error"] is None, status["gpu_error"]
    lines = metrics.splitlines()
    for line in case["metrics"]:
        assert line in lines, f"{line}\nnot in:\n{metrics}"
    for prefix in case["metrics_absent"]:
        assert not [ln for ln in lines if ln.startswith(prefix)], prefix


def no_nvml(root: Path) -> Path:
    """A folder whose `pynvml` cannot be imported (put first on PYTHONPATH)."""
    folder = root / "no-nvml"
    folder.mkdir()
    (folder / "pynvml.py").write_text('raise ImportError("pynvml is disabled in this test")\n')
    return folder


def tool_agent(tmp_path: Path, node: str, tools: dict[str, list[dict[str, Any]]]) -> Agent:
    env = {"PATH": tool_path(tmp_path, tools),
           "PYTHONPATH": f"{no_nvml(tmp_path)}:{ROOT}"}
    return Agent(tmp_path / "prefix", node=node, env=env)


# ---- real agent processes ------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("case_file", HOST_CASES, ids=[p.stem for p in HOST_CASES])
def test_agent_serves_gpu_metrics_from_recorded_vendor_tool_output(
        case_file: Path, tmp_path: Path) -> None:
    case = json.loads(case_file.read_text())
    agent = tool_agent(tmp_path, case["node"], case["tools"])
    try:
        agent.start()
        status = agent.status()
        metrics = agent.client.get("/metrics")
        assert metrics.status_code == 200
        check_reading(case, status, metrics.text)
        # the tools, not NVML: pynvml could not even be imported
        assert "NVML unavailable (ImportError)" in agent.output()
        # a GPU problem never stops the agent: it still serves and reconciles
        assert agent.proc is not None and agent.proc.poll() is None
        assert httpx.get(f"http://127.0.0.1:{agent.port}/healthz").json() == {"status": "ok"}
        assert agent.assign([]).status_code == 200
    finally:
        agent.cleanup()


@pytest.mark.integration
def test_gpu_metrics_return_once_the_driver_loads_without_restarting_the_agent(
        tmp_path: Path) -> None:
    no_driver = [{"args": "*", "output": "nvidia/error_nvidia-smi-has-failed_no-driver.txt",
                  "status": 9}]
    agent = tool_agent(tmp_path, "gpu-late", {"nvidia-smi": no_driver})
    try:
        agent.start()
        before = agent.status()
        assert before["gpu_source"] == "unavailable" and before["gpus"] == []
        assert "couldn't communicate with the NVIDIA driver" in before["gpu_error"]
        pid = agent.proc.pid if agent.proc else None

        set_responses(tmp_path / "host", "nvidia-smi", [
            {"args": "--query-gpu=* --format=csv",
             "output": "nvidia/query-gpu-allfields_csv_l40s_595.80_linux.csv"}])
        wait_for(lambda: agent.status()["gpu_source"] == "tools", 10, "GPU metrics from tools")
        after = agent.status()
        assert [g["name"] for g in after["gpus"]] == ["NVIDIA L40S"]
        assert after["gpu_error"] is None
        assert agent.proc is not None and agent.proc.pid == pid and agent.proc.poll() is None
    finally:
        agent.cleanup()


# ---- NVML at its import seam ---------------------------------------------------------

class _Handle:
    def __init__(self, index: int) -> None:
        self.index = index


def fake_pynvml(case: dict[str, Any]) -> ModuleType:
    """A `pynvml` serving the case's devices; errors are the real nvidia-ml-py classes."""
    import pynvml as real

    def error(name: str) -> Exception:
        exc: Exception = real.NVMLError(getattr(real, f"NVML_ERROR_{name}"))
        return exc

    devices: list[dict[str, Any]] = case["devices"]

    def text(value: str) -> str | bytes:  # bytes: nvidia-ml-py before 11.515
        return value.encode() if case.get("bytes_strings") else value

    module = ModuleType("pynvml")
    module.NVMLError = real.NVMLError  # type: ignore[attr-defined]

    def init() -> None:
        if case.get("init_error"):
            raise error(case["init_error"])

    def count() -> int:
        if case.get("count_error"):
            raise error(case["count_error"])
        return len(devices)

    def handle(index: int) -> _Handle:
        if "nvmlDeviceGetHandleByIndex" in devices[index].get("errors", {}):
            raise error(devices[index]["errors"]["nvmlDeviceGetHandleByIndex"])
        return _Handle(index)

    def device_call(name: str, read: Any) -> Any:
        def call(h: Any, *args: Any) -> Any:
            if not isinstance(h, _Handle):
                raise error("INVALID_ARGUMENT")
            device = devices[h.index]
            if name in device.get("errors", {}):
                raise error(device["errors"][name])
            return read(device, *args)
        return call

    def temperature(device: dict[str, Any], sensor: int) -> int:
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise error("INVALID_ARGUMENT")
        return int(device["temperature"])

    functions: dict[str, Any] = {
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": count,
        "nvmlDeviceGetHandleByIndex": handle,
        "nvmlDeviceGetUUID": device_call("nvmlDeviceGetUUID", lambda d: text(d["uuid"])),
        "nvmlDeviceGetName": device_call("nvmlDeviceGetName", lambda d: text(d["name"])),
        "nvmlDeviceGetMemoryInfo": device_call(
            "nvmlDeviceGetMemoryInfo", lambda d: SimpleNamespace(**d["memory"])),
        "nvmlDeviceGetUtilizationRates": device_call(
            "nvmlDeviceGetUtilizationRates",
            lambda d: SimpleNamespace(gpu=d["utilization"], memory=0)),
        "nvmlDeviceGetTemperature": device_call("nvmlDeviceGetTemperature", temperature),
        "nvmlDeviceGetPowerUsage": device_call("nvmlDeviceGetPowerUsage",
                                               lambda d: d["power_mw"]),
    }
    for name, function in functions.items():
        setattr(module, name, function)
    return module


@pytest.mark.parametrize("case_file", NVML_CASES, ids=[p.stem for p in NVML_CASES])
def test_gpu_reader_through_nvml_reads_each_field_on_its_own(
        case_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = json.loads(case_file.read_text())
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(case))
    monkeypatch.setenv("PATH", tool_path(tmp_path, case.get("tools", {})))
    reading = GpuReader().read()
    status = {"gpu_source": reading.source, "gpus": reading.gpus, "gpu_error": reading.error}
    check_reading(case, status, render_metrics({"node": "n1", "instances": []},
                                               reading.source, reading.gpus))


def test_nvml_that_did_not_load_is_tried_again_after_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = json.loads((HERE / "nvml" / "two_gpus_power_not_supported.json").read_text())
    case["init_error"] = "DRIVER_NOT_LOADED"  # the driver is loaded after the agent started
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(case))
    monkeypatch.setenv("PATH", tool_path(tmp_path, {}))
    monkeypatch.setattr(gpu_metrics, "CACHE_SECONDS", 0.0)
    clock = [1000.0]
    reader = GpuReader(clock=lambda: clock[0])
    assert reader.read().source == "unavailable"
    case["init_error"] = None
    clock[0] += gpu_metrics.NVML_RETRY_SECONDS - 1
    assert reader.read().source == "unavailable"  # not before the retry time
    clock[0] += 1
    reading = reader.read()
    assert reading.source == "nvml" and len(reading.gpus) == 2 and reading.error is None
