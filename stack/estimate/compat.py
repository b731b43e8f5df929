"""Which backend runs which model on which hardware, each refusal with its reason."""

from __future__ import annotations

from dataclasses import dataclass

from stack.estimate.types import ModelMeta
from stack.snapshot import GpuFacts, NodeFacts


@dataclass(frozen=True)
class BackendSupport:
    """Where a backend runs: vendors (`cpu` for no GPU), systems, CPU architectures, the
    minimum NVIDIA compute capability, and the model kinds and formats it serves."""

    label: str
    vendors: frozenset[str]
    systems: frozenset[str]
    arches: frozenset[str]
    min_cc: tuple[int, int] | None
    kinds: frozenset[str]
    formats: frozenset[str]


_LLM = frozenset({"llm", "vlm", "embedding", "rerank"})
_ARCHES = frozenset({"x86_64", "aarch64", "arm64"})
_ST = frozenset({"safetensors", "config-only"})

# Each entry is checked against the backend's own documentation (docs/estimate.md,
# "Compatibility", has the table with its sources):
SUPPORT: dict[str, BackendSupport] = {
    # docs.vllm.ai "GPU" installation: CUDA compute capability >= 7.0, ROCm; Ascend NPUs
    # through the vllm-ascend plugin (docs.vllm.ai/projects/ascend: Atlas A2/A3, Linux);
    # Hygon DCUs through Hygon's ROCm-compatible DTK builds
    "vllm": BackendSupport("vLLM", frozenset({"nvidia", "amd", "hygon", "ascend"}),
                           frozenset({"linux"}), frozenset({"x86_64", "aarch64"}), (7, 0),
                           _LLM, _ST),
    # docs.sglang.io hardware platforms: NVIDIA, AMD, Ascend NPUs; sm75 (T4) since
    # sgl-project/sglang#1233 (FlashInfer 0.1.6); several nodes with --nnodes/--node-rank
    # (docs.sglang.io multi-node deployment)
    "sglang": BackendSupport("SGLang", frozenset({"nvidia", "amd", "ascend"}),
                             frozenset({"linux"}), frozenset({"x86_64", "aarch64"}), (7, 5),
                             frozenset({"llm", "vlm", "embedding"}), _ST),
    "llama.cpp": BackendSupport(
        "llama.cpp", frozenset({"nvidia", "amd", "hygon", "apple", "mthreads", "ascend", "cpu"}),
        frozenset({"linux", "darwin", "windows"}), _ARCHES, (5, 0), _LLM,
        frozenset({"gguf"})),
    # hiascend.com MindIE installation guide: Atlas 800I A2/A3 (Ascend only), Linux;
    # several nodes per the MindIE service deployment guide (multi-node inference):
    # `multiNodesInferEnabled` in config.json, a rank table of every NPU's device IP
    # (`RANKTABLEFILE`) and this node's address (`MIES_CONTAINER_IP`) on each node
    "mindie": BackendSupport("MindIE", frozenset({"ascend"}), frozenset({"linux"}),
                             frozenset({"x86_64", "aarch64"}), None, frozenset({"llm", "vlm"}),
                             _ST),
    "vox-box": BackendSupport("vox-box", frozenset({"nvidia", "cpu"}),
                              frozenset({"linux", "darwin"}), _ARCHES, (6, 0),
                              frozenset({"speech-to-text", "text-to-speech"}),
                              frozenset({"safetensors", "config-only", "gguf", "ctranslate2",
                                         "pytorch"})),
    "stable-diffusion.cpp": BackendSupport(
        "stable-diffusion.cpp", frozenset({"nvidia", "amd", "apple", "cpu"}),
        frozenset({"linux", "darwin", "windows"}), _ARCHES, (5, 0), frozenset({"image"}),
        frozenset({"safetensors", "gguf", "config-only"})),
}
# the order backends are preferred in when stack.toml names none
PREFERENCE = ("vllm", "llama.cpp", "sglang", "mindie", "vox-box", "stable-diffusion.cpp")


def model_reason(backend: str, meta: ModelMeta, kind: str) -> str | None:
    """Why `backend` cannot serve this model at all (format, kind), or None."""
    if backend == "custom":
        return None
    support = SUPPORT.get(backend)
    if support is None:
        return f"unknown backend `{backend}`"
    if meta.format not in support.formats:
        fmt = {"gguf": "GGUF files", "ctranslate2": "CTranslate2 models",
               "onnx": "ONNX models", "pytorch": "PyTorch checkpoints"}.get(
            meta.format, "safetensors models")
        return f"{support.label} does not serve {fmt}"
    if kind not in support.kinds:
        return f"{support.label} does not serve {kind} models"
    return None


def compatible_backends(meta: ModelMeta, kind: str) -> tuple[str, ...]:
    """Backends that can serve this model somewhere, preferred first."""
    return tuple(b for b in PREFERENCE if model_reason(b, meta, kind) is None)


def multi_node_reason(backend: str, gpu: GpuFacts) -> str | None:
    """Why `gpu` cannot take part in a replica of `backend` over several nodes, or None.
    The scheduler prefixes the node's name."""
    if backend == "mindie" and not gpu.device_ip:
        return (f"MindIE over several nodes needs each NPU's device IP from /etc/hccn.conf; "
                f"NPU {gpu.index} has none")
    return None


# what to do about multi_node_reason (hccn_tool sets a device's NIC address)
MULTI_NODE_HINT = ("set each NPU's address with `hccn_tool -i N -ip -s address IP netmask "
                   "MASK` (it writes `address_N=` to /etc/hccn.conf), then run `stack plan` "
                   "again")


def _cc(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def hardware_reason(backend: str, node: NodeFacts,
                    gpus: list[GpuFacts]) -> str | None:
    """Why `backend` cannot run on these GPUs of `node` (empty: CPU), or None. The
    scheduler prefixes the node's name."""
    support = SUPPORT.get(backend)
    if support is None:
        return None  # custom runs whatever its command runs
    os_name = node.os.lower()
    if os_name not in support.systems:
        return f"{support.label} does not run on {node.os}"
    if node.arch.lower() not in support.arches:
        return f"{support.label} does not run on {node.arch} CPUs"
    vendors = {g.vendor for g in gpus} or {"cpu"}
    if len(vendors) > 1:
        return f"one replica cannot mix GPU vendors ({', '.join(sorted(vendors))})"
    vendor = vendors.pop()
    if vendor not in support.vendors:
        what = "a CPU" if vendor == "cpu" else f"{vendor} GPUs"
        return f"{support.label} does not run on {what}"
    if vendor == "apple" and os_name != "darwin":
        return f"{support.label} needs macOS for Apple GPUs"
    if vendor == "nvidia" and support.min_cc is not None:
        for gpu in gpus:
            cc = _cc(gpu.compute_capability)
            if cc is not None and cc < support.min_cc:
                need = f"{support.min_cc[0]}.{support.min_cc[1]}"
                return (f"{support.label} needs compute capability {need}, GPU {gpu.index} "
                        f"has {gpu.compute_capability}")
    return None
