"""Turn a model source into ModelMeta: find its metadata files and read them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from stack.errors import SourceError
from stack.estimate.ctranslate2 import Variable, read_ct2_header
from stack.estimate.gguf_header import GgufHeader, read_gguf_header
from stack.estimate.model_config import meta_from_config
from stack.estimate.safetensors import WeightTotals, read_safetensors, read_safetensors_header
from stack.estimate.types import ModelMeta
from stack.sources import Source, fetch_metadata, parse_source

_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# llama.cpp: one full-attention layer every N layers in these SWA architectures
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
_GGUF_ENCODERS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                  "t5encoder", "modern-bert", "neo-bert"}
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
               15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
               20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
               25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
               30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4"}


def read_metadata(source: str, base_dir: Path) -> ModelMeta:
    """The metadata of the model at `source` (any form stack.toml accepts)."""
    parsed = parse_source(source)
    return read_path(fetch_metadata(parsed, base_dir), parsed.text, parsed)


def with_parts(meta: ModelMeta, name: str, parts: dict[str, str],
               base_dir: Path) -> ModelMeta:
    """`meta` with the files `models.NAME.components` loads beside the model (a VAE, text
    encoders) counted in its weights: from the controller for a `local://` model, asked of
    the hub for an `hf://` file; a part that is not there is an error naming the key."""
    from dataclasses import replace
    from posixpath import dirname, join

    from stack.sources import hub_file_size

    if not parts:
        return meta
    parsed = parse_source(meta.source)
    total = 0
    for role, rel in sorted(parts.items()):
        if parsed.scheme == "local":
            path = parsed.local_path(base_dir)
            found = (path.parent if path.is_file() else path) / rel
            if not found.is_file():
                raise SourceError(
                    f"`models.{name}.components.{role}` is `{rel}`, which is not beside "
                    f"the model on the controller ({found})",
                    hint="put the file beside the model file, or fix the path.")
            total += found.stat().st_size
        else:
            total += hub_file_size(replace(parsed, file=join(dirname(parsed.file or ""), rel)),
                                   rel)
    return replace(meta, weights_bytes=meta.weights_bytes + total,
                   files_bytes=meta.files_bytes + total)


def read_path(path: Path, source: str, parsed: Source | None = None) -> ModelMeta:
    """Metadata from a controller file or folder."""
    if path.is_file():
        if path.suffix == ".gguf":
            return meta_from_gguf(_gguf_parts(path), source)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").exists():
                checkpoint = _single_checkpoint(path, source)
                if checkpoint is not None:
                    return checkpoint
            return _from_folder(path.parent, source, [path])
        if path.name == "config.json":
            return _from_folder(path.parent, source, None)
        if path.suffix == ".onnx":
            return _onnx(path.parent, source, [path])
        raise SourceError(f"`{source}` is a file the estimator cannot read ({path.name})",
                          hint="point at a .gguf or .safetensors file, or a model folder "
                               "with config.json.")
    if not path.is_dir():
        raise SourceError(f"`{source}` does not exist ({path})", hint="check the path.")
    return _from_folder(path, source, None, parsed)


def _gguf_parts(first: Path) -> list[Path]:
    """All parts of a split GGUF (`-00001-of-00003.gguf`), else the file alone."""
    match = _SPLIT.search(first.name)
    if not match:
        return [first]
    total = int(match.group(2))
    stem = first.name[: match.start()]
    parts = [first.with_name(f"{stem}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise SourceError(f"split GGUF `{first.name}` misses {', '.join(missing)}",
                          hint="download every part of the split model.")
    return parts


def pick_gguf(folder: Path) -> Path | None:
    """The main GGUF of a folder: not a projector, the first part of a split, largest."""
    files = [p for p in folder.glob("*.gguf") if "mmproj" not in p.name.lower()]
    files = [p for p in files if not _SPLIT.search(p.name) or "-00001-of-" in p.name]
    return max(files, key=lambda p: (p.stat().st_size, p.name)) if files else None


def pick_mmproj(folder: Path) -> Path | None:
    """The vision projector beside a folder's GGUF (`mmproj*.gguf`), when there is one
    (several: None, stack.toml's `mmproj` names which)."""
    found = [p for p in folder.glob("*.gguf") if "mmproj" in p.name.lower()]
    return found[0] if len(found) == 1 else None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read `{path}`: {exc}",
                          hint="check that the file is valid JSON.") from exc
    if not isinstance(data, dict):
        raise SourceError(f"`{path}` is not a JSON object", hint="check the file.")
    return data


