"""Accuracy of the llama.cpp estimate against a real llama-server on this machine.

Starts `llama-server -ngl 0` (CPU) on the Gemma 3 270M Q4_K_M GGUF at each context size,
waits for `/health`, sends one short completion (so compute buffers are touched), reads
the process's memory from /proc (VmRSS, RssAnon, RssFile, VmHWM), and compares it with
`stack estimate`'s CPU claim (`ram_bytes`). Prints a Markdown table.

    .venv/bin/python bench/estimate_accuracy.py [--ctx 2048 8192] [--repeat 3]

Binaries and model come from STACK_LLAMA_BIN / STACK_TEST_MODEL, else from
scripts/setup-llama-cpp and scripts/setup-model (cached per machine).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stack.estimate import evaluate, read_metadata  # noqa: E402
from stack.estimate.types import Claim  # noqa: E402
from stack.spec import ModelSpec  # noqa: E402

MiB = 1024 * 1024


def _setup(env_name: str, script: str) -> Path:
    value = os.environ.get(env_name)
    if not value:
        out = subprocess.run([str(ROOT / "scripts" / script)], check=True, text=True,
                             capture_output=True)
        value = out.stdout.strip().splitlines()[-1]
    return Path(value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_memory(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(bin_dir: Path, model: Path, ctx: int) -> dict[str, int]:
    """Start llama-server at `ctx`, wait for health, run one completion, read /proc."""
    port = _free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    cmd = [str(bin_dir / "llama-server"), "-m", str(model), "-c", str(ctx), "-ngl", "0",
           "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            time.sleep(0.3)
        else:
            raise RuntimeError("llama-server did not become healthy in 120 s")
        httpx.post(f"{url}/completion", json={"prompt": "The capital of France is",
                                              "n_predict": 16}, timeout=120)
        time.sleep(0.5)
        return _proc_memory(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def estimate(model: Path, ctx: int) -> Claim:
    """The CPU claim of `stack estimate` for this model and context."""
    meta = read_metadata(str(model), ROOT)
    spec = ModelSpec.model_validate({"source": str(model), "context": ctx})
    claim = evaluate("bench", spec, meta).claim("llama.cpp", 0, None)
    assert isinstance(claim, Claim), claim
    return claim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bin_dir = _setup("STACK_LLAMA_BIN", "setup-llama-cpp")
    model = _setup("STACK_TEST_MODEL", "setup-model")
    print("| context | estimate (MiB) | measured VmRSS median (MiB) | RssAnon | RssFile | "
          "VmHWM | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for ctx in args.ctx:
        claim = estimate(model, ctx)
        runs = [measure(bin_dir, model, ctx) for _ in range(args.repeat)]
        rss = statistics.median(r["VmRSS"] for r in runs)
        anon = statistics.median(r["RssAnon"] for r in runs)
        file_ = statistics.median(r["RssFile"] for r in runs)
        hwm = statistics.median(r["VmHWM"] for r in runs)
        error = (claim.ram_bytes - rss) / rss
        worst = max(worst, abs(error))
        print(f"| {ctx} | {claim.ram_bytes / MiB:.1f} | {rss / MiB:.1f} | {anon / MiB:.1f} | "
              f"{file_ / MiB:.1f} | {hwm / MiB:.1f} | {error:+.1%} |")
        print(f"<!-- {ctx}: {claim.detail} -->")
    print(f"\nworst error {worst:.1%} (target: within 15%)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
