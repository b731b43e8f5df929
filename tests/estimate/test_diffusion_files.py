"""Diffusion models in the files stable-diffusion.cpp loads are read as image models (a FLUX
GGUF was taken for an LLM, a single-file SD checkpoint was refused); a diffusion model that
comes alone needs its `components`, whose files count in its weights and are uploaded with
a `local://` model file."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from agent.assignment import Assignment, Instance
from stack.apply.targets import model_uploads
from stack.config import load_text
from stack.errors import EstimateError, SourceError
from stack.estimate import evaluate
from stack.estimate.read import read_path, with_parts


def _safetensors(path: Path, names: list[str]) -> Path:
    header = {n: {"dtype": "F16", "shape": [4, 4], "data_offsets": [32 * i, 32 * (i + 1)]}
              for i, n in enumerate(names)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 32 * len(names))
    return path


def _gguf(path: Path, arch: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((8, 8), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _model(components: str = "") -> tuple[str, object]:
    text = f'[models.flux]\nsource = "local://flux/flux1.gguf"\n{components}'
    return "flux", load_text(text).models["flux"]


def test_a_flux_gguf_is_an_image_model_that_comes_alone(tmp_path: Path) -> None:
    meta = read_path(_gguf(tmp_path / "flux1.gguf", "flux"), "local://flux1.gguf")
    assert (meta.kind, meta.architecture, meta.extra["diffusion_only"]) == ("image", "flux",
                                                                              True)


def test_single_file_checkpoints_are_image_models(tmp_path: Path) -> None:
    full = _safetensors(tmp_path / "v1-5.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])
    meta = read_path(full, "local://v1-5.safetensors")
    assert (meta.kind, meta.architecture, meta.extra["diffusion_only"]) == (
        "image", "sd1", False)
    assert meta.weights_bytes == 3 * 32
    alone = _safetensors(tmp_path / "flux1-dev.safetensors", [
        "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"])
    meta = read_path(alone, "local://flux1-dev.safetensors")
    assert (meta.kind, meta.architecture, meta.extra["diffusion_only"]) == ("image", "flux",
                                                                              True)


def test_another_lone_safetensors_file_is_still_refused(tmp_path: Path) -> None:
    lone = _safetensors(tmp_path / "weights.safetensors", ["encoder.layer.0.weight"])
    with pytest.raises(SourceError):
        read_path(lone, "local://weights.safetensors")


def test_a_diffusion_model_alone_needs_its_text_encoders(tmp_path: Path) -> None:
    meta = read_path(_gguf(tmp_path / "flux1.gguf", "flux"), "local://flux/flux1.gguf")
    name, model = _model()
    with pytest.raises(EstimateError) as err:
        evaluate(name, model, meta)  # type: ignore[arg-type]
    assert err.value.message == ("`models.flux.source` is a flux diffusion model alone: "
                                 "stable-diffusion.cpp needs its text encoders and VAE "
                                 "beside it")
    assert "components" in (err.value.hint or "")


def test_components_count_in_the_weights_and_travel_with_the_model(tmp_path: Path) -> None:
    folder = tmp_path / "flux"
    folder.mkdir()
    main = _gguf(folder / "flux1.gguf", "flux")
    (folder / "ae.safetensors").write_bytes(b"v" * 1000)
    (folder / "clip_l.safetensors").write_bytes(b"c" * 2000)
    (folder / "t5xxl.safetensors").write_bytes(b"t" * 4000)
    parts = {"vae": "ae.safetensors", "clip_l": "clip_l.safetensors",
             "t5xxl": "t5xxl.safetensors"}
    name, model = _model('components = { vae = "ae.safetensors", clip_l = '
                         '"clip_l.safetensors", t5xxl = "t5xxl.safetensors" }\n')
    meta = read_path(main, "local://flux/flux1.gguf")
    counted = with_parts(meta, name, parts, tmp_path)
    assert counted.weights_bytes == meta.weights_bytes + 7000
    assert evaluate(name, model, counted).kind == "image"  # type: ignore[arg-type]
    with pytest.raises(SourceError) as err:
        with_parts(meta, name, {"vae": "missing.safetensors"}, tmp_path)
    assert err.value.message.startswith("`models.flux.components.vae` is `missing.safetensors`")

    inst = Instance.model_validate({
        "id": "flux-0", "model": "flux", "kind": "image", "source": "local://flux/flux1.gguf",
        "model_path": "/opt/stack/models/flux/flux1.gguf", "backend": "stable-diffusion.cpp",
        "runtime_path": "/sd", "port": 40000, "components": parts})
    uploads = model_uploads(Assignment(node="n", instances=[inst]), tmp_path)
    assert sorted(u.dest for u in uploads) == [
        "/opt/stack/models/flux/ae.safetensors", "/opt/stack/models/flux/clip_l.safetensors",
        "/opt/stack/models/flux/flux1.gguf", "/opt/stack/models/flux/t5xxl.safetensors"]


def test_the_diffusion_claim_decodes_an_image_of_the_native_size(tmp_path: Path) -> None:
    from stack.estimate.memory import SD_VAE_BYTES_PER_PIXEL, GiB, diffusion_claim

    sdxl = _safetensors(tmp_path / "sdxl.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"])
    meta = read_path(sdxl, "local://sdxl.safetensors")
    assert meta.architecture == "sdxl"
    big = replace(meta, weights_bytes=7 * GiB)
    vae = SD_VAE_BYTES_PER_PIXEL * 1024 * 1024  # 6.5 GiB: SDXL decodes 1024x1024
    on_cpu = diffusion_claim(big, [], 0, None)
    assert not isinstance(on_cpu, str) and on_cpu.ram_bytes == 7 * GiB + vae + 1 * GiB
    assert "VAE decoding 1024x1024" in on_cpu.detail
    # 14.5 GiB does not fit a 12 GiB GPU; decoding in tiles does
    assert diffusion_claim(big, [], 1, 12 * GiB) == "needs 14.5 GiB on one GPU, 12.0 GiB available"
    tiled = diffusion_claim(big, ["--vae-tiling"], 1, 12 * GiB)
    assert not isinstance(tiled, str)
    assert tiled.vram_bytes_per_gpu == 8 * GiB + SD_VAE_BYTES_PER_PIXEL * 256 * 256