def _from_folder(folder: Path, source: str, shards: list[Path] | None,
                 parsed: Source | None = None) -> ModelMeta:
    config_path = folder / "config.json"
    if (folder / "model_index.json").exists():
        return _diffusion(folder, source)
    if any((folder / name).exists() for name in COSYVOICE_CONFIGS):
        return _cosyvoice(folder, source)
    if not config_path.exists():
        gguf = pick_gguf(folder)
        if gguf is not None:
            return meta_from_gguf(_gguf_parts(gguf), source)  # a vlm with an mmproj beside
        if _onnx_graphs(folder):
            return _onnx(folder, source, _onnx_graphs(folder))
        raise SourceError(f"`{source}` holds neither config.json nor a GGUF file ({folder})",
                          hint="point at a model folder (config.json is enough) or a .gguf file.")
    config = _load_json(config_path)
    if _is_ctranslate2(config):
        return _ctranslate2(folder, source, config, parsed)
    totals = _weights(folder, shards)
    onnx = _onnx_graphs(folder)
    if onnx and not (totals and totals.bytes) and not _index_total(folder):
        return _onnx(folder, source, onnx, config)
    extra: dict[str, object] = {}
    if totals is not None and totals.bytes:
        extra["bytes_by_dtype"] = dict(totals.bytes_by_dtype)
        fmt = "safetensors"
        weights: int | None = totals.bytes
        files = totals.bytes
    else:
        index_total = _index_total(folder)
        fmt = "safetensors" if index_total else "config-only"
        weights = index_total or None
        files = index_total or 0
    meta = meta_from_config(config, source, weights_bytes=weights, files_bytes=files,
                            format=fmt, extra=extra)
    if any(folder.glob("mmproj*")) and meta.kind == "llm":
        return _replace(meta, kind="vlm")
    return meta


def _weights(folder: Path, shards: list[Path] | None) -> WeightTotals | None:
    """Totals from the safetensors headers present (all shards, or None if any is missing)."""
    paths = shards if shards is not None else sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if shards is None and index.exists():
        names = sorted(set(_load_json(index).get("weight_map", {}).values()))
        paths = [folder / n for n in names]
        if not all(p.exists() for p in paths):
            return None
    return read_safetensors(paths) if paths else None


def _index_total(folder: Path) -> int:
    for index in sorted(folder.glob("*.safetensors.index.json")):
        total = _load_json(index).get("metadata", {}).get("total_size")
        if isinstance(total, int | float):
            return int(total)
    return 0


def _diffusion(folder: Path, source: str) -> ModelMeta:
    """Diffusers folders (model_index.json): weights are every component's safetensors."""
    files = sorted(folder.glob("*/*.safetensors")) + sorted(folder.glob("*.safetensors"))
    onnx = _onnx_graphs(folder)
    if onnx and not files:
        return _onnx(folder, source, onnx, kind="image")
    totals = read_safetensors(files) if files else WeightTotals()
    index = _load_json(folder / "model_index.json")
    return ModelMeta(
        source=source, format="safetensors" if files else "config-only",
        architecture=str(index.get("_class_name", "diffusers")), kind="image",
        params=totals.elements, weights_bytes=totals.bytes, layers=0, hidden_size=0,
        attention_heads=0, kv_heads=0, head_dim=0, vocab_size=0, max_context=0,
        kv_bytes_per_token=0, files_bytes=totals.bytes,
    )


# GGUF architectures of diffusion models (the converters of ComfyUI-GGUF and
# stable-diffusion.cpp write them): image generation, not LLMs. Those after `sdxl` hold the
# diffusion model alone; stable-diffusion.cpp needs their VAE and text encoders beside them
DIFFUSION_ARCHES = ("sd1", "sd2", "sdxl", "flux", "sd3", "aura", "wan", "ltxv", "hyvid",
                    "chroma", "lumina2", "qwen_image")
