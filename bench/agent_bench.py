"""Agent footprint and healing speed, measured on real processes.

    .venv/bin/python bench/agent_bench.py [--idle-seconds 30] [--kills 5]
        [--failed-seconds 10] [--failed-runs 3] [--failed-only] [--agent-src DIR]
        [--engine-seconds 60] [--engine-runs 3] [--engine-only]

Starts a real `stack-agent` with two llama.cpp instances of Gemma 3 270M, then reports:
- the idle agent's RSS (from /proc/PID/status, the agent process only) and CPU over
  `--idle-seconds` (from /proc/PID/stat), beside a bare Python interpreter's RSS;
- for `--kills` SIGKILLs of a backend: the time until the agent has started the
  replacement (its new pid is recorded), and separately the backend's own load time
  (until /health answers 200), beside the load time of llama-server started by hand.
Then (alone with `--failed-only`, which needs no llama.cpp build) two more agents side
by side over the same `--failed-seconds` window, `--failed-runs` times: one with an
instance that failed (its runtime binary is missing), one with no instances, the
baseline. `--agent-src` runs these two from another source tree (an older commit's
`git archive`), to show the busy loop the failed instance caused before.
Then (alone with `--engine-only`) engine scraping (issue 16): two agents side by side,
each with one llama.cpp instance of Gemma, one reading the engine's metrics and one with
`engine_metrics = false` (the baseline), both scraped on `/metrics` by a loop like
Prometheus every 5 s, then every 15 s, over `--engine-seconds`, `--engine-runs` times:
each agent's CPU and RSS, medians.
Targets (issue 3): RSS <= 80 MB, CPU < 1% of a core, replacement started within 1 s;
a failed instance keeps the idle agent under 1% of a core; (issue 16) with engine
scraping on, the idle agent stays under 1% of a core and 80 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "agent")]

from agent_harness import AGENT, Agent, free_port, make_runtime  # noqa: E402


def _setup(script: str, env_name: str) -> Path:
    value = os.environ.get(env_name)
    if not value:
        out = subprocess.run([str(ROOT / "scripts" / script)], check=True, capture_output=True,
                             text=True, env={**os.environ, "PYTHON": sys.executable})
        value = out.stdout.strip().splitlines()[-1]
    return Path(value)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health_ok(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait(check, timeout: float, step: float = 0.005) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    raise TimeoutError("timed out")


def recorded_pid(agent: Agent, iid: str) -> int | None:
    try:
        return int(json.loads((agent.prefix / "state" / "instances" / f"{iid}.json")
                              .read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def direct_load_time(runtime: Path, model: Path) -> float:
    port = free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(runtime / "bin")}
    proc = subprocess.Popen([str(runtime / "bin" / "llama-server"), "-m", str(model), "--port",
                             str(port), "-c", "512", "-t", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return wait(lambda: health_ok(port), 60, 0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_percent(pids: list[int], seconds: float) -> list[float]:
    """CPU of each process over the same window, in percent of one core."""
    before, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
    time.sleep(seconds)
    spent, wall = [cpu_seconds(p) for p in pids], time.monotonic() - t0
    return [100 * (s - b) / wall for b, s in zip(before, spent, strict=True)]


def failed_beside_empty(seconds: float, src: Path) -> tuple[float, float]:
    """Idle CPU of an agent with one failed instance and of one with none, same window."""
    with tempfile.TemporaryDirectory() as tmp:
        # -P: the agent package comes from `src` (PYTHONPATH), not from the current folder
        env, cmd = {"PYTHONPATH": str(src)}, [sys.executable, "-P", *AGENT[1:]]
        failed, empty = (Agent(Path(tmp) / name, env=env, command=cmd)
                         for name in ("failed", "empty"))
        model = Path(tmp) / "model.gguf"
        model.write_bytes(b"GGUF")
        try:
            failed.start()
            empty.start()
            failed.assign([{"id": "broken-0", "model": "broken", "source": str(model),
                            "backend": "llama.cpp", "port": free_port(),
                            "runtime_path": str(Path(tmp) / "runtimes" / "missing")}])
            failed.wait_state("broken-0", "failed", 30)
            time.sleep(1)  # past the start-up work of both
            assert failed.proc is not None and empty.proc is not None
            with_failed, baseline = cpu_percent([failed.proc.pid, empty.proc.pid], seconds)
        finally:
            failed.cleanup()
            empty.cleanup()
    return with_failed, baseline


def report_failed(seconds: float, runs: int, src: Path) -> bool:
    """Print the failed-instance CPU beside the baseline; True when under 1% of a core."""
    pairs = [failed_beside_empty(seconds, src) for _ in range(runs)]
    failed, empty = [p[0] for p in pairs], [p[1] for p in pairs]
    print(f"idle agent CPU over {seconds:g} s, median of {runs} runs (agents from {src}):")
    print(f"  one failed instance (runtime binary missing): {statistics.median(failed):.2f}% "
          f"of a core; no instances (baseline): {statistics.median(empty):.2f}%")
    print("  runs, failed | baseline (%):", " ".join(f"{x:.2f}" for x in failed), "|",
          " ".join(f"{x:.2f}" for x in empty))
    return statistics.median(failed) < 1


def _scrape_loop(agents: list[Agent], interval: float, stop: threading.Event) -> None:
    """GET /metrics of every agent each `interval` seconds, as Prometheus would."""
    while not stop.is_set():
        for agent in agents:
            response = agent.client.get("/metrics")
            response.raise_for_status()
        stop.wait(interval)


def engine_beside_baseline(seconds: float, interval: float, llama_bin: Path,
                           model: Path) -> tuple[float, float, float, float]:
    """CPU (% of a core) and RSS (MB) of an agent reading its instance's engine metrics and
    of one that does not, both scraped every `interval` s over the same window."""
    with tempfile.TemporaryDirectory() as tmp:
        on, off = (Agent(Path(tmp) / name, tuning=f"engine_metrics = {flag}\n")
                   for name, flag in (("on", "true"), ("off", "false")))
        stop = threading.Event()
        try:
            for agent in (on, off):
                runtime = make_runtime(agent.prefix, llama_bin)
                agent.start()
                agent.assign([{"id": "gemma-0", "model": "gemma", "source": str(model),
                               "backend": "llama.cpp", "runtime_path": str(runtime),
                               "port": free_port(), "api_key": "sk-bench", "context": 512,
                               "args": ["-t", "1"]}])
            for agent in (on, off):
                agent.wait_state("gemma-0", "ready", 120)
            assert "modelstack_engine_up{" in on.client.get("/metrics").text
            assert "modelstack_engine_up{" not in off.client.get("/metrics").text
            time.sleep(2)  # past the start-up work of both
            loop = threading.Thread(target=_scrape_loop, args=([on, off], interval, stop))
            loop.start()
            assert on.proc is not None and off.proc is not None
            cpu_on, cpu_off = cpu_percent([on.proc.pid, off.proc.pid], seconds)
            rss_on, rss_off = rss_mb(on.proc.pid), rss_mb(off.proc.pid)
        finally:
            stop.set()
            for agent in (on, off):
                agent.cleanup()
    return cpu_on, cpu_off, rss_on, rss_off


def report_engine(seconds: float, runs: int, llama_bin: Path, model: Path) -> bool:
    """Print scraping on beside off per scrape interval; True when under the targets."""
    ok = True
    print(f"agent with one Gemma instance, /metrics scraped every 5 s and 15 s, {seconds:g} s "
          f"windows, medians of {runs} runs (engine scraping on | off, the baseline):")
    for interval in (5.0, 15.0):
        rows = [engine_beside_baseline(seconds, interval, llama_bin, model) for _ in range(runs)]
        cpu_on, cpu_off, rss_on, rss_off = (statistics.median(col) for col in zip(*rows,
                                                                                    strict=True))
        print(f"  every {interval:g} s: CPU {cpu_on:.2f}% | {cpu_off:.2f}% of a core, "
              f"RSS {rss_on:.1f} | {rss_off:.1f} MB")
        print("    runs, CPU on | off (%):", " ".join(f"{r[0]:.2f}" for r in rows), "|",
              " ".join(f"{r[1]:.2f}" for r in rows))
        ok = ok and cpu_on < 1 and rss_on < 80
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--failed-seconds", type=float, default=10)
    parser.add_argument("--failed-runs", type=int, default=3)
    parser.add_argument("--failed-only", action="store_true",
                        help="only the failed-instance CPU beside the baseline")
    parser.add_argument("--agent-src", type=Path, default=ROOT,
                        help="source tree the failed-instance agents run from")
    parser.add_argument("--engine-seconds", type=float, default=60)
    parser.add_argument("--engine-runs", type=int, default=3)
    parser.add_argument("--engine-only", action="store_true",
                        help="only the engine scraping cost beside the baseline")
    args = parser.parse_args()
    if args.failed_only:
        ok = report_failed(args.failed_seconds, args.failed_runs, args.agent_src)
        print("targets met" if ok else "TARGETS MISSED")
        return 0 if ok else 1
    llama_bin = _setup("setup-llama-cpp", "STACK_LLAMA_BIN")
    model = _setup("setup-model", "STACK_TEST_MODEL")
    if args.engine_only:
        ok = report_engine(args.engine_seconds, args.engine_runs, llama_bin, model)
        print("targets met" if ok else "TARGETS MISSED")
        return 0 if ok else 1
    with tempfile.TemporaryDirectory() as tmp:
        # a crash within `stable_after_seconds` of the last one backs off (1 s, 2 s, ...);
        # a short window lets each kill here count as the first crash after healthy running
        agent = Agent(Path(tmp) / "prefix", tuning="stable_after_seconds = 1\n")
        runtime = make_runtime(agent.prefix, llama_bin)
        try:
            agent.start()
            ports = [free_port(), free_port()]
            agent.assign([{"id": f"gemma-{i}", "model": "gemma", "source": str(model),
                           "backend": "llama.cpp", "runtime_path": str(runtime), "port": p,
                           "context": 512, "args": ["-t", "1"]} for i, p in enumerate(ports)])
            for i in range(2):
                agent.wait_state(f"gemma-{i}", "ready", 120)
            assert agent.proc is not None
            pid = agent.proc.pid
            time.sleep(3)
            bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
            time.sleep(1)
            bare_rss = rss_mb(bare.pid)
            bare.kill()
            bare.wait()
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.idle_seconds)
            cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            rss = rss_mb(pid)

            notice, loads = [], []
            for _ in range(args.kills):
                old = recorded_pid(agent, "gemma-0")
                assert old is not None
                os.kill(old, signal.SIGKILL)
                killed = time.monotonic()
                wait(lambda old=old: recorded_pid(agent, "gemma-0") not in (None, old), 10)
                notice.append(time.monotonic() - killed)
                started = time.monotonic()
                wait(lambda: health_ok(ports[0]), 60, 0.01)
                loads.append(time.monotonic() - started)
                agent.wait_state("gemma-0", "ready", 30)
                time.sleep(1.5)  # healthy for longer than stable_after_seconds
            direct = [direct_load_time(runtime, model) for _ in range(3)]
        finally:
            agent.cleanup()
    cpu_count = os.cpu_count()
    print(f"machine: {platform.machine()}, {cpu_count} cores, Python {platform.python_version()}")
    print(f"idle agent (2 instances ready): RSS {rss:.1f} MB (bare python {bare_rss:.1f} MB), "
          f"CPU {cpu_pct:.2f}% of a core over {args.idle_seconds:g} s")
    print(f"kill -9 -> replacement started: median {statistics.median(notice) * 1000:.0f} ms, "
          f"max {max(notice) * 1000:.0f} ms over {len(notice)} kills")
    print(f"backend load after restart: median {statistics.median(loads):.2f} s; "
          f"llama-server started by hand: median {statistics.median(direct):.2f} s")
    ok = rss <= 80 and cpu_pct < 1 and max(notice) < 1.0
    print("replacement started (ms):", " ".join(f"{n * 1000:.0f}" for n in notice))
    print("load after restart (s):", " ".join(f"{x:.2f}" for x in loads),
          "| by hand (s):", " ".join(f"{x:.2f}" for x in direct))
    ok = report_failed(args.failed_seconds, args.failed_runs, args.agent_src) and ok
    ok = report_engine(args.engine_seconds, args.engine_runs, llama_bin, model) and ok
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
