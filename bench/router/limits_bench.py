"""What a key's limits cost per request: counted in the router, or in a Redis every router
host shares (`[router.limits] store`), against a key without limits; one run.

    .venv/bin/python bench/router/limits_bench.py [--seconds 10] [--rounds 5]

The canned upstream, the router (one worker) and redis-server share core 0, `wrk -c32`
runs on core 1 (as bench/router/run.py). The three setups run in alternating order each
round; medians of req/s, latency p50 and the router's CPU per request, and the ratios to
the key without limits, are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    CHAT,
    HERE,
    PY,
    ROOT,
    Procs,
    cpu_seconds,
    free_port,
    lua,
    wait_port,
    wrk,
)

SETUPS = ("no limits", "limits in the router", "limits in Redis")


def config(path: Path, port: int, upstream: int, store: str | None) -> Path:
    def key(name: str, **limits: int) -> dict[str, object]:
        return {"name": name, "hash": "sha256:" + hashlib.sha256(f"sk-{name}".encode())
                .hexdigest(), **limits}

    path.write_text(json.dumps({
        "listen": f"127.0.0.1:{port}",
        "models": [{"name": "m", "replicas": [{"id": "a", "url": f"http://127.0.0.1:{upstream}"}]}],
        "keys": [key("free"), key("limited", rpm=10**9, tpm=10**12)],
        **({"limits": {"store": store}} if store else {})}))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    tmp = Path(tempfile.mkdtemp(prefix="limits-bench-"))
    procs = Procs()
    load = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    try:
        up, store = free_port(), free_port()
        procs.start([PY, str(HERE / "canned_upstream.py"), "--port", str(up)],
                    tmp / "canned.log")
        procs.start([redis, "--port", str(store), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(tmp)], tmp / "redis.log")
        wait_port(up, 15)
        wait_port(store, 15)
        scripts = {"free": lua(tmp / "free.lua", CHAT, "sk-free"),
                   "limited": lua(tmp / "limited.lua", CHAT, "sk-limited")}
        for i in range(args.rounds):
            order = SETUPS if i % 2 == 0 else tuple(reversed(SETUPS))
            for name in order:
                port = free_port()
                url = f"redis://127.0.0.1:{store}/0" if name == SETUPS[2] else None
                conf = config(tmp / "router.json", port, up, url)
                router = procs.start([str(ROOT / ".venv" / "bin" / "stack-router"),
                                      "--config", str(conf)], tmp / "router.log")
                wait_port(port, 15)
                target = f"http://127.0.0.1:{port}/v1/chat/completions"
                script = scripts["free" if name == SETUPS[0] else "limited"]
                wrk(target, script, 32, 2)
                cpu0 = cpu_seconds(router.pid)
                row = wrk(target, script, 32, args.seconds)
                row["us_per_req"] = ((cpu_seconds(router.pid) - cpu0)
                                     / max(1.0, row["rps"] * args.seconds) * 1e6)
                procs.stop_one(router)
                rows[name].append(row)
                time.sleep(0.5)
    finally:
        procs.stop()
    base = {k: statistics.median(r[k] for r in rows[SETUPS[0]])
            for k in ("rps", "p50", "us_per_req")}
    print(f"{'setup':<22} {'req/s':>8} {'p50 ms':>7} {'router us/req':>14} "
          f"{'req/s ratio':>11} {'errors':>6}")
    for name in SETUPS:
        med = {k: statistics.median(r[k] for r in rows[name])
               for k in ("rps", "p50", "us_per_req", "errors")}
        print(f"{name:<22} {med['rps']:>8.0f} {med['p50']:>7.3f} {med['us_per_req']:>14.1f} "
              f"{med['rps'] / base['rps']:>11.3f} {med['errors']:>6.0f}")
    print(f"rounds {args.rounds} x {args.seconds} s, medians; load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
