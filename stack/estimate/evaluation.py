"""`evaluate()`: a model of stack.toml understood — kind, backends, context and claims."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from stack.errors import EstimateError
from stack.estimate import memory
from stack.estimate.compat import compatible_backends, hardware_reason, model_reason
from stack.estimate.types import Claim, ModelMeta
from stack.snapshot import GpuFacts, NodeFacts
from stack.spec import ModelSpec

# llama.cpp default context when stack.toml sets none: the training context, capped, so a
# 128k-context model does not claim a 128k KV cache nobody asked for.
LLAMA_DEFAULT_CONTEXT = 8192
# Without `context`, a vLLM/SGLang/MindIE replica whose training context does not fit the
# GPUs runs with the largest multiple of CONTEXT_STEP that fits, but never below this.
CONTEXT_FLOOR = 4096
CONTEXT_STEP = 1024
# the backends that run with a context length (llama.cpp `-c`, vLLM `--max-model-len`,
# SGLang `--context-length`, MindIE `maxSeqLen`); the others have none to show or pass
CONTEXT_BACKENDS = frozenset({"llama.cpp", "vllm", "sglang", "mindie"})


def default_context(backend: str, meta: ModelMeta) -> int:
    """The context a backend runs with when `context` is not set (0: it takes none)."""
    if backend not in CONTEXT_BACKENDS:
        return 0
    training = meta.max_context or 2048
    if backend == "llama.cpp":
        return min(training, LLAMA_DEFAULT_CONTEXT)
    return training  # vLLM, SGLang, MindIE: max_model_len defaults to the training context


@dataclass(frozen=True)
class ModelEvaluation:
    """The Evaluation of one model (see stack.estimate.types.Evaluation)."""

    name: str
    meta: ModelMeta
    kind: str
    context: int
    backends: tuple[str, ...]
    spec: ModelSpec

    def context_for(self, backend: str) -> int:
        """The context `backend` would run this model with (0: it takes none)."""
        if backend not in CONTEXT_BACKENDS:
            return 0
        return self.spec.context or default_context(backend, self.meta)

    def claim(self, backend: str, gpus: int, gpu_memory_bytes: int | None,
              nodes: int = 1) -> Claim | str:
        """The claim with `gpus` GPUs per node over `nodes` nodes, or why not."""
        reason = model_reason(backend, self.meta, self.kind)
        if reason:
            return reason
        if nodes > 1 and not self.spec.distributed:
            return f"`models.{self.name}.distributed` is false: one replica stays on one node"
        context = self.context_for(backend)
        if self.meta.max_context and context > self.meta.max_context and backend != "llama.cpp":
            return (f"context {context} exceeds the model's training context "
                    f"{self.meta.max_context}")
        if backend == "llama.cpp":
            opts = memory.llama_options(self.spec.args)
            return memory.llama_claim(self.meta, context, gpus, nodes, gpu_memory_bytes, opts,
                                      self.spec.offload)
        if backend in ("vllm", "sglang"):
            default = memory.VLLM_UTILIZATION if backend == "vllm" else memory.SGLANG_UTILIZATION
            util = self.spec.gpu_memory_utilization or default
            opts_gpu = memory.GpuOptions(utilization=util, backend=backend)
            if gpus == 0:
                return f"{backend} needs a GPU"
            if backend == "sglang" and nodes > 1:
                # SGLang over nodes is one tensor-parallel group: --tp = GPUs x nodes
                return self._fit_context(context, gpu_memory_bytes, lambda c: _per_node(
                    memory.vllm_claim(self.meta, c, gpus * nodes, 1, gpu_memory_bytes,
                                      opts_gpu), gpus, nodes))
            return self._fit_context(context, gpu_memory_bytes, lambda c: memory.vllm_claim(
                self.meta, c, gpus, nodes, gpu_memory_bytes, opts_gpu))
        if backend == "mindie":
            if gpus == 0:
                return "MindIE runs on NPUs"
            # over nodes (multiNodesInferEnabled) the world is every NPU of every node
            return self._fit_context(context, gpu_memory_bytes, lambda c: _per_node(
                memory.mindie_claim(self.meta, c, gpus * nodes, gpu_memory_bytes), gpus, nodes))
        if nodes > 1:
            return f"{backend} replicas stay on one node"
        if backend == "stable-diffusion.cpp":
            return memory.diffusion_claim(self.meta, self.spec.args, gpus, gpu_memory_bytes)
        if backend == "vox-box" and self.meta.architecture == "whisper":
            return memory.whisper_claim(self.meta, gpus, gpu_memory_bytes)
        return memory.simple_claim(backend, self.meta, gpus, gpu_memory_bytes)

    def _fit_context(self, context: int, gpu_memory_bytes: int | None,
                     claim_at: Callable[[int], Claim | str]) -> Claim | str:
        """The claim at `context`; when it does not fit the GPUs and stack.toml sets no
        `context`, the claim at the largest shorter context that fits (a multiple of
        CONTEXT_STEP, at least CONTEXT_FLOOR), marked with that context."""
        full = claim_at(context)
        floor = min(CONTEXT_FLOOR, context)
        if not isinstance(full, str) or self.spec.context or gpu_memory_bytes is None \
                or isinstance(claim_at(floor), str):
            return full
        lo, hi = floor // CONTEXT_STEP, context // CONTEXT_STEP  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if not isinstance(claim_at(mid * CONTEXT_STEP), str) else (lo, mid)
        shorter = max(lo * CONTEXT_STEP, floor)
        got = claim_at(shorter)
        assert not isinstance(got, str)
        return replace(got, context=shorter, detail=f"{got.detail}; context {shorter}: the "
                       f"training context {context} does not fit ({full})")

    def refuse(self, backend: str, node: NodeFacts, gpus: list[GpuFacts]) -> str | None:
        """Why `backend` cannot run this model on these GPUs of `node`, or None."""
        reason = model_reason(backend, self.meta, self.kind)
        if reason:
            return reason
        return hardware_reason(backend, node, gpus)


def _per_node(claim: Claim | str, gpus: int, nodes: int) -> Claim | str:
    """A claim computed for all GPUs of all nodes, said per node."""
    return claim if isinstance(claim, str) else replace(claim, gpus=gpus, nodes=nodes)


def evaluate(name: str, model: ModelSpec, meta: ModelMeta) -> ModelEvaluation:
    """Understand `models.NAME`: kind, compatible backends (preferred first), context."""
    kind = model.kind or (meta.kind if meta.kind != "vlm-projector" else "vlm")
    if meta.kind == "vlm-projector":
        raise EstimateError(f"`models.{name}.source` is a multimodal projector, not a model",
                            hint="point `source` at the model GGUF and set `mmproj`.")
    if kind == "image" and meta.extra.get("diffusion_only") and not (
            model.components.keys() & {"clip_l", "clip_g", "t5xxl", "llm"}):
        raise EstimateError(
            f"`models.{name}.source` is a {meta.architecture} diffusion model alone: "
            "stable-diffusion.cpp needs its text encoders and VAE beside it",
            hint="list them in `components`, e.g. `{ vae = \"ae.safetensors\", clip_l = "
                 "\"clip_l.safetensors\", t5xxl = \"t5xxl_fp16.safetensors\" }` for FLUX.")
    if model.backend == "custom":
        backends: tuple[str, ...] = ("custom",)
    elif model.backend is not None:
        reason = model_reason(model.backend, meta, kind)
        if reason:
            raise EstimateError(f"`models.{name}.backend` is `{model.backend}`: {reason}",
                                hint="remove `backend` to let stack choose, or change "
                                     "`source` to a format it serves.")
        backends = (model.backend,)
    else:
        backends = compatible_backends(meta, kind)
        if not backends:
            raise EstimateError(
                f"no backend serves `models.{name}` ({kind}, {meta.format})",
                hint="set `backend = \"custom\"` with a `command`, or use another source.")
    evaluation = ModelEvaluation(name=name, meta=meta, kind=kind, context=0,
                                 backends=backends, spec=model)
    return replace(evaluation, context=evaluation.context_for(backends[0]))
