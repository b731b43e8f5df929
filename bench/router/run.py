"""Router benchmark: direct, nginx proxy_pass, LiteLLM's proxy and ours, side by side.

    .venv/bin/python bench/router/run.py [--seconds 10] [--skip-litellm] [--baseline REV]

Servers (canned upstream, nginx, LiteLLM, stack-router with one worker) are pinned to
core 0, the load generator (`wrk`, and a small asyncio client for TTFT and paced latency)
to core 1. LiteLLM is installed with pip into a separate venv (`$LITELLM_VENV`, default
/tmp/modelstack-bench-litellm), never into the project's. Prints a Markdown report.
Needs the Debian packages `wrk` and `nginx`.

Two more sections in the same run: the upstream client alone (clients.py: aiohttp,
httpx, our raw pool; client on core 1, canned upstream on core 0, 32 concurrent
requests, rounds interleaved), and 1 vs 2 router workers with everything (upstream,
router, wrk) allowed on both cores, with the router's CPU time per request.

With `--baseline REV`, the router as of git revision REV (checked out in a worktree,
`--baseline-dir`) runs in the same run against the same upstream, rounds alternating
with the current code, and the report gives both medians and their ratio;
`--baseline-only` runs just that comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PY = sys.executable
SERVER_CPU, LOAD_CPU = "0", "1"
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
STREAM_CHUNKS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {seconds} s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, cpus: str = SERVER_CPU,
              **kw: object) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        proc = subprocess.Popen(["taskset", "-c", cpus, *argv], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def stop_one(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        self.procs.remove(proc)

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wrk(url: str, lua: Path, conns: int, seconds: int, cpus: str = LOAD_CPU) -> dict[str, float]:
    argv = ["taskset", "-c", cpus, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
            "-s", str(lua), url]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    except subprocess.TimeoutExpired:
        # one stuck measurement must not lose the run: reported as 0 req/s, and said here
        print(f"warning: `{' '.join(argv[3:])}` did not end within {seconds + 60} s",
              file=sys.stderr)
        out = ""

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": ms("50%"), "p99": ms("99%"),
            "errors": float(errors.group(1)) if errors else 0.0}


def lua(path: Path, body: bytes, key: str = "sk-bench") -> Path:
    path.write_text('wrk.method = "POST"\nwrk.body = ' + json.dumps(body.decode()) +
                    '\nwrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    return path


def clients(port: int, secs: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    """The upstream client alone against the canned upstream; rounds interleaved."""
    results: dict[str, list[dict[str, float]]] = {"raw": [], "aiohttp": [], "httpx": []}
    for _ in range(rounds):
        for name in results:
            out = subprocess.run(
                ["taskset", "-c", LOAD_CPU, PY, str(HERE / "clients.py"), "--client", name,
                 "--port", str(port), "--conns", "32", "--seconds", str(secs)],
                capture_output=True, text=True, timeout=secs + 120, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children (the router's workers)."""
    pids = [pid] + [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def baseline_tree(rev: str, where: Path) -> Path:
    """A worktree of this repository at `rev` (made once, reused while it is at `rev`)."""
    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", f"{rev}^{{commit}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if where.exists():
        have = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        if have != want:
            raise SystemExit(f"error: `--baseline-dir` {where} holds {have[:12] or 'no checkout'}"
                             f", not {rev}\nhint: remove it (`git worktree remove {where}`) or "
                             "pass another `--baseline-dir`.")
        return where
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), want],
                   check=True, capture_output=True)
    return where


def compare(procs: Procs, tmp: Path, upstream: str, tree: Path, secs: int,
            rounds: int) -> dict[str, list[dict[str, float]]]:
    """The router of `tree` ("before") and of this checkout ("after"), one worker each on
    the servers' core, in alternating order (before, after, after, before, ...), so a
    change in the machine's load hits both alike."""
    chat, stream = lua(tmp / "cmp-chat.lua", CHAT), lua(
        tmp / "cmp-stream.lua", b'{"model":"m","stream":true,"messages":[]}')
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for name in order:
            port = free_port()
            conf = router_config(tmp / f"cmp-{name}.json", port, upstream, 1)
            # `python -m` from the tree's root imports that tree's `router` package
            router = procs.start([PY, "-m", "router.main", "--config", str(conf)],
                                 tmp / f"cmp-{name}.log",
                                 cwd=str(tree if name == "before" else ROOT))
            wait_port(port, 15)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, chat, 32, 2)
            cpu0 = cpu_seconds(router.pid)
            row = wrk(url, chat, 32, secs)
            row["us_per_req"] = (cpu_seconds(router.pid) - cpu0) / max(1.0, row["rps"] * secs) * 1e6
            row["chunks"] = wrk(url, stream, 8, secs)["rps"] * STREAM_CHUNKS
            procs.stop_one(router)
            results[name].append(row)
    return results


