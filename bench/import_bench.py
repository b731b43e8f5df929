"""How long `import stack.schedule` spends in the project's own modules.

Runs `python -X importtime -c "import MODULE"` in fresh processes and adds up the self time
of the modules of this project (`stack`, `agent`, `router`, `deploys`) and of everything
else (pydantic, the standard library, ...) separately; reports the medians. With
`--baseline DIR` (a checkout of another commit, e.g. `git archive REV | tar -x -C DIR`),
the same is measured there, alternating, in the same run.

    .venv/bin/python bench/import_bench.py --runs 9
    .venv/bin/python bench/import_bench.py --runs 9 --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = ("stack", "agent", "router", "deploys")
TARGET_S = 0.1


def one_run(tree: Path, module: str) -> tuple[float, float, list[tuple[float, str]]]:
    """(own seconds, other seconds, own modules by self time) of one fresh import."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, check=True)
    own = other = 0.0
    mine: list[tuple[float, str]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        name, seconds = name.strip(), int(self_us) / 1e6
        if name.split(".")[0] in OWN:
            own += seconds
            mine.append((seconds, name))
        else:
            other += seconds
    return own, other, sorted(mine, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="stack.schedule")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--baseline", type=Path, help="another checkout, measured alongside")
    args = parser.parse_args()
    trees = {"this checkout": ROOT, **({"baseline": args.baseline} if args.baseline else {})}
    results: dict[str, list[tuple[float, float, list[tuple[float, str]]]]] = {
        name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            results[name].append(one_run(tree, args.module))
    print(f"`import {args.module}`, median of {args.runs} fresh processes")
    print("| tree | own modules (s) | everything else (s) |")
    print("|---|---:|---:|")
    for name, runs in results.items():
        own = statistics.median(r[0] for r in runs)
        other = statistics.median(r[1] for r in runs)
        print(f"| {name} | {own:.3f} | {other:.3f} |")
    slowest = results["this checkout"][len(results["this checkout"]) // 2][2][:5]
    print("slowest own modules (one run):", ", ".join(f"{n} {s * 1000:.1f} ms"
                                                       for s, n in slowest))
    own_now = statistics.median(r[0] for r in results["this checkout"])
    met = own_now < TARGET_S
    print(f"target: own imports under {TARGET_S} s: {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
