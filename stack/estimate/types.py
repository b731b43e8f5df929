"""The values the estimator hands to the scheduler: a model's metadata and its claims.

This is the seam between `stack.estimate` (which fills these in) and `stack.schedule`
(which only reads them). Everything here is pure data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from stack.snapshot import GpuFacts, NodeFacts



@dataclass(frozen=True)
class ModelMeta:
    """What the metadata of a model says, before any backend is chosen."""

    source: str
    format: str  # "gguf", "safetensors", "ctranslate2", "config-only"
    architecture: str  # e.g. "LlamaForCausalLM", "gemma3" (GGUF general.architecture)
    kind: str  # inferred kind: llm, vlm, embedding, rerank, image, speech-to-text, ...
    params: int
    weights_bytes: int
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int  # training context
    kv_bytes_per_token: int  # f16/bf16 KV cache, one GPU (TP=1)
    quantization: str | None = None
    files_bytes: int = 0  # bytes on disk (for the disk filter)
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """Resources one replica takes, per node it runs on."""

    backend: str
    gpus: int  # GPUs per node (0: CPU)
    nodes: int  # nodes the replica spans (1 unless distributed)
    vram_bytes_per_gpu: int
    ram_bytes: int
    disk_bytes: int = 0
    detail: str = ""  # human-readable breakdown: "weights 4.2 GiB + KV 1.0 GiB + ..."
    # Split by whole layers (llama.cpp over several GPUs or RPC workers): `layers` blocks,
    # each taking `layer_bytes` (weights + its KV cache) on the device that holds it, plus
    # `device_bytes` fixed on every device (compute buffer, runtime; on the CPU: RAM).
    # 0 layers: the claim is per device as it stands (an even split).
    layers: int = 0
    layer_bytes: int = 0
    device_bytes: int = 0
    # Partial offload (llama.cpp): layers kept on the main node's CPU take `layer_bytes`
    # each of its RAM, plus `cpu_bytes` once (the CPU's compute buffer).
    cpu_bytes: int = 0
    # llama.cpp's output head sits on the device of the output layer, the last one in its
    # order (a tied head is a copy of the token embedding there): `output_bytes` more on
    # that device. `main_bytes`: RAM only the main takes beside its share of the layers
    # when its CPU is one of the devices (the input token embedding).
    output_bytes: int = 0
    main_bytes: int = 0
    # (fewest, most) of the `layers` this layout may put on accelerators when the rest
    # stays on the main node's CPU (`offload`, `-ngl`); (0, 0): all of them, no partial.
    gpu_layers: tuple[int, int] = (0, 0)
    # the context this claim holds when it is shorter than the model's default (no
    # `context` in stack.toml, and the default does not fit the GPUs); 0: the default
    context: int = 0

    def offload_range(self) -> tuple[int, int]:
        """(fewest, most) layers on accelerators; (layers, layers) for a full offload."""
        return self.gpu_layers if self.gpu_layers != (0, 0) else (self.layers, self.layers)


class Evaluation(Protocol):
    """A model understood: its metadata, compatible backends, and claims per layout."""

    @property
    def name(self) -> str: ...

    @property
    def meta(self) -> ModelMeta: ...

    @property
    def kind(self) -> str: ...

    @property
    def context(self) -> int: ...

    @property
    def backends(self) -> tuple[str, ...]:
        """Compatible backends, preferred first."""
        ...

    def claim(
        self, backend: str, gpus: int, gpu_memory_bytes: int | None, nodes: int = 1
    ) -> Claim | str:
        """The claim with `gpus` GPUs per node over `nodes` nodes (0 GPUs: CPU), or a
        reason this layout cannot work ("TP 3 does not divide 28 attention heads")."""
        ...

    def refuse(self, backend: str, node: NodeFacts, gpus: list[GpuFacts]) -> str | None:
        """Why `backend` cannot run this model on these GPUs of `node` (vendor, OS, arch,
        compute capability), or None when it can. `gpus` empty means CPU."""
        ...
