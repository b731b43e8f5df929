"""Text-to-speech models vox-box serves are read as `text-to-speech` (they were taken for
LLMs): Bark and Dia by their config.json, CosyVoice by its YAML config and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack.estimate.compat import model_reason
from stack.estimate.read import read_path

# the parts of each config.json the kind is read from (suno/bark-small, nari-labs/Dia-1.6B)
BARK = {"architectures": ["BarkModel"], "model_type": "bark",
        "semantic_config": {"hidden_size": 768}}
DIA = {"data": {"audio_bos_value": 1026, "audio_eos_value": 1024, "audio_pad_value": 1025,
                "audio_length": 3072, "delay_pattern": [0, 8, 9, 10]},
       "model": {"decoder": {"n_layer": 18}}}


@pytest.mark.parametrize(("name", "config"), [("bark", BARK), ("dia", DIA)])
def test_bark_and_dia_configs_are_text_to_speech(tmp_path: Path, name: str,
                                                 config: dict[str, object]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    meta = read_path(tmp_path, f"local://{name}")
    assert meta.kind == "text-to-speech"
    assert model_reason("vox-box", meta, meta.kind) is None
    assert model_reason("llama.cpp", meta, meta.kind) is not None


def test_a_cosyvoice_folder_is_text_to_speech_with_its_checkpoints_as_weights(
        tmp_path: Path) -> None:
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    (tmp_path / "llm.pt").write_bytes(b"\0" * 3000)
    (tmp_path / "flow.pt").write_bytes(b"\0" * 2000)
    (tmp_path / "speech_tokenizer_v2.onnx").write_bytes(b"\0" * 500)
    meta = read_path(tmp_path, "local://cosyvoice")
    assert (meta.kind, meta.architecture, meta.format) == ("text-to-speech", "cosyvoice",
                                                           "pytorch")
    assert meta.weights_bytes == 5500
    assert model_reason("vox-box", meta, meta.kind) is None


def test_an_llm_config_stays_an_llm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}))
    assert read_path(tmp_path, "local://llm").kind == "llm"
