"""`stack estimate`: the JSON contract (docs/estimate.md), the human table, its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stack.cli import run as main

CONFIGS = Path(__file__).parent / "configs"


def test_json_has_the_design_contract_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copyfile(CONFIGS / "llama-3.1-8b.json", tmp_path / "config.json")
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", str(tmp_path), "--ctx", "8192", "--gpus", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"params", "weights_bytes", "kv_bytes_per_token", "context", "backends",
            "vram_bytes", "ram_bytes"} <= set(data)
    assert data["params"] == 8_030_261_248 and data["kv_bytes_per_token"] == 131_072
    assert data["context"] == 8192 and data["backend"] == "vllm" and data["gpus"] == 2
    assert data["backends"] == ["vllm", "sglang", "mindie"]
    assert 8 * 2**30 < data["vram_bytes"] < 10 * 2**30


def test_relative_path_and_backend_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "qwen").mkdir()
    shutil.copyfile(CONFIGS / "qwen2.5-7b-instruct.json", tmp_path / "qwen" / "config.json")
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", "qwen", "--backend", "vllm", "--gpus", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reason"] == "TP 3 does not divide 28 attention heads"
    assert data["vram_bytes"] is None


def test_human_output_is_a_table_with_the_breakdown(
        gguf_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(gguf_model), "--gpus", "0", "--ctx", "2048"]) == 0
    out = capsys.readouterr().out
    assert "gemma3 (llm, gguf, Q4_K_M)" in out
    assert "18,432 B/token" in out
    assert "llama.cpp on CPU" in out and "KV 36 MiB (2048 tokens)" in out


def test_backend_that_cannot_serve_the_format_is_an_error(
        gguf_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(gguf_model), "--backend", "vllm"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: `models.estimate.backend` is `vllm`: vLLM does not serve "
                          "GGUF files")
    assert "\nhint: " in err


def test_bad_context_is_an_error(gguf_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(gguf_model), "--ctx", "100"]) == 1
    assert "error: `--ctx` 100 is too small\nhint: pass at least 256." in capsys.readouterr().err