DIFFUSION_ONLY = DIFFUSION_ARCHES[3:]
# a single-file checkpoint's tensor names: SD 1.x/2.x/XL hold the UNet and the VAE
# (`model.diffusion_model.`, `first_stage_model.`); FLUX (`double_blocks.`) and SD3
# (`joint_blocks.`) files the diffusion model alone, with or without that prefix
_FULL_CHECKPOINT = ("model.diffusion_model.", "first_stage_model.")
_DIFFUSION_BLOCKS = {"double_blocks.": "flux", "joint_blocks.": "sd3"}
_FULL_TEXT_ENCODERS = (("conditioner.embedders.", "sdxl"), ("cond_stage_model.model.", "sd2"))


def _single_checkpoint(path: Path, source: str) -> ModelMeta | None:
    """A single-file diffusion checkpoint (no config.json beside it), or None."""
    names = [n for n in read_safetensors_header(path) if n != "__metadata__"]
    full = all(any(n.startswith(p) for n in names) for p in _FULL_CHECKPOINT)
    arch: str | None
    if full:  # by the text encoder: SDXL's two, SD 2.x's OpenCLIP, else SD 1.x's CLIP
        arch = next((a for prefix, a in _FULL_TEXT_ENCODERS for n in names
                     if n.startswith(prefix)), "sd1")
    else:
        arch = next((a for block, a in _DIFFUSION_BLOCKS.items() for n in names
                     if n.removeprefix("model.diffusion_model.").startswith(block)), None)
    if arch is None:
        return None
    totals = read_safetensors([path])
    return ModelMeta(
        source=source, format="safetensors", architecture=arch, kind="image",
        params=totals.elements, weights_bytes=totals.bytes, layers=0, hidden_size=0,
        attention_heads=0, kv_heads=0, head_dim=0, vocab_size=0, max_context=0,
        kv_bytes_per_token=0, files_bytes=path.stat().st_size,
        extra={"diffusion_only": not full},
    )


# ONNX exports (Optimum's `model.onnx`, or `onnx/model.onnx` beside variants such as
# `model_fp16.onnx` and `model_quantized.onnx`; diffusers' `unet/model.onnx`, ...) with
# their external data beside them: no catalogue backend serves them, a `custom` one can
_ONNX_DATA = ("{name}_data", "{name}.data", "weights.pb")


