"""Accuracy of the llama.cpp estimate against a real llama-server on this machine.

Starts `llama-server -ngl 0` (CPU) on the Gemma 3 270M Q4_K_M GGUF at each context size,
waits for `/health`, sends one short completion (so compute buffers are touched), reads
the process's memory from /proc (VmRSS, RssAnon, RssFile, VmHWM), and compares it with
`stack estimate`'s CPU claim (`ram_bytes`). Prints a Markdown table.

With `--rpc-ngl N ...`, a partial offload over RPC instead: a `ggml-rpc-server` worker and
`llama-server --rpc ... -ngl N` on this machine's CPU (N - 1 layers and the output layer on
the worker, the rest on the main's CPU), the RSS of both against the claim split by layers
(what the scheduler gives each part, `SchedulerBase.split_parts`).

    .venv/bin/python bench/estimate_accuracy.py [--ctx 2048 8192] [--repeat 3]
    .venv/bin/python bench/estimate_accuracy.py --ctx 2048 --rpc-ngl 10 19

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
from collections.abc import Callable
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


def _start(argv: list[str], bin_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(bin_dir: Path, model: Path, ctx: int) -> dict[str, int]:
    """Start llama-server on the CPU at `ctx`, wait for health, run one completion, read
    /proc."""
    return _measure_with(bin_dir, model, ctx, ("-ngl", "0"), _proc_memory)


def _measure_with(bin_dir: Path, model: Path, ctx: int, extra: tuple[str, ...],
                  read: Callable[[int], dict[str, int]]) -> dict[str, int]:
    port = _free_port()
    proc = _start([str(bin_dir / "llama-server"), "-m", str(model), "-c", str(ctx), *extra,
                   "--host", "127.0.0.1", "--port", str(port)], bin_dir)
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
        return read(proc.pid)
    finally:
        _stop(proc)


def measure_rpc(bin_dir: Path, model: Path, ctx: int, ngl: int) -> tuple[int, int]:
    """VmRSS of the main and of its one RPC worker, with `-ngl ngl`, after a completion."""
    port = _free_port()
    worker = _start([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                     "-t", "1"], bin_dir)
    try:
        time.sleep(1.0)
        rss: dict[str, int] = {}

        def worker_rss(pid: int) -> dict[str, int]:
            rss.update(_proc_memory(worker.pid))
            return _proc_memory(pid)

        main = _measure_with(bin_dir, model, ctx, ("-ngl", str(ngl), "--rpc",
                                                   f"127.0.0.1:{port}"), worker_rss)
        return main["VmRSS"], rss["VmRSS"]
    finally:
        _stop(worker)


def estimate_rpc(model: Path, ctx: int, ngl: int) -> tuple[int, int]:
    """The claim of a CPU main and one CPU RPC worker, split as `-ngl ngl` splits it: the
    worker holds ngl - 1 layers and the output head, the main the rest and the token
    embedding; each device its compute buffer and process."""
    meta = read_metadata(str(model), ROOT)
    spec = ModelSpec.model_validate({"source": str(model), "context": ctx, "distributed": True})
    claim = evaluate("bench", spec, meta).claim("llama.cpp", 0, None, 2)
    assert isinstance(claim, Claim), claim
    on_worker = min(max(ngl - 1, 0), claim.layers)
    main = (claim.layers - on_worker) * claim.layer_bytes + claim.device_bytes + claim.main_bytes
    worker = on_worker * claim.layer_bytes + claim.device_bytes + claim.output_bytes
    return main, worker


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
    parser.add_argument("--rpc-ngl", type=int, nargs="*", default=[],
                        help="measure a partial offload over one RPC worker at these -ngl")
    args = parser.parse_args()
    bin_dir = _setup("STACK_LLAMA_BIN", "setup-llama-cpp")
    model = _setup("STACK_TEST_MODEL", "setup-model")
    if args.rpc_ngl:
        return _main_rpc(bin_dir, model, args.ctx, args.rpc_ngl, args.repeat)
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


def _main_rpc(bin_dir: Path, model: Path, contexts: list[int], ngls: list[int],
              repeat: int) -> int:
    print("| context | -ngl | main estimate (MiB) | main VmRSS | error | worker estimate | "
          "worker VmRSS | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for ctx in contexts:
        for ngl in ngls:
            main, worker = estimate_rpc(model, ctx, ngl)
            runs = [measure_rpc(bin_dir, model, ctx, ngl) for _ in range(repeat)]
            got_main = statistics.median(r[0] for r in runs)
            got_worker = statistics.median(r[1] for r in runs)
            errors = ((main - got_main) / got_main, (worker - got_worker) / got_worker)
            worst = max(worst, *map(abs, errors))
            print(f"| {ctx} | {ngl} | {main / MiB:.1f} | {got_main / MiB:.1f} | "
                  f"{errors[0]:+.1%} | {worker / MiB:.1f} | {got_worker / MiB:.1f} | "
                  f"{errors[1]:+.1%} |")
    print(f"\nworst error {worst:.1%} (target: within 15%)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
