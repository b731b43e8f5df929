"""A table-driven `Evaluation` for scheduler tests: claims follow a stated formula.

The scheduler must be tested apart from the estimator's numbers, so a case states the
sizes it wants (weights, KV, overheads, compatible vendors) and this class turns them
into claims the same way every time: VRAM per GPU = (weights + kv) / (gpus * nodes) +
overhead_per_gpu; on the CPU the weights and KV live in RAM. llama.cpp claims also say
how they split by whole layers (as the real estimator's do): `layers` (default 32) of
(weights + kv) / layers each, plus overhead_per_gpu per GPU (on the CPU: `ram` per node);
how many may stay on the CPU follows the model's `offload` and `-ngl` as the estimator's
(`gpu_layer_range`), each costing its layer in the main's RAM plus `cpu_compute` once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from stack.estimate.memory import gpu_layer_range, llama_options
from stack.estimate.types import Claim, ModelMeta
from stack.snapshot import GpuFacts, NodeFacts
from stack.spec import ModelSpec, parse_bytes


def _cc(value: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in value.split(".")) if value else ()


@dataclass
class FixedEvaluation:
    name: str
    meta: ModelMeta
    kind: str
    context: int
    backends: tuple[str, ...]
    weights: int
    kv: int
    overhead_per_gpu: int
    ram: int
    disk: int
    heads: int
    vendors: dict[str, list[str]] = field(default_factory=dict)
    min_cc: dict[str, str] = field(default_factory=dict)
    cpu_compute: int = 0
    offload: str = "auto"
    args: list[str] = field(default_factory=list)
    calls: int = 0

    def claim(self, backend: str, gpus: int, gpu_memory_bytes: int | None,
              nodes: int = 1) -> Claim | str:
        self.calls += 1
        if backend not in self.backends:
            return f"{backend} cannot serve {self.name}"
        if gpus and self.heads % gpus:
            return f"TP {gpus} does not divide {self.heads} attention heads"
        total = self.weights + self.kv
        layers = self.meta.layers if backend == "llama.cpp" else 0
        per_layer = math.ceil(total / layers) if layers else 0
        if gpus == 0:
            return Claim(backend, 0, nodes, 0, self.ram + math.ceil(total / nodes), self.disk,
                         layers=layers, layer_bytes=per_layer, device_bytes=self.ram)
        low, high = gpu_layer_range(self.offload, llama_options(self.args).gpu_layers, layers)
        if layers and high == 0:
            return "every layer stays on the CPU"
        per_gpu = math.ceil(total / (gpus * nodes)) + self.overhead_per_gpu
        return Claim(backend, gpus, nodes, per_gpu, self.ram, self.disk, layers=layers,
                     layer_bytes=per_layer, device_bytes=self.overhead_per_gpu,
                     cpu_bytes=self.cpu_compute,
                     gpu_layers=(0, 0) if low == layers else (low, high))

    def refuse(self, backend: str, node: NodeFacts, gpus: list[GpuFacts]) -> str | None:
        vendor = gpus[0].vendor if gpus else "cpu"
        allowed = self.vendors.get(backend)
        if allowed is not None and vendor not in allowed:
            return f"{backend} does not run on {vendor}"
        want = self.min_cc.get(backend)
        if want and gpus and any(_cc(g.compute_capability) < _cc(want) for g in gpus):
            have = gpus[0].compute_capability or "unknown"
            return f"{backend} needs compute capability {want}, {node.address or 'node'} has {have}"
        return None


def fixed_evaluation(name: str, data: dict[str, Any],
                     spec: ModelSpec | None = None) -> FixedEvaluation:
    """A `FixedEvaluation` from a case's table (sizes as `"15GiB"` or bytes); `offload`
    and `args` from the model's spec."""
    size = lambda key, default=0: parse_bytes(data.get(key, default))  # noqa: E731
    weights = size("weights")
    meta = ModelMeta(
        source=data.get("source", f"hf://test/{name}"), format=data.get("format", "safetensors"),
        architecture="LlamaForCausalLM", kind=data.get("kind", "llm"), params=weights // 2,
        weights_bytes=weights, layers=int(data.get("layers", 32)), hidden_size=4096,
        attention_heads=int(data.get("heads", 32)), kv_heads=8, head_dim=128, vocab_size=32000,
        max_context=int(data.get("context", 8192)), kv_bytes_per_token=131072,
        files_bytes=size("disk", weights),
    )
    return FixedEvaluation(
        name=name, meta=meta, kind=data.get("kind", "llm"),
        context=int(data.get("context", 8192)),
        backends=tuple(data.get("backends", ["vllm"])), weights=weights, kv=size("kv"),
        overhead_per_gpu=size("overhead_per_gpu"), ram=size("ram", "1GiB"),
        disk=size("disk", weights), heads=int(data.get("heads", 32)),
        vendors=data.get("vendors", {"vllm": ["nvidia", "amd"], "sglang": ["nvidia", "amd"],
                                     "llama.cpp": ["nvidia", "amd", "cpu", "apple"]}),
        min_cc=data.get("min_cc", {}), cpu_compute=size("cpu_compute"),
        offload=spec.offload if spec else "auto", args=list(spec.args) if spec else [],
    )
