"""Benchmark: a no-change `stack apply` on N loopback hosts vs a bare pyinfra run that
gathers the same facts (connect + the one facts script per host), side by side.

    .venv/bin/python bench/apply_bench.py [--hosts 8] [--runs 5]

The fleet is converged once first (agent and router installed, no models), then the two
are timed alternately in this process (gevent patched, as the CLI does). Target: the
no-change apply takes at most 2x the baseline. Prints a JSON line with medians and ratio.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import gevent  # noqa: E402
from fleet import Fleet  # noqa: E402

from stack.apply import ApplyOptions, apply_fleet  # noqa: E402
from stack.config import load  # noqa: E402
from stack.pipeline import make_plan  # noqa: E402


def baseline(spec_path: Path) -> float:
    """Bare pyinfra: build the inventory, connect every host, run the facts script once."""
    from pyinfra.api.config import Config
    from pyinfra.api.connect import connect_all
    from pyinfra.api.facts import get_fact
    from pyinfra.api.inventory import Inventory
    from pyinfra.api.state import State
    from pyinfra.context import ctx_host, ctx_state

    from deploys.facts import HostFacts

    spec = load(spec_path)
    start = time.perf_counter()
    hosts = []
    for name, host in spec.hosts.items():
        data = {"ssh_hostname": host.address, "ssh_port": host.port, "ssh_user": host.user,
                "ssh_key": host.key, "ssh_known_hosts_file": host.known_hosts}
        hosts.append((name, data))
    state = State(Inventory((hosts, {})), Config())
    connect_all(state)
    prefixes = {n: spec.nodes[n].prefix for n in spec.hosts}
    results = {}

    def one(host: Any) -> None:
        with ctx_state.use(state), ctx_host.use(host):
            results[host.name] = get_fact(state, host, HostFacts,
                                          kwargs={"prefix": prefixes[host.name]})

    gevent.joinall([gevent.spawn(one, h) for h in state.inventory])
    elapsed = time.perf_counter() - start
    for host in state.inventory:
        host.disconnect()
    assert len(results) == len(spec.hosts) and all(results.values())
    return elapsed


def no_change_apply(spec_path: Path) -> float:
    spec = load(spec_path)
    stack_dir = spec_path.parent
    data = spec_path.read_bytes()
    start = time.perf_counter()
    result = apply_fleet(spec, stack_dir,
                         lambda observed: make_plan(spec, data, observed, stack_dir),
                         ApplyOptions(), lambda o, d: True, lambda line: None)
    elapsed = time.perf_counter() - start
    assert result.ok and not result.changed, result.to_json()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("STACK_SECRET", "apply-bench-secret-0123456789abcdef")
    work = Path(tempfile.mkdtemp(prefix="apply-bench-"))
    with Fleet(args.hosts, root=work / "fleet") as fleet:
        router = fleet.hosts["node-01"]
        with socket.socket() as sock:
            sock.bind((router.address, 0))
            port = sock.getsockname()[1]
        spec_path = work / "stack.toml"
        spec_path.write_text(f'[stack]\nname = "bench"\n\n{fleet.inventory_toml()}\n'
                             f'[router]\nhosts = ["node-01"]\n'
                             f'listen = "{router.address}:{port}"\n')
        spec = load(spec_path)
        started = time.perf_counter()
        first = apply_fleet(spec, work, lambda o: make_plan(
            spec, spec_path.read_bytes(), o, work), ApplyOptions(),
            lambda o, d: True, lambda line: None)
        assert first.ok, first.to_json()
        converge = time.perf_counter() - started
        base: list[float] = []
        noop: list[float] = []
        for _ in range(args.runs):
            base.append(baseline(spec_path))
            noop.append(no_change_apply(spec_path))
        from stack.commands.destroy import destroy_host  # stop what the bench started
        from stack.observe import connect, disconnect

        connected = connect(spec, work)
        gevent.joinall([gevent.spawn(destroy_host, spec, n, h, spec.nodes[n].prefix or "",
                                     "supervise", False)
                        for n, h in connected.nodes.items()])
        disconnect(connected)
    result = {
        "hosts": args.hosts, "runs": args.runs,
        "first_apply_s": round(converge, 2),
        "baseline_median_s": round(statistics.median(base), 3),
        "no_change_apply_median_s": round(statistics.median(noop), 3),
        "ratio": round(statistics.median(noop) / statistics.median(base), 2),
        "baseline_s": [round(x, 3) for x in base], "apply_s": [round(x, 3) for x in noop],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
    }
    print(json.dumps(result))
    return 0 if result["ratio"] <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
