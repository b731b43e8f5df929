"""Memory a replica needs, per backend. Every constant here is documented in docs/estimate.md.

Each `*_claim` function is pure: metadata, the layout (GPUs per node, nodes), the context
and the backend's options in; a Claim or a reason sentence out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stack.estimate.types import Claim, ModelMeta

MiB = 1024**2
GiB = 1024**3

# vLLM
VLLM_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
VLLM_BATCHED_TOKENS = 8192  # default max_num_batched_tokens (chunked prefill)
VLLM_MAX_SEQS = 256  # default max_num_seqs: logits rows in the profile run
VLLM_CUDA_GRAPHS = 512 * MiB
VLLM_NON_TORCH = 256 * MiB  # CUDA context share, cuBLAS workspace
VLLM_NCCL = 256 * MiB  # extra when TP * PP > 1
VLLM_RAM = 4 * GiB  # the Python process, tokenizer, pinned buffers
# SGLang
SGLANG_UTILIZATION = 0.88  # default mem_fraction_static
# llama.cpp
LLAMA_CUDA_OVERHEAD = 250 * MiB  # CUDA/ROCm context and cuBLAS per GPU (gguf-parser)
LLAMA_CPU_OVERHEAD = 64 * MiB  # the process, libraries and tokenizer tables (measured)
LLAMA_RPC_OVERHEAD = 8 * MiB  # an idle ggml-rpc-server (measured: 5.6 MiB RSS)
LLAMA_UBATCH = 512
LLAMA_PARALLEL = 4  # llama-server default slots (n_seq_max)
LLAMA_PAD = 256  # KV cells are padded to this
LLAMA_MIN_OFFLOAD = 0.5  # partial offload only when at least half the layers fit
# bytes per element of each llama.cpp KV cache type
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}
# the other backends: weights * factor + fixed overhead
SIMPLE_RULES: dict[str, tuple[float, int]] = {
    "vox-box": (1.2, 1 * GiB),
    "custom": (1.2, 1 * GiB),
}
# stable-diffusion.cpp: the VAE decoder's compute buffer per output pixel (f32; the
# AutoencoderKL decoder SD 1.x/2.x/XL and FLUX share, ch 128), measured with sd-cli 0.4.7
# -v on CPU: "vae compute buffer size" 26.00 MB at 64x64 and 104.00 MB at 128x128, 6,656
# bytes a pixel both times (1.7 GB at 512x512, 7.0 GB at 1024x1024)
SD_VAE_BYTES_PER_PIXEL = 6656
# `--vae-tiling` decodes tiles of 32x32 latents: 256x256 pixels at a time
SD_VAE_TILE = 256
# the image side a diffusion model is claimed for: its native resolution, by the
# architecture the estimator read (diffusers pipeline class, GGUF architecture, single
# file); anything else 1024
SD_IMAGE_SIDE = {
    "StableDiffusionPipeline": 512, "sd1": 512,
    "StableDiffusion2Pipeline": 768, "sd2": 768,
}
SD_DEFAULT_SIDE = 1024
# the diffusion model's own activations and the runtime beyond weights and VAE decoding
# (measured on the tiny test UNet at 64x64: 67 MB of RSS over the weights; a full-size
# UNet or DiT at its native size takes more, and is not measured here)
SD_OVERHEAD = 1 * GiB
# Whisper on vox-box (faster-whisper, CTranslate2). Measured with vox-box 0.0.21 on CPU,
# tiny.en (real) and a random-weight model of Whisper small's shape, one 6.5 s clip:
# - CTranslate2 computes in float32 on a CPU: a float16 model.bin's weights double (its
#   own warning says so); int8 ones stay int8. On a GPU they stay as stored.
# - the process besides the weights (Python, torch, the tokenizer): 451 and 483 MB idle
WHISPER_RUNTIME = 512 * MiB
# - decoding keeps each hypothesis's self-attention K and V for every decoder layer up to
#   the longest output (target positions) and one cross-attention K and V over the encoder
#   frames (source positions); faster-whisper decodes 5 hypotheses (beam_size and best_of
#   both default to 5). Peak over idle: 147 MB (tiny.en), 326 MB (small's shape)
WHISPER_HYPOTHESES = 5
WHISPER_WORK = 128 * MiB  # decoding beyond those caches: audio, features, encoder
# Claim = weights + runtime + caches + work: 868 MB for tiny.en (peak RSS 749 MB), 1.91 GB
# for small's shape (peak 1.79 GB). A model.bin the controller has not read (a hub repo
# outside its cache) is given the shape of the largest official Whisper whose parameters
# its size could hold at one byte each (width, decoder layers, parameters)
WHISPER_SHAPES = ((384, 4, 39_000_000), (512, 6, 74_000_000), (768, 12, 244_000_000),
                  (1024, 24, 769_000_000), (1280, 32, 1_550_000_000))
MINDIE_OVERHEAD = 3 * GiB
MINDIE_UTILIZATION = 0.9


def gib(n: float) -> str:
    """`12.3 GiB` (or MiB below 1 GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _ceil_div(n: int, d: int) -> int:
    """n / d rounded up (0 when d is 0: nothing to split)."""
    return -(-n // d) if d > 0 else 0


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _extra_int(meta: ModelMeta, key: str) -> int:
    value = meta.extra.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def kv_tokens_bytes(meta: ModelMeta, per_token: float, context: int, window_cells: int) -> int:
    """KV bytes for `context` tokens when sliding-window layers keep `window_cells`."""
    if not meta.layers or not per_token:
        return 0
    sliding = _extra_int(meta, "sliding_layers")
    per_layer = per_token / meta.layers
    full = (meta.layers - sliding) * per_layer * context
    return int(full + sliding * per_layer * min(context, window_cells))


# -- vLLM and SGLang --------------------------------------------------------------------


@dataclass(frozen=True)
class GpuOptions:
    """Options of GPU-sharded backends (vLLM, SGLang, MindIE)."""

    utilization: float
    backend: str = "vllm"


def tp_reason(meta: ModelMeta, tp: int) -> str | None:
    """Why tensor parallelism `tp` cannot shard this model, or None."""
    if tp < 1:
        return f"{meta.architecture} needs a GPU with this backend"
    if meta.attention_heads and meta.attention_heads % tp:
        return f"TP {tp} does not divide {meta.attention_heads} attention heads"
    kv = meta.kv_heads
    if kv and not _extra_int(meta, "mla_kv_dim") and kv % tp and tp % kv:
        return f"TP {tp} and {kv} KV heads do not divide one another"
    return None


def vllm_kv_per_token(meta: ModelMeta, tp: int) -> int:
    """KV bytes per token per GPU under TP (bf16/fp16 cache)."""
    if meta.extra.get("encoder_only") or not meta.layers:
        return 0
    mla = _extra_int(meta, "mla_kv_dim")
    if mla:
        return meta.layers * mla * 2  # the latent is replicated on every TP rank
    kv_per_gpu = max(1, meta.kv_heads // tp)
    return 2 * meta.layers * kv_per_gpu * meta.head_dim * 2


def _serve_weight_bytes(meta: ModelMeta) -> int:
    """Weights as the GPU holds them: float32 checkpoints are served in half precision."""
    if str(meta.extra.get("dtype", "")) in ("float32", "float") and not meta.quantization:
        return meta.weights_bytes // 2
    return meta.weights_bytes


def vllm_claim(meta: ModelMeta, context: int, tp: int, nodes: int,
               gpu_memory_bytes: int | None, opts: GpuOptions) -> Claim | str:
    """vLLM / SGLang: weights/TP/PP + one full-context request of KV + activation peak +
    CUDA graphs + non-torch memory, checked against `utilization` of each GPU."""
    reason = tp_reason(meta, tp)
    if reason:
        return reason
    shards = tp * nodes
    weights = _serve_weight_bytes(meta) // shards
    per_token = vllm_kv_per_token(meta, tp) / nodes
    window = _extra_int(meta, "sliding_window")
    kv = kv_tokens_bytes(meta, per_token, context, window or context)
    inter = _extra_int(meta, "intermediate_size") or 4 * meta.hidden_size
    tokens = min(VLLM_BATCHED_TOKENS, max(context, 1))
    activation = tokens * (3 * inter // tp + 4 * meta.hidden_size) * 2
    activation += VLLM_MAX_SEQS * meta.vocab_size * 4 // tp
    overhead = VLLM_CUDA_GRAPHS + VLLM_NON_TORCH + (VLLM_NCCL if shards > 1 else 0)
    need = weights + kv + activation + overhead
    detail = (f"weights {gib(weights)} + KV {gib(kv)} ({context} tokens) + activations "
              f"{gib(activation)} + graphs/runtime {gib(overhead)} per GPU, TP {tp}"
              + (f" x PP {nodes}" if nodes > 1 else ""))
    if gpu_memory_bytes is not None:
        budget = int(gpu_memory_bytes * opts.utilization)
        if need > budget:
            return (f"needs {gib(need)} per GPU with TP {tp}"
                    + (f" over {nodes} nodes" if nodes > 1 else "")
                    + f", {opts.utilization:g} x {gib(gpu_memory_bytes)} = {gib(budget)} available")
    return Claim(backend=opts.backend, gpus=tp, nodes=nodes, vram_bytes_per_gpu=need,
                 ram_bytes=VLLM_RAM, disk_bytes=meta.files_bytes, detail=detail)


# -- llama.cpp --------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaOptions:
    """The llama-server flags that change memory, read from the model's args."""

    cache_k: str = "f16"
    cache_v: str = "f16"
    ubatch: int = LLAMA_UBATCH
    parallel: int = LLAMA_PARALLEL
    flash_attn: bool = True
    swa_full: bool = False
    gpu_layers: int | None = None  # `-ngl N` (llama.cpp's count: N - 1 layers + output)


def llama_options(args: list[str]) -> LlamaOptions:
    """LlamaOptions from llama-server arguments (`-ctk q8_0`, `--cache-type-v=q4_0`, ...)."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        takes = {"-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-ub", "--ubatch-size",
                 "-np", "--parallel", "-fa", "--flash-attn", *NGL_FLAGS}
        if name in takes:
            if eq:
                values[name] = inline
            elif i + 1 < len(args):
                values[name] = args[i + 1]
                i += 1
        else:
            flags.add(arg)
        i += 1

    def pick(*names: str) -> str | None:
        return next((values[n] for n in names if n in values), None)

    def number(default: int, *names: str) -> int:
        text = pick(*names)
        return int(text) if text and text.isdigit() else default

    fa = (pick("-fa", "--flash-attn") or "auto").lower()
    return LlamaOptions(
        cache_k=(pick("-ctk", "--cache-type-k") or "f16").lower(),
        cache_v=(pick("-ctv", "--cache-type-v") or "f16").lower(),
        ubatch=number(LLAMA_UBATCH, "-ub", "--ubatch-size"),
        parallel=number(LLAMA_PARALLEL, "-np", "--parallel"),
        flash_attn=fa not in ("off", "0", "false", "disabled"),
        swa_full="--swa-full" in flags,
        gpu_layers=_ngl(pick(*NGL_FLAGS)),
    )


NGL_FLAGS = ("-ngl", "--n-gpu-layers", "--gpu-layers")


def _ngl(text: str | None) -> int | None:
    """`-ngl`'s value: a count, `all` or a negative number (every layer), `auto`: None."""
    if text is None or text.lower() == "auto":
        return None
    if text.lower() == "all" or text.startswith("-"):
        return 1 << 30
    return int(text) if text.isdigit() else None


def gpu_layer_range(offload: str, gpu_layers: int | None, layers: int) -> tuple[int, int]:
    """(fewest, most) of the model's `layers` allowed on accelerators.

    `-ngl N` wins: llama.cpp offloads the last N of `layers + 1` slots, the output layer
    being the last one (`load_tensors` in src/llama-model.cpp), so N - 1 repeating layers.
    Else `offload`: `none` 0, `full` all, `auto` all or down to LLAMA_MIN_OFFLOAD of them.
    """
    if gpu_layers is not None:
        n = min(max(gpu_layers - 1, 0), layers)
        return n, n
    if offload == "none":
        return 0, 0
    if offload == "full":
        return layers, layers
    return min(layers, math.ceil(layers * LLAMA_MIN_OFFLOAD)), layers


@dataclass(frozen=True)
class LlamaBreakdown:
    """The parts of a llama.cpp replica's memory."""

    weights: int
    kv: int
    compute: int
    output: int


def llama_breakdown(meta: ModelMeta, context: int, opts: LlamaOptions) -> LlamaBreakdown:
    """Tensor bytes, KV cache (SWA layers keep n_swa*n_seq + n_ubatch cells), compute buffer
    (activations of one ubatch + attention mask or KQ) and output (logits) buffer."""
    cells = _pad(context, LLAMA_PAD)
    window = _extra_int(meta, "sliding_window")
    swa_cells = cells
    if window and not opts.swa_full:
        swa_cells = min(cells, _pad(window * opts.parallel + opts.ubatch, LLAMA_PAD))
    kv_f16 = meta.kv_bytes_per_token  # f16 K and V, half each
    k_bytes, v_bytes = CACHE_TYPE_BYTES.get(opts.cache_k, 2), CACHE_TYPE_BYTES.get(opts.cache_v, 2)
    # f16 bytes per token -> the cache types': K and V half each, or K alone (MLA)
    cache = k_bytes / 2 if meta.extra.get("kv_k_only") else (k_bytes + v_bytes) / 4
    kv = kv_tokens_bytes(meta, kv_f16 * cache, cells, swa_cells)
    inter = _extra_int(meta, "intermediate_size") or 4 * meta.hidden_size
    compute = opts.ubatch * (3 * inter + 6 * meta.hidden_size) * 4
    if opts.flash_attn:
        compute += cells * opts.ubatch * 2  # f16 mask
    else:
        compute += cells * opts.ubatch * max(meta.attention_heads, 1) * 4  # f32 KQ
    output = meta.vocab_size * opts.parallel * 4
    return LlamaBreakdown(meta.weights_bytes, kv, compute, output)


def llama_claim(meta: ModelMeta, context: int, gpus: int, nodes: int,
                gpu_memory_bytes: int | None, opts: LlamaOptions,
                offload: str = "auto") -> Claim | str:
    """llama.cpp: CPU (gpus=0, all in RAM), or the layers over the GPUs of every node (RPC
    workers when nodes > 1). Without `gpu_memory_bytes` the claim of every layer on the
    GPUs, saying how far the layers may stay on the CPU (the scheduler decides); with it,
    a partial offload in whole layers when the GPUs are too small."""
    b = llama_breakdown(meta, context, opts)
    layers = max(meta.layers, 0)
    embd, head = _embedding_and_head(meta)
    in_layers = b.weights - embd - (0 if meta.extra.get("tied_output") else head) + b.kv
    if gpus == 0:
        fixed = b.compute + b.output + LLAMA_CPU_OVERHEAD
        per_node = (b.weights + b.kv) // nodes + fixed
        return Claim(backend="llama.cpp", gpus=0, nodes=nodes, vram_bytes_per_gpu=0,
                     ram_bytes=per_node, disk_bytes=meta.files_bytes, layers=layers,
                     layer_bytes=_ceil_div(in_layers, layers),
                     device_bytes=b.compute + LLAMA_RPC_OVERHEAD, output_bytes=head,
                     main_bytes=embd + fixed - b.compute - LLAMA_RPC_OVERHEAD,
                     detail=f"RAM: weights {gib(b.weights)} + KV {gib(b.kv)} ({context} tokens)"
                            f" + compute {gib(b.compute)} + output {gib(b.output)} + runtime "
                            f"{gib(LLAMA_CPU_OVERHEAD)}" + (f", over {nodes} nodes"
                                                          if nodes > 1 else ""))
    low, high = gpu_layer_range(offload, opts.gpu_layers, layers)
    if high == 0:
        return ("every layer stays on the CPU (" + ("`-ngl` in `args`"
                if opts.gpu_layers is not None else '`offload = "none"`') + ")")
    devices = gpus * nodes
    on_gpu = in_layers + head - b.kv
    per_gpu = (in_layers + head) // devices + b.compute + LLAMA_CUDA_OVERHEAD
    detail = (f"weights {gib(on_gpu)} + KV {gib(b.kv)} ({context} tokens) over {devices} GPU(s)"
              f", + compute {gib(b.compute)} + runtime {gib(LLAMA_CUDA_OVERHEAD)} per GPU")
    full = Claim(backend="llama.cpp", gpus=gpus, nodes=nodes, vram_bytes_per_gpu=per_gpu,
                 ram_bytes=embd + b.output + LLAMA_CPU_OVERHEAD, disk_bytes=meta.files_bytes,
                 detail=detail, layers=layers, layer_bytes=_ceil_div(in_layers, layers),
                 device_bytes=b.compute + LLAMA_CUDA_OVERHEAD, cpu_bytes=b.compute,
                 gpu_layers=(0, 0) if low == layers else (low, high), output_bytes=head)
    if gpu_memory_bytes is None or (per_gpu <= gpu_memory_bytes and high == layers):
        return full
    return partial_claim(full, gpu_memory_bytes)


def partial_claim(full: Claim, gpu_memory_bytes: int | None) -> Claim | str:
    """The claim with as many whole layers on each GPU as fit in `gpu_memory_bytes` (all
    that `full.gpu_layers` allows without it), the rest in the main node's RAM."""
    low, high = full.offload_range()
    devices = full.gpus * full.nodes
    if gpu_memory_bytes is None or full.layer_bytes <= 0:
        per_device = per_head = high
    else:  # whole layers; the last device also holds the output head
        room = gpu_memory_bytes - full.device_bytes
        per_device = max(0, room) // full.layer_bytes
        per_head = max(0, room - full.output_bytes) // full.layer_bytes
    fit = min(high, per_device * (devices - 1) + per_head)
    if fit < max(low, 1):
        short = ("half" if low < high else "all of them (`offload = \"full\"`)"
                 if high == full.layers else f"the {low} `-ngl` asks")
        return (f"needs {gib(full.vram_bytes_per_gpu)} per GPU for all {full.layers} layers "
                f"with {devices} GPU(s); {gib(gpu_memory_bytes or 0)} holds {per_device} layers "
                f"per GPU, {fit} in all, fewer than {short}")
    on_head = min(per_head, fit)
    most = max(min(per_device, fit - on_head) * full.layer_bytes,
               on_head * full.layer_bytes + full.output_bytes) + full.device_bytes
    on_cpu = full.layers - fit
    return Claim(backend=full.backend, gpus=full.gpus, nodes=full.nodes,
                 vram_bytes_per_gpu=most,
                 ram_bytes=full.ram_bytes + (full.cpu_bytes + on_cpu * full.layer_bytes
                                             if on_cpu else 0),
                 disk_bytes=full.disk_bytes,
                 detail=f"partial offload: {fit}/{full.layers} layers on {devices} GPU(s), "
                        f"{on_cpu} in the main node's RAM; {full.detail}")


def _embedding_and_head(meta: ModelMeta) -> tuple[int, int]:
    """(input token embedding, output head) bytes of a GGUF. llama.cpp keeps the embedding
    in host memory and puts the head on the device of the output layer; a tied head is a
    copy of the embedding made there (TENSOR_DUPLICATED in src/llama-model.cpp)."""
    embd = _extra_int(meta, "token_embd_bytes")
    head = embd if meta.extra.get("tied_output") else _extra_int(meta, "output_bytes")
    return embd, head


# -- the others -------------------------------------------------------------------------


def mindie_claim(meta: ModelMeta, context: int, tp: int, gpu_memory_bytes: int | None
                 ) -> Claim | str:
    """MindIE on Ascend: weights/TP + one full-context request of KV + 3 GiB runtime; `tp`
    is the world size, every NPU of every node when a replica spans nodes."""
    reason = tp_reason(meta, tp)
    if reason:
        return reason
    weights = meta.weights_bytes // tp
    kv = kv_tokens_bytes(meta, vllm_kv_per_token(meta, tp), context, context)
    need = weights + kv + MINDIE_OVERHEAD
    if gpu_memory_bytes is not None and need > gpu_memory_bytes * MINDIE_UTILIZATION:
        return f"needs {gib(need)} per NPU with TP {tp}, {gib(gpu_memory_bytes)} per NPU"
    return Claim(backend="mindie", gpus=tp, nodes=1, vram_bytes_per_gpu=need,
                 ram_bytes=VLLM_RAM, disk_bytes=meta.files_bytes,
                 detail=f"weights {gib(weights)} + KV {gib(kv)} + runtime {gib(MINDIE_OVERHEAD)}")


def diffusion_claim(meta: ModelMeta, args: list[str], gpus: int,
                    gpu_memory_bytes: int | None) -> Claim | str:
    """stable-diffusion.cpp: every weight (diffusion model, VAE, text encoders) + the VAE
    decoding an image of the model's native size (or one tile with `--vae-tiling`) + the
    runtime, on one device."""
    side = SD_IMAGE_SIDE.get(meta.architecture, SD_DEFAULT_SIDE)
    tiled = "--vae-tiling" in args
    vae = SD_VAE_BYTES_PER_PIXEL * (SD_VAE_TILE ** 2 if tiled else side * side)
    detail = (f"weights {gib(meta.weights_bytes)} + VAE decoding "
              f"{'a tile' if tiled else f'{side}x{side}'} {gib(vae)} + {gib(SD_OVERHEAD)}")
    return _one_device("stable-diffusion.cpp", meta, meta.weights_bytes + vae + SD_OVERHEAD,
                       detail, gpus, gpu_memory_bytes)


def whisper_claim(meta: ModelMeta, gpus: int, gpu_memory_bytes: int | None) -> Claim | str:
    """faster-whisper (vox-box): the weights as the device holds them + the decoding caches
    of every hypothesis + the runtime, on one device."""
    width, layers = _extra_int(meta, "d_model"), _extra_int(meta, "decoder_layers")
    stored = _extra_int(meta, "element_bytes")
    assumed = not (width and layers and stored)
    if assumed:  # the largest official shape the file's size could hold, stored in 16 bits
        width, layers, _ = next((s for s in reversed(WHISPER_SHAPES)
                                 if s[2] <= meta.weights_bytes), WHISPER_SHAPES[0])
        stored = 2
    element = 4 if gpus == 0 or stored == 4 else 2  # CTranslate2's compute type
    weights = meta.weights_bytes * element // stored if stored >= 2 else meta.weights_bytes
    target = _extra_int(meta, "target_positions") or 448
    source = _extra_int(meta, "source_positions") or 1500
    caches = layers * 2 * width * element * (WHISPER_HYPOTHESES * target + source)
    need = weights + caches + WHISPER_WORK + WHISPER_RUNTIME
    detail = (f"weights {gib(weights)} + decoding caches {gib(caches)} "
              f"({WHISPER_HYPOTHESES} hypotheses, {layers} layers x {width}"
              f"{', shape assumed from the size' if assumed else ''}) + "
              f"{gib(WHISPER_WORK + WHISPER_RUNTIME)}")
    return _one_device("vox-box", meta, need, detail, gpus, gpu_memory_bytes)


def simple_claim(backend: str, meta: ModelMeta, gpus: int, gpu_memory_bytes: int | None
                 ) -> Claim | str:
    """vox-box, custom: weights x factor + overhead on one device."""
    factor, overhead = SIMPLE_RULES[backend]
    detail = f"weights {gib(meta.weights_bytes)} x {factor:g} + {gib(overhead)}"
    return _one_device(backend, meta, int(meta.weights_bytes * factor) + overhead, detail,
                       gpus, gpu_memory_bytes)


def _one_device(backend: str, meta: ModelMeta, need: int, detail: str, gpus: int,
                gpu_memory_bytes: int | None) -> Claim | str:
    """A replica of `need` bytes on one GPU (or the CPU's RAM), or why not."""
    if gpus > 1:
        return f"{backend} runs a replica on one GPU, not {gpus}"
    if gpus == 0:
        return Claim(backend=backend, gpus=0, nodes=1, vram_bytes_per_gpu=0, ram_bytes=need,
                     disk_bytes=meta.files_bytes, detail="RAM: " + detail)
    if gpu_memory_bytes is not None and need > gpu_memory_bytes:
        return f"needs {gib(need)} on one GPU, {gib(gpu_memory_bytes)} available"
    return Claim(backend=backend, gpus=1, nodes=1, vram_bytes_per_gpu=need, ram_bytes=2 * GiB,
                 disk_bytes=meta.files_bytes, detail=detail)
