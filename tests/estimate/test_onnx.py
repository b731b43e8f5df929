"""ONNX exports are recognised by their files: format `onnx`, the kind from config.json,
weights the graph a server loads (with its external data). No catalogue backend serves
them: the plan says so and names `custom`, which serves them with a claim of their size.
A repo that ships safetensors beside an `onnx/` folder stays a safetensors model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack.errors import EstimateError
from stack.estimate.evaluation import evaluate
from stack.estimate.read import read_path
from stack.estimate.types import Claim
from stack.spec import ModelSpec

# all-MiniLM-L6-v2's config.json (the keys the estimator reads)
BERT = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384,
        "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
        "vocab_size": 30522, "max_position_embeddings": 512}


def _write(folder: Path, files: dict[str, int | dict[str, object]]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            path.write_text(json.dumps(content))
        else:
            path.write_bytes(b"\0" * content)
    return folder


def test_an_optimum_export_is_an_onnx_embedding_sized_by_its_largest_variant(
        tmp_path: Path) -> None:
    folder = _write(tmp_path, {"config.json": BERT, "onnx/model.onnx": 90_000,
                               "onnx/model_fp16.onnx": 45_000,
                               "onnx/model_quantized.onnx": 23_000})
    meta = read_path(folder, "local://minilm")
    assert (meta.format, meta.kind) == ("onnx", "embedding")
    assert (meta.weights_bytes, meta.files_bytes) == (90_000, 158_000)


def test_external_data_counts_with_its_graph(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"config.json": BERT, "model.onnx": 1_000,
                               "model.onnx_data": 500_000, "decoder.onnx": 2_000,
                               "decoder.onnx.data": 300_000})
    meta = read_path(folder, "local://big")
    assert (meta.weights_bytes, meta.files_bytes) == (501_000, 803_000)
    assert read_path(folder / "decoder.onnx", "local://big/decoder.onnx").format == "onnx"


def test_a_repo_with_safetensors_beside_its_onnx_folder_stays_safetensors(
        tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    folder = _write(tmp_path, {"config.json": BERT, "onnx/model.onnx": 90_000})
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                               + b"\0" * 8)
    assert read_path(folder, "local://minilm").format == "safetensors"


def test_a_diffusers_onnx_pipeline_is_an_image_model_of_every_component(tmp_path: Path) -> None:
    folder = _write(tmp_path, {
        "model_index.json": {"_class_name": "OnnxStableDiffusionPipeline"},
        "unet/model.onnx": 1_000, "unet/weights.pb": 3_000_000,
        "text_encoder/model.onnx": 400_000, "vae_decoder/model.onnx": 100_000})
    meta = read_path(folder, "local://sd-onnx")
    assert (meta.format, meta.kind) == ("onnx", "image")
    assert meta.weights_bytes == meta.files_bytes == 3_501_000


def test_no_catalogue_backend_serves_onnx_and_the_error_names_custom(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"config.json": BERT, "onnx/model.onnx": 90_000})
    meta = read_path(folder, "local://minilm")
    with pytest.raises(EstimateError) as err:
        evaluate("minilm", ModelSpec.model_validate({"source": "local://minilm"}), meta)
    assert err.value.message == "no backend serves `models.minilm` (embedding, onnx)"
    assert "custom" in (err.value.hint or "")
    with pytest.raises(EstimateError) as named:
        evaluate("minilm", ModelSpec.model_validate(
            {"source": "local://minilm", "backend": "llama.cpp"}), meta)
    assert "llama.cpp does not serve ONNX models" in named.value.message


def test_a_lone_onnx_graph_is_served_by_a_custom_backend_of_the_kind_stack_toml_says(
        tmp_path: Path) -> None:
    folder = _write(tmp_path, {"reranker.onnx": 200_000})
    meta = read_path(folder / "reranker.onnx", "local://reranker.onnx")
    assert (meta.format, meta.kind, meta.weights_bytes) == ("onnx", "unknown", 200_000)
    assert read_path(folder, "local://folder").weights_bytes == 200_000
    spec = ModelSpec.model_validate({"source": "local://reranker.onnx", "kind": "rerank",
                                     "backend": "custom", "command": "serve {model}"})
    evaluation = evaluate("reranker", spec, meta)
    claim = evaluation.claim("custom", 0, None)
    assert evaluation.kind == "rerank" and isinstance(claim, Claim)
    assert claim.ram_bytes == int(200_000 * 1.2) + 1024**3
