"""Facts from N loopback hosts vs from one host (target: 16 hosts take at most 2x one).

    .venv/bin/python bench/facts_bench.py [--hosts 16] [--runs 5]

Starts a loopback fleet (tests/fleet.py: real sshd per host, half of them with a fake
nvidia-smi printing a recorded H100 output), then alternates `stack.observe.gather` over
one host and over all hosts, each from fresh SSH connections, and prints the medians and
their ratio. gevent is patched first thing, as the `stack` CLI does.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fleet import Fleet  # noqa: E402

from stack.config import load_text  # noqa: E402
from stack.observe import gather  # noqa: E402

H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"


def _timed(spec_text: str, folder: Path, hosts: list[str] | None) -> float:
    spec = load_text(spec_text)
    start = time.perf_counter()
    observed = gather(spec, folder, hosts=hosts)
    elapsed = time.perf_counter() - start
    bad = [n for n, node in observed.nodes.items() if not node.reachable]
    assert not bad, f"unreachable: {bad}: {observed.nodes[bad[0]].error}"
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    gpu = {f"gpu-{k:02d}": H100 for k in range(1, args.hosts // 2 + 1)}
    with Fleet(n=args.hosts, gpu_tools=gpu) as fleet:
        text = fleet.inventory_toml()
        first = next(iter(fleet.hosts))
        _timed(text, fleet.root, [first])  # warm up imports and caches
        one, many = [], []
        for _ in range(args.runs):
            one.append(_timed(text, fleet.root, [first]))
            many.append(_timed(text, fleet.root, None))
    m1, mn = statistics.median(one), statistics.median(many)
    print(f"machine: {platform.machine()}, {platform.system()} {platform.release()}, "
          f"python {platform.python_version()}")
    print(f"1 host:  median {m1:.3f} s  runs {[round(x, 3) for x in one]}")
    print(f"{args.hosts} hosts: median {mn:.3f} s  runs {[round(x, 3) for x in many]}")
    print(f"ratio {args.hosts} hosts / 1 host: {mn / m1:.2f} (target <= 2.0)")
    return 0 if mn / m1 <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
