"""Model metadata from a Hugging Face `config.json`: parameters counted from the shapes.

Dense decoder layer (docs/estimate.md): `2*H*nh*hd + 2*H*kv*hd` (q, o, k, v) `+ 3*H*I` (gated
MLP) `+ 2*H` (norms), plus the biases and extra norms each architecture family has; MoE
layers hold `E` experts, shared experts and a router `H*E`; MLA attention (DeepSeek V2/V3)
has low-rank q and kv projections. Embeddings `V*H`, the output head another `V*H` unless
tied, and the final norm `H`. Vision towers of VLMs use a generic ViT count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stack.estimate.types import ModelMeta

_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "nomic_bert",
             "new", "modernbert", "camembert", "mpnet"}
# families whose MLP is up -> act -> down (no gate) and whose norms are LayerNorm (w + b)
_PLAIN_MLP = {"gpt2", "gpt_neox", "falcon", "opt", "phi", "starcoder2", "gpt_bigcode",
              "gptj", "bloom", "whisper", *_ENCODERS}
_QKV_BIAS = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl", "qwen2_audio"}
_QK_NORM = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2", "olmoe"}
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "whisper", *_ENCODERS}
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2,
                "float8_e4m3fn": 1, "int8": 1}


def _int(cfg: dict[str, Any], *keys: str, default: int = 0) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            return int(value)
    return default


@dataclass(frozen=True)
class _Shape:
    """The numbers of a decoder (or encoder) stack the formulas need."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    tied: bool