def router_config(path: Path, port: int, upstream: str, workers: int) -> Path:
    path.write_text(json.dumps({
        "listen": f"127.0.0.1:{port}", "workers": workers,
        "models": [{"name": "m", "replicas": [{"id": "canned", "url": f"http://{upstream}"}]}],
        "keys": [{"name": "bench", "hash": "sha256:" + hashlib.sha256(b"sk-bench").hexdigest()},
                 {"name": "limited", "rpm": 10**9, "tpm": 10**12,
                  "hash": "sha256:" + hashlib.sha256(b"sk-limited").hexdigest()}],
    }))
    return path


def scaling(procs: Procs, tmp: Path, secs: int, rounds: int) -> list[dict[str, float | str]]:
    """1 vs 2 workers, everything on both cores; req/s and router CPU per request.

    The four setups run `rounds` times, interleaved; one row per setup and round."""
    both = f"{SERVER_CPU},{LOAD_CPU}"
    up_port = free_port()
    upstream = procs.start([PY, str(HERE / "canned_upstream.py"), "--port", str(up_port)],
                           tmp / "canned-both.log", cpus=both)
    wait_port(up_port, 15)
    chat = lua(tmp / "chat-bench.lua", CHAT)
    limited = lua(tmp / "chat-limited.lua", CHAT, "sk-limited")
    rows: list[dict[str, float | str]] = []
    setups = ((1, chat, "1 worker"), (2, chat, "2 workers"),
              (1, limited, "1 worker, key with rpm+tpm"),
              (2, limited, "2 workers, key with rpm+tpm (shared table)"))
    for workers, script, label in [s for _ in range(rounds) for s in setups]:
        port = free_port()
        conf = router_config(tmp / f"router-{workers}.json", port, f"127.0.0.1:{up_port}",
                             workers)
        router = procs.start([str(ROOT / ".venv" / "bin" / "stack-router"), "--config",
                              str(conf)], tmp / f"router-{workers}.log", cpus=both)
        wait_port(port, 15)
        time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(url, script, 32, 2, cpus=both)
        cpu0, t0 = cpu_seconds(router.pid), time.monotonic()
        row = wrk(url, script, 32, secs, cpus=both)
        cpu = cpu_seconds(router.pid) - cpu0
        took = time.monotonic() - t0
        procs.stop_one(router)
        rows.append({"label": label, "rps": row["rps"], "p50": row["p50"], "p99": row["p99"],
                     "errors": row["errors"], "cores": cpu / took,
                     "us_per_req": cpu / max(1.0, row["rps"] * secs) * 1e6})
    procs.stop_one(upstream)
    return rows


async def one(port: int, path: str, body: bytes, reader: asyncio.StreamReader,
              writer: asyncio.StreamWriter) -> tuple[float, float]:
    """One keep-alive request; (time to first body byte, total) in ms."""
    t0 = time.perf_counter()
    writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%s" % (
                     path.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    first = 0.0
    if b"chunked" in head.lower():
        while True:
            size = int((await reader.readline()).strip(), 16)
            if not first:
                first = time.perf_counter()
            if size == 0:
                await reader.readline()
                break
            await reader.readexactly(size + 2)
    else:
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        first = time.perf_counter()
    return (first - t0) * 1000, (time.perf_counter() - t0) * 1000


