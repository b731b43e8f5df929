"""The metadata readers on real files: safetensors written here byte by byte, and the real
Gemma GGUF checked against the `gguf` package's own reader."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from gguf import GGUFReader

from stack.errors import SourceError
from stack.estimate import read_metadata
from stack.estimate.gguf_header import read_gguf_header
from stack.estimate.safetensors import read_safetensors

CONFIGS = Path(__file__).parent / "configs"


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]],
                       with_data: bool = True) -> int:
    """A real safetensors file: 8-byte length, JSON header, then the data bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (b"\0" * offset if with_data else b""))
    return offset


TENSORS = {
    "a.weight": ("F32", [2, 3], 24),
    "b.weight": ("BF16", [4, 4], 32),
    "c.weight": ("I8", [5], 5),
    "d.weight": ("F8_E4M3", [3, 2], 6),
    "e.bias": ("F16", [7], 14),
}


def test_safetensors_header_gives_exact_bytes_per_dtype(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    assert _write_safetensors(path, TENSORS) == 81
    totals = read_safetensors([path])
    assert totals.bytes_by_dtype == {"F32": 24, "BF16": 32, "I8": 5, "F8_E4M3": 6, "F16": 14}
    assert totals.elements_by_dtype == {"F32": 6, "BF16": 16, "I8": 5, "F8_E4M3": 6, "F16": 7}
    assert totals.bytes == 81 and totals.tensors == 5 and totals.main_dtype == "BF16"


def test_safetensors_weights_are_never_read(tmp_path: Path) -> None:
    # the header promises 40 GB of data the file does not have: only the header is read
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"w": ("BF16", [20_000, 1_000_000], 40_000_000_000)},
                       with_data=False)
    assert read_safetensors([path]).bytes == 40_000_000_000


def test_model_folder_uses_shard_headers_then_index_then_config(tmp_path: Path) -> None:
    shutil.copyfile(CONFIGS / "qwen2.5-7b-instruct.json", tmp_path / "config.json")
    only_config = read_metadata(str(tmp_path), tmp_path)
    assert only_config.format == "config-only"
    assert only_config.weights_bytes == only_config.params * 2  # bf16 from torch_dtype

    index = {"metadata": {"total_size": 15_231_233_024},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    from_index = read_metadata(str(tmp_path), tmp_path)
    assert from_index.format == "safetensors"
    assert from_index.weights_bytes == 15_231_233_024  # shards absent: the index total

    _write_safetensors(tmp_path / "model-00001-of-00002.safetensors",
                       {"a.weight": ("BF16", [1000, 1000], 2_000_000)}, with_data=False)
    _write_safetensors(tmp_path / "model-00002-of-00002.safetensors",
                       {"b.weight": ("F32", [10], 40)}, with_data=False)
    from_shards = read_metadata(str(tmp_path), tmp_path)
    assert from_shards.weights_bytes == 2_000_040
    assert from_shards.extra["bytes_by_dtype"] == {"BF16": 2_000_000, "F32": 40}
    assert from_shards.params == only_config.params  # shapes still come from config.json


def test_truncated_safetensors_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{")
    with pytest.raises(SourceError) as info:
        read_safetensors([path])
    assert "has no complete safetensors header" in info.value.message


def test_gguf_header_matches_the_gguf_package(gguf_model: Path) -> None:
    ours = read_gguf_header(gguf_model)
    theirs = GGUFReader(gguf_model)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert [t.n_bytes for t in ours.tensors] == [int(t.n_bytes) for t in theirs.tensors]
    assert ours.tensor_bytes == sum(int(t.n_bytes) for t in theirs.tensors)
    assert ours.fields["general.architecture"] == "gemma3"
    assert ours.fields["gemma3.block_count"] == theirs.fields["gemma3.block_count"].contents()
    assert ours.array_lengths["tokenizer.ggml.tokens"] == len(
        theirs.fields["tokenizer.ggml.tokens"].data)


def test_gguf_header_alone_is_enough(gguf_model: Path, tmp_path: Path) -> None:
    # the first 8 MiB hold the whole header (a range read of a remote file gets no more)
    head = tmp_path / "head.gguf"
    with gguf_model.open("rb") as f:
        head.write_bytes(f.read(8 * 1024 * 1024))
    assert read_gguf_header(head).tensor_bytes == read_gguf_header(gguf_model).tensor_bytes
    short = tmp_path / "short.gguf"
    short.write_bytes(head.read_bytes()[:4096])
    with pytest.raises(SourceError) as info:
        read_gguf_header(short)
    assert "cannot read the GGUF header" in info.value.message


def test_folder_with_a_gguf_and_projector_is_a_vlm(gguf_model: Path, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(gguf_model)
    assert read_metadata(str(tmp_path), tmp_path).kind == "llm"
    (tmp_path / "mmproj-model-f16.gguf").write_bytes(b"GGUF")
    meta = read_metadata(str(tmp_path), tmp_path)
    assert meta.kind == "vlm" and meta.architecture == "gemma3"


def test_empty_folder_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        read_metadata(str(tmp_path), tmp_path)
    assert "holds neither config.json nor a GGUF file" in info.value.message
    assert "config.json is enough" in info.value.hint


def test_diffusers_folder_is_an_image_model_for_stable_diffusion_cpp(sd_model: Path) -> None:
    """The random-weight SD 1.x tiny UNet (model_index.json; unet/, vae/, text_encoder/):
    kind image, every component's safetensors counted, served by stable-diffusion.cpp."""
    from stack.estimate.evaluation import evaluate
    from tests.schedule.cases_lib import load_stack

    shapes = json.loads((Path(__file__).parents[1] / "fixtures" /
                         "sd1-tiny-unet-shapes.json").read_text())
    elements = sum(_prod(shape) for tensors in shapes.values() for _, shape in tensors.values())
    meta = read_metadata(str(sd_model), sd_model.parent)
    assert (meta.kind, meta.format) == ("image", "safetensors")
    assert meta.architecture == "StableDiffusionPipeline"
    assert meta.weights_bytes == 2 * elements  # all float16
    spec, _ = load_stack(f'[stack]\nname = "lab"\n\n[models.sd]\nsource = "{sd_model}"\n')
    evaluation = evaluate("sd", spec.models["sd"], meta)
    assert (evaluation.kind, evaluation.backends) == ("image", ("stable-diffusion.cpp",))


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
