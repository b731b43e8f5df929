"""The whole `stack plan --facts` command at fleet scale: a process started as a user starts
it, reading a generated stack.toml and facts snapshot, evaluating every model from its
files (config.json folders: offline), scheduling, deriving the plan and printing it.

    .venv/bin/python bench/plan_command_bench.py --nodes 10000 --repeat 3

N nodes x 8 H100 (the fleet of bench/plan_bench.py), N/5 models x 10 replicas, each model a
`local://` folder holding one of the real configs in tests/estimate/configs. Reports wall
and CPU seconds (the child's user + system time) per run, medians, with and without
`--out plan.json`; the target (issue "Placement by physics"): 10,000 nodes and 20,000
replicas in under 10 s for the whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from plan_bench import CONFIGS, CONTEXTS, fleet  # noqa: E402


def write_stack(folder: Path, nodes: int) -> None:
    """stack.toml, facts.json and the model folders for an N-node fleet."""
    models = folder / "models"
    for name in CONFIGS:
        (models / name).mkdir(parents=True)
        shutil.copy(ROOT / "tests" / "estimate" / "configs" / f"{name}.json",
                    models / name / "config.json")
    lines = ['[stack]', 'name = "bench"', 'port_range = [40000, 40999]', '',
             '[runtimes.vllm]', 'versions = ["0.11.0"]', 'source = "pip"',
             'package = "vllm=={version}"', '']
    for m in range(nodes // 5):
        lines += [f'[models.model-{m:04d}]',
                  f'source = "local://models/{CONFIGS[m % len(CONFIGS)]}"',
                  'backend = "vllm"', 'replicas = 10',
                  f'context = {CONTEXTS[m // len(CONFIGS) % len(CONTEXTS)]}']
        if m % 7 == 3:
            lines.append('placement = "binpack"')
        if m % 11 == 5:
            lines.append('selector = ["zone in (a,b)"]')
        lines.append('')
    (folder / "stack.toml").write_text("\n".join(lines))
    (folder / "facts.json").write_text(fleet(nodes).model_dump_json())


def one_run(folder: Path, out: bool) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of one `stack plan` process."""
    argv = [sys.executable, "-m", "stack.cli", "plan", "--facts", "facts.json"]
    if out:
        argv += ["--out", "plan.json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 2):
        raise SystemExit(f"stack plan failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, cpu, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_stack(folder, args.nodes)
        print(f"# {args.nodes:,} nodes, {args.nodes * 8:,} GPUs, {args.nodes // 5 * 10:,} "
              f"replicas; load average {os.getloadavg()[0]:.1f}")
        print("| command | wall s (runs) | median wall s | median CPU s |")
        print("|---|---|---:|---:|")
        for out in (False, True):
            runs = [one_run(folder, out) for _ in range(args.repeat)]
            walls = [w for w, _, _ in runs]
            cpus = [c for _, c, _ in runs]
            name = "stack plan --facts F" + (" --out plan.json" if out else "")
            print(f"| `{name}` | {', '.join(f'{w:.2f}' for w in walls)} | "
                  f"{statistics.median(walls):.2f} | {statistics.median(cpus):.2f} |",
                  flush=True)
        placed = json.loads((folder / "plan.json").read_text())
        print(f"# placed {len(placed['placements']):,}, unschedulable "
              f"{len(placed['unschedulable']):,}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
