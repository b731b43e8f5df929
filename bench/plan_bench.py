"""Planning speed: a synthetic fleet of N nodes x 8 GPUs, 2 replicas per node's worth.

Measures CPU time (`time.process_time`, one core) of the pure planning pipeline
(evaluate -> schedule -> assignments -> plan) for:
- fresh:    nothing runs yet; every replica is placed;
- steady:   the facts are what applying `fresh` left: every replica is sticky, no changes;
- add one:  `steady` plus one new model: asserts that no other replica moves.
Side by side, the baseline: a naive scheduler that scans every node for every replica
(the O(nodes x replicas) loop the indexed scheduler avoids), on the same claims.

    .venv/bin/python bench/plan_bench.py            # 100, 1,000 and 5,000 nodes
    .venv/bin/python bench/plan_bench.py --nodes 1000 --repeat 5

Models are real config.json files (tests/estimate/configs) at several context sizes,
evaluated by the real estimator; 200 models x 10 replicas at 1,000 nodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack.estimate import evaluate, meta_from_config  # noqa: E402
from stack.estimate.types import Evaluation, ModelMeta  # noqa: E402
from stack.pipeline import Evaluations, plan_evaluated  # noqa: E402
from stack.placement import Placements, with_instances  # noqa: E402
from stack.snapshot import Observed  # noqa: E402
from stack.spec import StackSpec  # noqa: E402

CONFIGS = ["qwen2.5-7b-instruct", "llama-3.1-8b", "mistral-7b-v0.1", "deepseek-v2-lite",
           "qwen3-30b-a3b"]
CONTEXTS = [4096, 8192, 16384, 32768]
H100_BYTES = 85520809984  # 81559 MiB, as nvidia-smi reports an H100 80GB HBM3
H100 = {"vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": H100_BYTES,
        "compute_capability": "9.0", "driver": "580.95.05"}
STACK_DIR = Path("/nonexistent")


def fleet(nodes: int) -> Observed:
    data = {"format_version": 1, "nodes": {
        f"gpu-{i:05d}": {
            "address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "memory_bytes": 2 * 10**12,
            "disk_free_bytes": 30 * 10**12, "cpu_cores": 128,
            "labels": {"zone": "abcd"[i % 4]}, "runtimes": {"vllm": ["0.11.0"]},
            "agent": {"version": "0.1.0", "running": True},
            "gpus": [{**H100, "index": g, "uuid": f"GPU-{i}-{g}"} for g in range(8)],
        } for i in range(nodes)}}
    return Observed.model_validate(data)


def stack(models: int, replicas: int, extra: int = 0) -> StackSpec:
    table: dict[str, Any] = {}
    for m in range(models + extra):
        entry: dict[str, Any] = {
            "source": f"hf://bench/{CONFIGS[m % len(CONFIGS)]}-{m}",
            "replicas": replicas, "context": CONTEXTS[m // len(CONFIGS) % len(CONTEXTS)]}
        if m % 7 == 3:
            entry["placement"] = "binpack"
        if m % 11 == 5:
            entry["selector"] = ["zone in (a,b)"]
        table[f"model-{m:04d}"] = entry
    return StackSpec.model_validate({
        "stack": {"name": "bench", "port_range": [40000, 40999]},
        "runtimes": {"vllm": {"versions": ["0.11.0"], "source": "pip",
                              "package": "vllm=={version}"}},
        "models": table})


def metas() -> dict[str, ModelMeta]:
    folder = ROOT / "tests" / "estimate" / "configs"
    return {name: meta_from_config(json.loads((folder / f"{name}.json").read_text()),
                                   f"hf://bench/{name}") for name in CONFIGS}


def planning(spec: StackSpec, observed: Observed,
             meta: dict[str, ModelMeta]) -> tuple[Placements, float, int]:
    """The pure pipeline, timed in CPU seconds: (placements, seconds, changes)."""
    start = time.process_time()
    evaluations = {
        name: cast(Evaluation, evaluate(name, model, meta[model.source.split("/")[-1]
                                                          .rsplit("-", 1)[0]]))
        for name, model in spec.models.items()}
    result = plan_evaluated(spec, b"bench", observed, Evaluations(evaluations), STACK_DIR,
                            "0.1.0")
    return result.placements, time.process_time() - start, len(result.changes)


def naive(spec: StackSpec, observed: Observed, meta: dict[str, ModelMeta]) -> float:
    """Baseline: for every replica scan every node and GPU (least loaded that fits)."""
    start = time.process_time()
    free = {n: {g.index: g.memory_bytes for g in f.gpus} for n, f in observed.nodes.items()}
    for name, model in sorted(spec.models.items()):
        ev = evaluate(name, model, meta[model.source.split("/")[-1].rsplit("-", 1)[0]])
        claim = ev.claim(ev.backends[0], 1, H100_BYTES, 1)
        if isinstance(claim, str):
            continue
        for _ in range(model.replicas):
            best: tuple[float, str, int] | None = None
            for node in sorted(free):
                gpus = free[node]
                load = sum(gpus.values())
                for index, left in gpus.items():
                    if left >= claim.vram_bytes_per_gpu and (best is None or -load < best[0]):
                        best = (-load, node, index)
            if best:
                free[best[1]][best[2]] -= claim.vram_bytes_per_gpu
    return time.process_time() - start


def median(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def run(nodes: int, repeat: int, with_naive: bool) -> dict[str, Any]:
    models, replicas = nodes // 5, 10
    meta = metas()
    observed = fleet(nodes)
    spec = stack(models, replicas)
    fresh, _, _ = planning(spec, observed, meta)
    t_fresh = median(lambda: planning(spec, observed, meta)[1], repeat)
    steady_facts = with_instances(observed, fresh)
    again, _, steady_changes = planning(spec, steady_facts, meta)
    assert again.placements == fresh.placements, "a steady re-plan moved replicas"
    t_steady = median(lambda: planning(spec, steady_facts, meta)[1], repeat)
    bigger = stack(models, replicas, extra=1)
    added, _, _ = planning(bigger, steady_facts, meta)
    before = {(p.model, p.replica): p for p in fresh.placements}
    moved = [k for k, p in before.items() if added.get(*k) != p]
    assert not moved, f"adding a model moved {moved[:5]}"
    new = [p for p in added.placements if (p.model, p.replica) not in before]
    t_add = median(lambda: planning(bigger, steady_facts, meta)[1], repeat)
    out: dict[str, Any] = {
        "nodes": nodes, "gpus": nodes * 8, "models": models, "replicas": models * replicas,
        "placed": len(fresh.placements), "unschedulable": len(fresh.unschedulable),
        "fresh_s": t_fresh, "steady_s": t_steady, "add_one_s": t_add,
        "added_replicas": len(new), "moved_when_adding": len(moved),
        "steady_changes": steady_changes,
    }
    if with_naive:
        out["naive_schedule_s"] = median(lambda: naive(spec, observed, meta), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the baseline")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| nodes | GPUs | replicas | placed | fresh plan (CPU s) | steady re-plan | "
          "add one model | moved | naive baseline schedule (CPU s) | naive / fresh |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nodes in args.nodes:
        r = run(nodes, args.repeat, not args.no_naive and nodes <= 1000)
        naive_s = r.get("naive_schedule_s")
        ratio = f"{naive_s / r['fresh_s']:.1f}x" if naive_s else "-"
        print(f"| {r['nodes']:,} | {r['gpus']:,} | {r['replicas']:,} | {r['placed']:,} | "
              f"{r['fresh_s']:.3f} | {r['steady_s']:.3f} | {r['add_one_s']:.3f} | "
              f"{r['moved_when_adding']} | {f'{naive_s:.3f}' if naive_s else '-'} | {ratio} |",
              flush=True)
        if nodes == 1000:
            assert r["fresh_s"] <= 1.0 and r["add_one_s"] <= 1.0, r


if __name__ == "__main__":
    main()