def _onnx_graphs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx")) + sorted(folder.glob("*/*.onnx"))


def _onnx_bytes(graph: Path) -> int:
    """A graph's file and its external data (`model.onnx_data`, `model.onnx.data`, a
    diffusers component's `weights.pb`)."""
    data = [graph.parent / pattern.format(name=graph.name) for pattern in _ONNX_DATA]
    return graph.stat().st_size + sum(p.stat().st_size for p in data if p.is_file())


def _onnx(folder: Path, source: str, graphs: list[Path], config: dict[str, Any] | None = None,
          kind: str | None = None) -> ModelMeta:
    """An ONNX model: its kind from config.json (or the caller), else `unknown` (stack.toml's
    `kind` says). Its weights: every component's graph for a diffusers pipeline, else the
    largest of the variants a server would load one of; on disk, all of them."""
    sizes = [_onnx_bytes(g) for g in graphs]
    weights = sum(sizes) if kind == "image" else max(sizes)
    if config is None and (folder / "config.json").exists():
        config = _load_json(folder / "config.json")
    if config is not None:
        meta = meta_from_config(config, source, weights_bytes=weights, files_bytes=sum(sizes),
                                format="onnx")
        return _replace(meta, kind=kind or meta.kind)
    return ModelMeta(
        source=source, format="onnx", architecture="onnx", kind=kind or "unknown", params=0,
        weights_bytes=weights, layers=0, hidden_size=0, attention_heads=0, kv_heads=0,
        head_dim=0, vocab_size=0, max_context=0, kv_bytes_per_token=0,
        files_bytes=sum(sizes))


# CosyVoice (text-to-speech, vox-box): a YAML config and PyTorch checkpoints, no config.json
COSYVOICE_CONFIGS = ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")


def _cosyvoice(folder: Path, source: str) -> ModelMeta:
    """A CosyVoice folder: text-to-speech, its weights the checkpoints beside the config
    (`*.pt`, `*.onnx`, `*.safetensors`); only its config: weights unknown (zero)."""
    files = [p for pattern in ("*.pt", "*.onnx", "*.safetensors") for p in folder.glob(pattern)]
    size = sum(p.stat().st_size for p in files)
    return ModelMeta(
        source=source, format="pytorch" if files else "config-only", architecture="cosyvoice",
        kind="text-to-speech", params=0, weights_bytes=size, layers=0, hidden_size=0,
        attention_heads=0, kv_heads=0, head_dim=0, vocab_size=0, max_context=0,
        kv_bytes_per_token=0, files_bytes=size,
    )


# what CTranslate2's Whisper converter writes into config.json (faster-whisper's models);
# a transformers config has `model_type` or `architectures` instead
_CT2_WHISPER_KEYS = ("alignment_heads", "suppress_ids", "lang_ids")


def _is_ctranslate2(config: dict[str, Any]) -> bool:
    return "model_type" not in config and "architectures" not in config and any(
        key in config for key in _CT2_WHISPER_KEYS)


def _ctranslate2(folder: Path, source: str, config: dict[str, Any],
                 parsed: Source | None) -> ModelMeta:
    """A CTranslate2 Whisper folder (faster-whisper's format: model.bin, config.json,
    tokenizer and vocabulary): speech-to-text, its shape from model.bin's header when the
    file is here, else only its size (asked of the hub)."""
    from stack.sources import hub_file_size

    weights = folder / "model.bin"
    shape: dict[str, int] = {}
    params = 0
    if weights.exists():
        size = weights.stat().st_size
        variables = read_ct2_header(weights)
        shape = _ct2_whisper_shape(variables)
        params = sum(v.n_bytes // v.element_bytes for v in variables.values() if v.dims)
    elif parsed is not None and parsed.scheme in ("hf", "modelscope"):
        size = hub_file_size(parsed, "model.bin")
    else:
        raise SourceError(f"`{source}` is a CTranslate2 model without model.bin ({folder})",
                          hint="copy the whole folder: model.bin, config.json and the "
                               "tokenizer files.")
    return ModelMeta(
        source=source, format="ctranslate2", architecture="whisper", kind="speech-to-text",
        params=params, weights_bytes=size, layers=0, hidden_size=shape.get("d_model", 0),
        attention_heads=0, kv_heads=0, head_dim=0, vocab_size=0, max_context=0,
        kv_bytes_per_token=0, files_bytes=size,
        extra={"alignment_heads": len(config.get("alignment_heads", [])), **shape},
    )


_DECODER_LAYER = re.compile(r"^decoder/layer_(\d+)/")


def _ct2_whisper_shape(variables: dict[str, Variable]) -> dict[str, int]:
    """What the Whisper estimate needs from model.bin (WHISPER_SHAPE_KEYS): the width, the
    decoder's layers, both position counts and the stored element size."""
    embeddings = variables.get("decoder/embeddings/weight")
    if embeddings is None or len(embeddings.dims) != 2:
        raise SourceError("model.bin has no `decoder/embeddings/weight` of two dimensions",
                          hint="point at a CTranslate2 Whisper model (faster-whisper's "
                               "format).")
    layers = {m.group(1) for name in variables if (m := _DECODER_LAYER.match(name))}

    def positions(name: str, default: int) -> int:
        found = variables.get(name)
        return found.dims[0] if found is not None and found.dims else default

    return {
        "d_model": embeddings.dims[1], "decoder_layers": len(layers),
        "source_positions": positions("encoder/position_encodings/encodings", 1500),
        "target_positions": positions("decoder/position_encodings/encodings", 448),
        "element_bytes": embeddings.element_bytes,
    }


def _replace(meta: ModelMeta, **changes: object) -> ModelMeta:
    from dataclasses import replace

    return replace(meta, **changes)  # type: ignore[arg-type]


def _num(fields: dict[str, object], key: str, default: int = 0) -> int:
    value = fields.get(key)
    if isinstance(value, list):
        return max((int(v) for v in value if isinstance(v, int | float)), default=default)
    return int(value) if isinstance(value, int | float) else default


def _per_layer(fields: dict[str, object], key: str, layers: int, default: int) -> list[int]:
    value = fields.get(key)
    if isinstance(value, list):
        return [int(v) if isinstance(v, int | float) else default for v in value][:layers]
    return [int(value) if isinstance(value, int | float) else default] * layers


def _gguf_kind(h: GgufHeader, arch: str) -> str:
    if str(h.fields.get("general.type", "")) == "mmproj" or arch == "clip":
        return "vlm-projector"
    if arch in DIFFUSION_ARCHES:
        return "image"
    pooling = h.fields.get(f"{arch}.pooling_type")
    if pooling == 4 or f"{arch}.classifier.output_labels" in h.fields:
        return "rerank"
    if arch in _GGUF_ENCODERS or (pooling is not None and pooling != 0):
        return "embedding"
    if arch == "whisper":
        return "speech-to-text"
    return "llm"


def meta_from_gguf(parts: list[Path], source: str) -> ModelMeta:
    """ModelMeta from a GGUF file (all parts of a split file)."""
    headers = [read_gguf_header(p) for p in parts]
    h = headers[0]
    f = h.fields
    arch = str(f.get("general.architecture", "unknown"))
    layers = _num(f, f"{arch}.block_count")
    hidden = _num(f, f"{arch}.embedding_length")
    heads = _num(f, f"{arch}.attention.head_count")
    kv_heads = _per_layer(f, f"{arch}.attention.head_count_kv", layers, heads)
    k_len = _num(f, f"{arch}.attention.key_length", hidden // heads if heads else 0)
    v_len = _num(f, f"{arch}.attention.value_length", k_len)
    # llama.cpp caches the compressed MLA latent (K only: one head of kv_lora_rank + rope)
    # only for GGUFs converted with `attn_k_b`/`attn_v_b`, which carry `key_length_mla`
    # (`is_mla()` in src/llama-hparams.cpp; no V cache: src/llama-kv-cache.cpp). Older
    # DeepSeek conversions (`attn_kv_b`) keep every head's K and V: ~70x more per token.
    mla = bool(_num(f, f"{arch}.attention.kv_lora_rank")) and (
        f"{arch}.attention.key_length_mla" in f
        or bool(_tensor_bytes(headers, "blk.0.attn_k_b.weight")))
    kind = _gguf_kind(h, arch)
    encoder = arch in _GGUF_ENCODERS or (kind in ("embedding", "rerank") and arch != "qwen3")
    if encoder or not layers:
        kv_per_token = 0
    else:
        kv_per_token = sum(n * (k_len + (0 if mla else v_len)) * 2 for n in kv_heads)
    window = _num(f, f"{arch}.attention.sliding_window")
    pattern = _SWA_PATTERN.get(arch, 0)
    sliding_layers = layers - layers // pattern if window and pattern else 0
    vocab = h.array_lengths.get("tokenizer.ggml.tokens") or _num(f, f"{arch}.vocab_size")
    file_type = _num(f, "general.file_type", -1)
    tensor_bytes = sum(x.tensor_bytes for x in headers)
    mmproj = sorted(p for p in parts[0].parent.glob("mmproj*.gguf"))
    return ModelMeta(
        source=source, format="gguf", architecture=arch,
        kind="vlm" if mmproj and kind == "llm" else kind,
        params=sum(x.n_elements for x in headers),
        weights_bytes=tensor_bytes,
        layers=layers, hidden_size=hidden, attention_heads=heads,
        kv_heads=max(kv_heads, default=0), head_dim=k_len,
        vocab_size=vocab, max_context=_num(f, f"{arch}.context_length", 2048),
        kv_bytes_per_token=kv_per_token,
        quantization=_FILE_TYPES.get(file_type),
        files_bytes=sum(p.stat().st_size for p in parts),
        extra={
            "k_length": k_len, "v_length": v_len, "kv_heads_per_layer": kv_heads,
            "sliding_window": window if sliding_layers else 0,
            "sliding_layers": sliding_layers, "encoder_only": encoder,
            "mla_kv_dim": max(kv_heads, default=0) * k_len if mla else 0,
            "kv_k_only": mla,
            "experts": _num(f, f"{arch}.expert_count"),
            "intermediate_size": _num(f, f"{arch}.feed_forward_length"),
            "token_embd_bytes": _tensor_bytes(headers, "token_embd.weight"),
            "tied_output": not _tensor_bytes(headers, "output.weight"),
            "output_bytes": _tensor_bytes(headers, "output.weight"),
            "mmproj_bytes": sum(p.stat().st_size for p in mmproj),
            "diffusion_only": arch in DIFFUSION_ONLY,
        },
    )


def _tensor_bytes(headers: list[GgufHeader], name: str) -> int:
    return next((t.n_bytes for h in headers for t in h.tensors if t.name == name), 0)