async def paced(port: int, path: str, body: bytes, conns: int, rate: float,
                seconds: float) -> list[tuple[float, float]]:
    """`conns` connections sending `rate` requests/s in total; latencies."""
    results: list[tuple[float, float]] = []
    end = time.perf_counter() + seconds
    gap = conns / rate

    async def worker(offset: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(offset)
        nxt = time.perf_counter()
        while time.perf_counter() < end:
            results.append(await one(port, path, body, reader, writer))
            nxt += gap
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        writer.close()

    await asyncio.gather(*(worker(i * gap / conns) for i in range(conns)))
    return results


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def setup_litellm(venv: Path) -> Path:
    litellm = venv / "bin" / "litellm"
    if not litellm.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                       check=True, timeout=900)
    return litellm


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--client-rounds", type=int, default=3)
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the router as of this git revision, alternating")
    parser.add_argument("--baseline-dir", type=Path, default=Path("/tmp/router-baseline"),
                        help="where the worktree of `--baseline` is checked out")
    parser.add_argument("--baseline-rounds", type=int, default=5)
    parser.add_argument("--baseline-only", action="store_true",
                        help="run only the comparison with `--baseline`")
    args = parser.parse_args()
    if args.baseline_only and not args.baseline:
        parser.error("`--baseline-only` needs `--baseline REV`")
    tree = baseline_tree(args.baseline, args.baseline_dir) if args.baseline else None
    secs = args.seconds
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    procs = Procs()
    try:
        ports = {name: free_port() for name in ("direct", "nginx", "litellm", "ours")}
        procs.start([PY, str(HERE / "canned_upstream.py"), "--port", str(ports["direct"]),
                     "--chunks", str(STREAM_CHUNKS)], tmp / "canned.log")
        up = f"127.0.0.1:{ports['direct']}"
        (tmp / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  upstream canned {{ server {up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{ports['nginx']};
    location / {{ proxy_pass http://canned; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off; }}
  }}
}}
""")
        procs.start(["nginx", "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")],
                    tmp / "nginx.log")
        if tree is not None and args.baseline_only:
            wait_port(ports["direct"], 15)
            report_compare(compare(procs, tmp, up, tree, secs, args.baseline_rounds),
                           args.baseline, secs)
            report_load(load_before)
            return 0
        router_config(tmp / "router.json", ports["ours"], up, 1)
        procs.start([str(ROOT / ".venv" / "bin" / "stack-router"), "--config",
                     str(tmp / "router.json")], tmp / "router.log")
        targets = ["direct", "nginx", "ours"]
        for name in targets:
            wait_port(ports[name], 120 if name == "litellm" else 15)
        time.sleep(1)
        client_rows = clients(ports["direct"], min(secs, 5), args.client_rounds)
        chat = lua(tmp / "chat.lua", CHAT)
        stream = lua(tmp / "stream.lua", b'{"model":"m","stream":true,"messages":[]}')
        rows: dict[str, dict[str, float]] = {}
        for name in targets:
            url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
            wrk(url, chat, 32, 2)  # warm up
            rows[name] = wrk(url, chat, 32, secs)
            s = wrk(url, stream, 8, secs)
            rows[name]["chunks"] = s["rps"] * STREAM_CHUNKS
        paced_rows: dict[str, dict[str, float]] = {}
        small = b'{"model":"m","stream":true,"canned_chunks":3,"messages":[]}'
        for name in ("direct", "nginx", "ours"):
            lat = asyncio.run(paced(ports[name], "/v1/chat/completions", CHAT, 32, 1000,
                                    min(secs, 5)))
            ttft = asyncio.run(paced(ports[name], "/v1/chat/completions", small, 1, 200,
                                     min(secs, 5)))
            paced_rows[name] = {"p50": pct([t for _, t in lat], 0.5),
                                "p99": pct([t for _, t in lat], 0.99),
                                "ttft": pct([f for f, _ in ttft], 0.5)}
        scale_rows = scaling(procs, tmp, secs, args.scale_rounds)
        if not args.skip_litellm:
            # last and alone: its background work would slow the others down
            litellm = setup_litellm(Path(os.environ.get("LITELLM_VENV",
                                                        "/tmp/modelstack-bench-litellm")))
            (tmp / "litellm.yaml").write_text(
                "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
                f"      api_base: http://{up}/v1\n      api_key: none\n"
                "litellm_settings:\n  telemetry: false\n")
            procs.start([str(litellm), "--config", str(tmp / "litellm.yaml"), "--host",
                         "127.0.0.1", "--port", str(ports["litellm"]), "--num_workers", "1"],
                        tmp / "litellm.log",
                        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                             "LITELLM_MASTER_KEY": "sk-bench"})
            wait_port(ports["litellm"], 120)
            url = f"http://127.0.0.1:{ports['litellm']}/v1/chat/completions"
            wrk(url, chat, 32, 2)
            rows["litellm"] = wrk(url, chat, 32, secs)
            rows["litellm"]["chunks"] = 0.0
        report(rows, paced_rows, secs)
        report_clients(client_rows, min(secs, 5))
        report_scaling(scale_rows, secs)
        if tree is not None:
            report_compare(compare(procs, tmp, up, tree, secs, args.baseline_rounds),
                           args.baseline, secs)
        report_load(load_before)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report_load(before: tuple[float, float, float]) -> None:
    print(f"\nLoad average (1, 5, 15 min) before the run: "
          f"{', '.join(f'{x:.2f}' for x in before)}; after: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores.")


def report(rows: dict[str, dict[str, float]], paced_rows: dict[str, dict[str, float]],
           secs: int) -> None:
    print(f"## Non-streaming, wrk -t1 -c32 -d{secs}s (saturation)\n")
    print("| target | req/s | p50 ms | p99 ms | non-2xx | stream chunks/s (c8) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['errors']:.0f} | {r['chunks']:,.0f} |")
    ours = rows["ours"]["rps"]
    print()
    if "litellm" in rows and rows["litellm"]["rps"]:
        print(f"- ours / LiteLLM: **{ours / rows['litellm']['rps']:.1f}x**")
    print(f"- ours / nginx: **{ours / rows['nginx']['rps']:.2f}x**")
    d, o = paced_rows["direct"], paced_rows["ours"]
    print("\n## Paced: 32 connections, 1,000 req/s in total (asyncio client)\n")
    print("| target | p50 ms | p99 ms | TTFT p50 ms (stream, 1 conn) |")
    print("|---|---:|---:|---:|")
    for name, r in paced_rows.items():
        print(f"| {name} | {r['p50']:.3f} | {r['p99']:.3f} | {r['ttft']:.3f} |")
    print(f"\n- added latency (ours - direct): p50 **{o['p50'] - d['p50']:.3f} ms**, "
          f"p99 **{o['p99'] - d['p99']:.3f} ms**")
    print(f"- added TTFT p50 (ours - direct): **{o['ttft'] - d['ttft']:.3f} ms**")



def report_clients(results: dict[str, list[dict[str, float]]], secs: int) -> None:
    def median(name: str, field: str) -> float:
        return pct([r[field] for r in results[name]], 0.5)

    rounds = len(results["raw"])
    print(f"\n## Upstream client alone: 32 concurrent requests, {secs} s x {rounds} rounds "
          "(client on core 1, canned upstream on core 0)\n")
    print("| client | req/s (median) | each round | p50 ms | p99 ms | raw pool / this |")
    print("|---|---:|---|---:|---:|---:|")
    raw = median("raw", "rps")
    for name in results:
        each = ", ".join(f"{r['rps']:,.0f}" for r in results[name])
        rps = median(name, "rps")
        print(f"| {name} | {rps:,.0f} | {each} | {median(name, 'p50_ms'):.2f} | "
              f"{median(name, 'p99_ms'):.2f} | {raw / rps:.1f}x |")
    print(f"\n- aiohttp / httpx: **{median('aiohttp', 'rps') / median('httpx', 'rps'):.1f}x**")


def report_scaling(rows: list[dict[str, float | str]], secs: int) -> None:
    labels = list(dict.fromkeys(str(r["label"]) for r in rows))

    def median(label: str, field: str) -> float:
        return pct([float(r[field]) for r in rows if r["label"] == label], 0.5)

    rounds = len(rows) // len(labels)
    print(f"\n## Workers: wrk -t1 -c32 -d{secs}s x {rounds} rounds (interleaved), router, "
          "canned upstream and wrk all on cores 0-1; medians\n")
    print("| router | req/s | each round | p50 ms | p99 ms | non-2xx | router CPU (cores) | "
          "router CPU us/req |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for label in labels:
        each = ", ".join(f"{float(r['rps']):,.0f}" for r in rows if r["label"] == label)
        errors = sum(float(r["errors"]) for r in rows if r["label"] == label)
        print(f"| {label} | {median(label, 'rps'):,.0f} | {each} | {median(label, 'p50'):.2f} | "
              f"{median(label, 'p99'):.2f} | {errors:.0f} | {median(label, 'cores'):.2f} | "
              f"{median(label, 'us_per_req'):.0f} |")
    one, two = median(labels[0], "rps"), median(labels[1], "rps")
    print(f"\n- 2 workers / 1 worker: **{two / one:.2f}x** (router CPU per request: "
          f"{median(labels[1], 'us_per_req') / median(labels[0], 'us_per_req'):.2f}x)")
    print(f"- key with limits / key without: 1 worker **{median(labels[2], 'rps') / one:.2f}x**"
          f", 2 workers (shared table) **{median(labels[3], 'rps') / two:.2f}x**")


def report_compare(results: dict[str, list[dict[str, float]]], rev: str, secs: int) -> None:
    def median(name: str, field: str) -> float:
        return pct([r[field] for r in results[name]], 0.5)

    rounds = len(results["before"])
    print(f"\n## Before ({rev}) and after, same run: wrk -t1 -c32 -d{secs}s x {rounds} rounds "
          "(alternating), one worker on core 0; medians\n")
    print("| router | req/s | each round | p50 ms | p99 ms | non-2xx | router CPU us/req | "
          "each round | stream chunks/s (c8) |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|")
    for name in ("before", "after"):
        each = ", ".join(f"{r['rps']:,.0f}" for r in results[name])
        cpu = ", ".join(f"{r['us_per_req']:.0f}" for r in results[name])
        errors = sum(r["errors"] for r in results[name])
        print(f"| {name} | {median(name, 'rps'):,.0f} | {each} | {median(name, 'p50'):.2f} | "
              f"{median(name, 'p99'):.2f} | {errors:.0f} | {median(name, 'us_per_req'):.1f} | "
              f"{cpu} | {median(name, 'chunks'):,.0f} |")

    def ratio(field: str) -> float:
        return median("after", field) / median("before", field)

    print(f"\n- after / before: **{ratio('rps'):.3f}x** req/s, **{ratio('us_per_req'):.3f}x** "
          f"router CPU per request, **{ratio('chunks'):.3f}x** stream chunks/s")


if __name__ == "__main__":
    raise SystemExit(main())
