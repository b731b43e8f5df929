"""Every case in cases/*.json: a model's metadata (a config.json of configs/ or the real
GGUF), the numbers read from it, its backends, claims per layout and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stack.estimate import ModelMeta, evaluate, meta_from_config, read_metadata
from stack.estimate.memory import kv_tokens_bytes, vllm_kv_per_token
from stack.estimate.types import Claim
from stack.snapshot import GpuFacts, NodeFacts
from stack.spec import ModelSpec, parse_bytes

HERE = Path(__file__).parent
CASES = sorted((HERE / "cases").glob("*.json"))


def _meta(case: dict[str, Any], request: pytest.FixtureRequest) -> ModelMeta:
    if "config" in case:
        return meta_from_config(json.loads((HERE / "configs" / case["config"]).read_text()),
                                source=case["config"])
    if "gguf_file" in case:  # a header fixture of this folder
        return read_metadata(str(HERE / case["gguf_file"]), HERE)
    path: Path = request.getfixturevalue(case["gguf"])
    return read_metadata(str(path), HERE)


def _check_value(name: str, actual: object, expected: object) -> None:
    if isinstance(expected, dict) and "approx" in expected:
        assert isinstance(actual, int | float), name
        assert actual == pytest.approx(expected["approx"], rel=expected["rel"]), name
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), name
        for key, value in expected.items():
            _check_value(f"{name}.{key}", actual.get(key), value)
    else:
        assert actual == expected, name


def _check_claim(result: Claim | str, spec: dict[str, Any]) -> None:
    label = f"{spec['backend']} x{spec['gpus']}"
    if "reason" in spec:
        assert isinstance(result, str), f"{label}: expected a refusal, got {result}"
        assert spec["reason"] in result, label
        return
    assert isinstance(result, Claim), f"{label}: {result}"
    assert result.backend == spec["backend"] and result.gpus == spec["gpus"]
    if "vram_per_gpu" in spec:
        low, high = (parse_bytes(v) for v in spec["vram_per_gpu"])
        assert low <= result.vram_bytes_per_gpu <= high, f"{label}: {result.detail}"
    if "ram" in spec:
        low, high = (parse_bytes(v) for v in spec["ram"])
        assert low <= result.ram_bytes <= high, f"{label}: {result.ram_bytes} {result.detail}"
    if "detail" in spec:
        assert spec["detail"] in result.detail
    if spec.get("gpu_memory"):
        assert result.vram_bytes_per_gpu <= parse_bytes(spec["gpu_memory"])


def _claims(meta: ModelMeta, model: dict[str, Any], claims: list[dict[str, Any]]) -> None:
    evaluation = evaluate("m", ModelSpec.model_validate({"source": "/m", **model}), meta)
    for spec in claims:
        memory = parse_bytes(spec["gpu_memory"]) if spec.get("gpu_memory") else None
        result = evaluation.claim(spec["backend"], spec["gpus"], memory, spec.get("nodes", 1))
        _check_claim(result, spec)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_estimate_case(path: Path, request: pytest.FixtureRequest) -> None:
    case = json.loads(path.read_text())
    meta = _meta(case, request)
    for key, expected in case.get("meta", {}).items():
        _check_value(key, getattr(meta, key), expected)
    evaluation = evaluate("m", ModelSpec.model_validate({"source": "/m"}), meta)
    if "backends" in case:
        assert list(evaluation.backends) == case["backends"]
    if "context" in case:
        assert evaluation.context == case["context"]
    for tp, expected in case.get("kv_per_gpu", {}).items():
        assert vllm_kv_per_token(meta, int(tp)) == expected, f"TP {tp}"
    if "kv_bytes_at" in case:
        at = case["kv_bytes_at"]
        per_token = vllm_kv_per_token(meta, at["tp"])
        window = int(str(meta.extra.get("sliding_window") or at["context"]))
        assert kv_tokens_bytes(meta, per_token, at["context"], window) == at["bytes"]
    _claims(meta, {}, case.get("claims", []))
    for extra in [case["with_model"]] if "with_model" in case else case.get("with_models", []):
        model = {k: v for k, v in extra.items() if k != "claims"}
        _claims(meta, model, extra["claims"])
    for refusal in case.get("refusals", []):
        node = NodeFacts.model_validate(refusal["node"])
        gpus = [GpuFacts.model_validate(g) for g in refusal["gpus"]]
        assert evaluation.refuse(refusal["backend"], node, gpus) == refusal["reason"], refusal
