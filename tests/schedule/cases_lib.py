"""Turning a scheduler/plan case file into inputs: stack, facts, evaluations.

Shared by the runners in tests/schedule and tests/plan. Facts may name GPUs by model
(`{"model": "h100", "count": 8}`); the table below holds real names and memory sizes as
their vendor tools print them (see fixtures/gpu-tools in the shared folder).
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from stack.config import load_text
from stack.estimate import evaluate, meta_from_config, read_metadata
from stack.estimate.types import Evaluation
from stack.snapshot import Observed
from stack.spec import StackSpec
from tests.schedule.fake import fixed_evaluation

MiB = 1024**2
ROOT = Path(__file__).resolve().parents[2]
# name, vendor, memory bytes, compute capability: real outputs (nvidia-smi, amd-smi, rocm-smi)
GPU_MODELS: dict[str, tuple[str, str, int, str | None]] = {
    "h100": ("NVIDIA H100 80GB HBM3", "nvidia", 81559 * MiB, "9.0"),
    "l40s": ("NVIDIA L40S", "nvidia", 46068 * MiB, "8.9"),
    "rtx4090": ("NVIDIA GeForce RTX 4090", "nvidia", 24564 * MiB, "8.9"),
    "rtx3090": ("NVIDIA GeForce RTX 3090", "nvidia", 24576 * MiB, "8.6"),
    "910b4": ("910B4", "ascend", 32768 * MiB, None),
    "rtx4080super": ("NVIDIA GeForce RTX 4080 SUPER", "nvidia", 16376 * MiB, "8.9"),
    "p100": ("Tesla P100-PCIE-16GB", "nvidia", 16383 * MiB, "6.0"),
    "mi300x": ("MI300X-O", "amd", 196592 * MiB, None),
    "rx7900xt": ("Radeon RX 7900 XT", "amd", 21458059264, None),
}


def expand_gpus(value: Any) -> list[dict[str, Any]]:
    """A node's `gpus`: a list as in a snapshot, or `{"model", "count", "used"}` shorthand
    (with `"device_ips": [...]`, each GPU's `device_ip` in order: Ascend NIC addresses)."""
    if isinstance(value, list):
        out = []
        for gpu in value:
            if "model" in gpu:
                name, vendor, memory, cc = GPU_MODELS[gpu["model"]]
                gpu = {"name": name, "vendor": vendor, "memory_bytes": memory,
                       "compute_capability": cc, **{k: v for k, v in gpu.items() if k != "model"}}
            out.append(gpu)
        return out
    groups = value if isinstance(value, list) else [value]
    out = []
    for group in groups:
        name, vendor, memory, cc = GPU_MODELS[group["model"]]
        for k in range(int(group.get("count", 1))):
            index = len(out)
            out.append({"index": index, "uuid": f"GPU-{index:08d}", "vendor": vendor,
                        "name": name, "memory_bytes": memory,
                        "memory_used_bytes": int(group.get("used", 0)),
                        "compute_capability": cc})
            if k < len(group.get("device_ips", [])):
                out[-1]["device_ip"] = group["device_ips"][k]
    return out


def load_facts(data: dict[str, Any]) -> Observed:
    data = copy.deepcopy(data)
    for node in data.get("nodes", {}).values():
        if "gpus" in node:
            node["gpus"] = expand_gpus(node["gpus"])
    return Observed.model_validate(data)


def load_stack(value: str | dict[str, Any]) -> tuple[StackSpec, bytes]:
    """A case's stack: TOML text (checked as `stack load` would) or a table."""
    if isinstance(value, dict):
        import tomlkit

        text = tomlkit.dumps(value)
    else:
        text = value
    tomllib.loads(text)
    return load_text(text), text.encode()


def load_evaluations(data: dict[str, Any],
                     spec: StackSpec | None = None) -> dict[str, Evaluation]:
    """Per model, the table's `FixedEvaluation`, or with `{"gguf": PATH}` or
    `{"config": PATH}` (relative to the repository) the real estimator's evaluation of that
    GGUF header fixture or config.json."""
    models = spec.models if spec else {}
    out: dict[str, Evaluation] = {}
    for name, table in sorted(data.items()):
        if "gguf" in table:
            meta = read_metadata(str(ROOT / table["gguf"]), ROOT)
            out[name] = evaluate(name, models[name], meta)
        elif "config" in table:
            config = json.loads((ROOT / table["config"]).read_text())
            out[name] = evaluate(name, models[name], meta_from_config(config, table["config"]))
        else:
            out[name] = fixed_evaluation(name, table, models.get(name))
    return out


def read_case(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result