def _shape(cfg: dict[str, Any], model_type: str) -> _Shape:
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", "dim")
    heads = _int(cfg, "num_attention_heads", "n_head", "n_heads", "encoder_attention_heads")
    kv_default = 1 if cfg.get("multi_query") else heads
    kv = _int(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads", default=kv_default)
    head_dim = _int(cfg, "head_dim", default=hidden // heads if heads else 0)
    tied_default = model_type in _TIED_BY_DEFAULT
    tied = cfg.get("tie_word_embeddings", tied_default)
    return _Shape(
        model_type=model_type,
        hidden=hidden,
        layers=_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers",
                    "decoder_layers"),
        heads=heads,
        kv_heads=kv or heads,
        head_dim=head_dim,
        intermediate=_int(cfg, "intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim",
                          default=4 * hidden),
        vocab=_int(cfg, "vocab_size", "padded_vocab_size"),
        context=_int(cfg, "max_position_embeddings", "n_positions", "seq_length",
                     "max_sequence_length", "max_target_positions", default=2048),
        tied=bool(tied),
    )


def _attention_params(cfg: dict[str, Any], s: _Shape) -> int:
    h, nh, kv, hd = s.hidden, s.heads, s.kv_heads, s.head_dim
    if cfg.get("kv_lora_rank"):
        return _mla_params(cfg, s)
    params = 2 * h * nh * hd + 2 * h * kv * hd
    if s.model_type in _QKV_BIAS:
        params += nh * hd + 2 * kv * hd
    if cfg.get("attention_bias") or s.model_type in _PLAIN_MLP:
        params += nh * hd + 2 * kv * hd + h
    if s.model_type in _QK_NORM:
        params += 2 * hd
    return params


def _mla_params(cfg: dict[str, Any], s: _Shape) -> int:
    """DeepSeek multi-head latent attention: low-rank q (optional) and joint kv."""
    h, nh = s.hidden, s.heads
    nope, rope = _int(cfg, "qk_nope_head_dim"), _int(cfg, "qk_rope_head_dim")
    v_dim, kv_rank = _int(cfg, "v_head_dim", default=nope), _int(cfg, "kv_lora_rank")
    q_rank = _int(cfg, "q_lora_rank")
    q_out = nh * (nope + rope)
    q = h * q_rank + q_rank + q_rank * q_out if q_rank else h * q_out
    kv = h * (kv_rank + rope) + kv_rank + kv_rank * nh * (nope + v_dim)
    return q + kv + nh * v_dim * h


def _mlp_params(s: _Shape, intermediate: int) -> int:
    if s.model_type in _PLAIN_MLP:
        return 2 * s.hidden * intermediate + intermediate + s.hidden
    return 3 * s.hidden * intermediate


def _experts(cfg: dict[str, Any]) -> int:
    return _int(cfg, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _is_moe_layer(cfg: dict[str, Any], index: int) -> bool:
    if not _experts(cfg):
        return False
    if index < _int(cfg, "first_k_dense_replace"):
        return False
    if index in (cfg.get("mlp_only_layers") or []):
        return False
    step = _int(cfg, "decoder_sparse_step", "moe_layer_freq", default=1) or 1
    return (index + 1) % step == 0 if "decoder_sparse_step" in cfg else index % step == 0


def _moe_params(cfg: dict[str, Any], s: _Shape) -> tuple[int, int]:
    """(all params, params active per token) of one MoE feed-forward block."""
    experts = _experts(cfg)
    inter = _int(cfg, "moe_intermediate_size", default=s.intermediate)
    top_k = _int(cfg, "num_experts_per_tok", "moe_top_k", default=2)
    shared = _int(cfg, "n_shared_experts") * inter
    shared += _int(cfg, "shared_expert_intermediate_size")
    one = _mlp_params(s, inter)
    router = s.hidden * experts
    shared_params = _mlp_params(s, shared) if shared else 0
    if _int(cfg, "shared_expert_intermediate_size"):
        router += s.hidden  # the shared expert's gate
    return experts * one + shared_params + router, top_k * one + shared_params + router


def _norm_params(s: _Shape) -> int:
    if s.model_type in _PLAIN_MLP:
        return 4 * s.hidden  # two LayerNorms with bias
    if s.model_type.startswith("gemma2") or s.model_type.startswith("gemma3"):
        return 4 * s.hidden  # pre/post norms around attention and MLP
    return 2 * s.hidden


def _vision_params(cfg: dict[str, Any], text_hidden: int) -> int:
    """A generic ViT: layers of attention + MLP, patch embedding and a projector."""
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        return 0
    hv = _int(vc, "hidden_size", "embed_dim", "width")
    lv = _int(vc, "num_hidden_layers", "depth", "layers")
    if not hv or not lv:
        return 0
    ratio = vc.get("mlp_ratio")
    iv = _int(vc, "intermediate_size", default=int(hv * ratio) if ratio else 4 * hv)
    patch = _int(vc, "patch_size", default=14)
    layer = 4 * hv * hv + 4 * hv + 2 * hv * iv + iv + hv + 4 * hv
    return lv * layer + 3 * patch * patch * hv + hv * text_hidden + text_hidden


def _encoder_params(cfg: dict[str, Any], s: _Shape) -> int:
    h = s.hidden
    embeddings = (s.vocab + s.context + _int(cfg, "type_vocab_size", default=2)) * h + 2 * h
    layer = 4 * (h * h + h) + 4 * h + _mlp_params(s, s.intermediate)
    return embeddings + s.layers * layer + h * h + h  # + pooler


def _whisper_params(cfg: dict[str, Any], s: _Shape) -> int:
    d = s.hidden
    enc_l, dec_l = _int(cfg, "encoder_layers"), _int(cfg, "decoder_layers")
    enc_ffn = _int(cfg, "encoder_ffn_dim", default=4 * d)
    dec_ffn = _int(cfg, "decoder_ffn_dim", default=4 * d)
    attn = 4 * d * d + 3 * d  # k has no bias
    conv = _int(cfg, "num_mel_bins", default=80) * d * 3 + d + d * d * 3 + d
    pos = (_int(cfg, "max_source_positions", default=1500)
           + _int(cfg, "max_target_positions", default=448)) * d
    encoder = enc_l * (attn + 2 * d * enc_ffn + enc_ffn + d + 4 * d) + 2 * d
    decoder = dec_l * (2 * attn + 2 * d * dec_ffn + dec_ffn + d + 6 * d) + 2 * d
    return conv + pos + encoder + decoder + s.vocab * d


def _whisper_shape(cfg: dict[str, Any], s: _Shape, dtype_bytes: int) -> dict[str, int]:
    """What the Whisper estimate needs (as read from a CTranslate2 model.bin)."""
    return {"d_model": s.hidden, "decoder_layers": _int(cfg, "decoder_layers"),
            "source_positions": _int(cfg, "max_source_positions", default=1500),
            "target_positions": _int(cfg, "max_target_positions", default=448),
            "element_bytes": dtype_bytes}


@dataclass(frozen=True)
class ConfigCount:
    """Parameters counted from a config: all, active per token, and linear (quantizable)."""

    params: int
    active_params: int
    embedding_params: int


def count_params(cfg: dict[str, Any], s: _Shape) -> ConfigCount:
    """Parameters of the model described by `cfg` (text part `s`, plus a vision tower)."""
    embed = s.vocab * s.hidden * (1 if s.tied else 2)
    if s.model_type == "whisper":
        total = _whisper_params(cfg, s)
        return ConfigCount(total, total, s.vocab * s.hidden)
    if s.model_type in _ENCODERS:
        total = _encoder_params(cfg, s)
        return ConfigCount(total, total, s.vocab * s.hidden)
    attn, norms = _attention_params(cfg, s), _norm_params(s)
    total = active = 0
    for index in range(s.layers):
        if _is_moe_layer(cfg, index):
            mlp, mlp_active = _moe_params(cfg, s)
        else:
            mlp = mlp_active = _mlp_params(s, s.intermediate)
        total += attn + mlp + norms
        active += attn + mlp_active + norms
    final_norm = 2 * s.hidden if s.model_type in _PLAIN_MLP else s.hidden
    if s.model_type in _PLAIN_MLP and s.model_type in ("gpt2", "opt", "gpt_bigcode"):
        embed += s.context * s.hidden  # learned positions
    vision = _vision_params(cfg, s.hidden)
    rest = embed + final_norm + vision
    return ConfigCount(total + rest, active + rest, embed)


def _sliding(cfg: dict[str, Any], s: _Shape) -> tuple[int, int]:
    """(window, layers using it); (0, 0) when every layer attends to the full context."""
    window = _int(cfg, "sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return 0, 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return window, sum(1 for t in types if t == "sliding_attention")
    pattern = _int(cfg, "sliding_window_pattern")
    if s.model_type.startswith("gemma3") and pattern:
        return window, s.layers - s.layers // pattern
    if s.model_type.startswith("gemma2"):
        return window, (s.layers + 1) // 2
    return window, s.layers


# text-to-speech configs vox-box serves: Bark (`BarkModel`) and Dia, whose config.json has
# no architecture but a `data` table of audio token values
_TTS_ARCHES = ("BarkModel", "ForTextToSpeech", "ForTextToWaveform")
_DIA_AUDIO_KEYS = frozenset({"audio_bos_value", "audio_eos_value", "audio_pad_value",
                             "delay_pattern"})


def _kind(cfg: dict[str, Any], arch: str, model_type: str) -> str:
    if model_type == "whisper" or "SpeechSeq2Seq" in arch or "Whisper" in arch:
        return "speech-to-text"
    data = cfg.get("data")
    if any(t in arch for t in _TTS_ARCHES) or model_type in ("bark", "dia") or (
            isinstance(data, dict) and data.keys() >= _DIA_AUDIO_KEYS):
        return "text-to-speech"
    if arch.endswith("ForSequenceClassification"):
        return "rerank"
    # a bare `*Model` (no head) embeds; `GPT2LMHeadModel` ends in Model but generates
    bare = arch.endswith("Model") and "For" not in arch and "LMHead" not in arch
    if model_type in _ENCODERS or (bare and model_type not in ("llama", "qwen2")):
        return "embedding"
    if isinstance(cfg.get("vision_config"), dict) or ("ForConditionalGeneration" in arch \
            and "VL" in arch):
        return "vlm"
    return "llm"


def _dtype_bytes(cfg: dict[str, Any]) -> int:
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return _DTYPE_BYTES.get(name, 2)


def _quantized_bytes(cfg: dict[str, Any], count: ConfigCount, dtype_bytes: int) -> tuple[
        int, str | None]:
    """Weight bytes, honouring `quantization_config` (AWQ/GPTQ bits, fp8) for linear layers."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        return count.params * dtype_bytes, None
    method = str(q.get("quant_method") or q.get("quant_algo") or "quantized")
    bits = _int(q, "bits", "w_bit", "weight_bits", default=8 if "fp8" in method else 4)
    linear = count.params - count.embedding_params
    group = _int(q, "group_size", "q_group_size", default=128)
    scales = linear * 2 * 2 // max(group, 1) if bits < 8 else 0  # a scale and zero per group
    return linear * bits // 8 + scales + count.embedding_params * 2, f"{method}-{bits}bit"


def meta_from_config(
    config: dict[str, Any],
    source: str = "",
    *,
    weights_bytes: int | None = None,
    files_bytes: int = 0,
    format: str = "config-only",
    quantization: str | None = None,
    extra: dict[str, object] | None = None,
) -> ModelMeta:
    """ModelMeta from a config.json dict; `weights_bytes` from safetensors headers when known."""
    arch = str((config.get("architectures") or [config.get("model_type", "unknown")])[0])
    text = config.get("text_config")
    cfg: dict[str, Any] = {**config, **text} if isinstance(text, dict) else dict(config)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "").lower()
    s = _shape(cfg, model_type)
    count = count_params(cfg, s)
    dtype_bytes = _dtype_bytes(cfg)
    computed_bytes, computed_quant = _quantized_bytes(cfg, count, dtype_bytes)
    window, sliding_layers = _sliding(cfg, s)
    kv_dim_mla = (_int(cfg, "kv_lora_rank") + _int(cfg, "qk_rope_head_dim")
                  if cfg.get("kv_lora_rank") else 0)
    encoder_only = model_type in _ENCODERS
    if encoder_only:
        kv_per_token = 0
    elif kv_dim_mla:
        kv_per_token = s.layers * kv_dim_mla * 2
    else:
        kv_per_token = 2 * s.layers * s.kv_heads * s.head_dim * 2
    info: dict[str, object] = {
        "model_type": model_type,
        "intermediate_size": s.intermediate,
        "active_params": count.active_params,
        "experts": _experts(cfg),
        "experts_per_token": _int(cfg, "num_experts_per_tok"),
        "mla_kv_dim": kv_dim_mla,
        "sliding_window": window,
        "sliding_layers": sliding_layers,
        "encoder_only": encoder_only,
        "dtype": str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        **(_whisper_shape(cfg, s, dtype_bytes) if model_type == "whisper" else {}),
        **(extra or {}),
    }
    return ModelMeta(
        source=source,
        format=format,
        architecture=arch,
        kind=_kind(config, arch, model_type),
        params=count.params,
        weights_bytes=computed_bytes if weights_bytes is None else weights_bytes,
        layers=s.layers,
        hidden_size=s.hidden,
        attention_heads=s.heads,
        kv_heads=s.kv_heads,
        head_dim=s.head_dim,
        vocab_size=s.vocab,
        max_context=s.context,
        kv_bytes_per_token=kv_per_token,
        quantization=quantization or computed_quant,
        files_bytes=files_bytes,
        extra=info,
    )
