"""Sources resolved to metadata on the controller: the Hugging Face offline cache (in the
library's own layout), the ModelScope cache, and `local://` paths. Each runs the real
`stack estimate` in a subprocess, because huggingface_hub reads `HF_HOME` and
`HF_HUB_OFFLINE` when it is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests" / "estimate" / "configs"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _estimate(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack.cli", "estimate", *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _hf_cache(home: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay out `HF_HOME/hub` as huggingface_hub does: blobs, snapshots of symlinks, refs."""
    folder = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for i, (name, src) in enumerate(files.items()):
        blob = folder / "blobs" / f"{i:040x}"
        if src.stat().st_size > 10_000_000:
            blob.symlink_to(src)  # the real GGUF is not copied
        else:
            shutil.copyfile(src, blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    return snapshot


def test_hf_repo_is_read_from_the_offline_cache(tmp_path: Path) -> None:
    _hf_cache(tmp_path, "Qwen/Qwen2.5-7B-Instruct",
              {"config.json": CONFIGS / "qwen2.5-7b-instruct.json"})
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    data = _json(_estimate(["hf://Qwen/Qwen2.5-7B-Instruct", "--json"], env, tmp_path))
    assert data["params"] == 7_615_616_512
    assert data["kv_bytes_per_token"] == 57_344
    assert data["backends"][0] == "vllm"
    pinned = _json(_estimate([f"hf://Qwen/Qwen2.5-7B-Instruct@{COMMIT}", "--json"], env,
                             tmp_path))
    assert pinned["params"] == data["params"]


def test_hf_gguf_file_is_read_from_the_offline_cache(tmp_path: Path, gguf_model: Path) -> None:
    _hf_cache(tmp_path, "ggml-org/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": gguf_model})
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    data = _json(_estimate(["hf://ggml-org/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf",
                            "--json", "--gpus", "0", "--ctx", "2048"], env, tmp_path))
    assert data["architecture"] == "gemma3"
    assert data["backends"] == ["llama.cpp"]
    assert data["vram_bytes"] == 0 and data["ram_bytes"] > data["weights_bytes"]


def test_hf_repo_missing_from_the_offline_cache_says_how_to_fix_it(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = _estimate(["hf://nobody/nothing", "--json"], env, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: `hf://nobody/nothing` is not in the Hugging Face cache")
    assert "hint: download it once with network" in result.stderr


def test_modelscope_repo_is_read_from_its_cache_folder(tmp_path: Path) -> None:
    # the ModelScope library writes `.` in names as `___`
    folder = tmp_path / "models" / "deepseek-ai" / "DeepSeek-V2-Lite"
    folder.mkdir(parents=True)
    shutil.copyfile(CONFIGS / "deepseek-v2-lite.json", folder / "config.json")
    dotted = tmp_path / "models" / "qwen" / "Qwen2___5-7B-Instruct"
    dotted.mkdir(parents=True)
    shutil.copyfile(CONFIGS / "qwen2.5-7b-instruct.json", dotted / "config.json")
    env = {"MODELSCOPE_CACHE": str(tmp_path)}
    data = _json(_estimate(["modelscope://deepseek-ai/DeepSeek-V2-Lite", "--json"], env,
                           tmp_path))
    assert data["kv_bytes_per_token"] == 31_104
    data = _json(_estimate(["modelscope://qwen/Qwen2.5-7B-Instruct", "--json"], env, tmp_path))
    assert data["params"] == 7_615_616_512


def test_modelscope_repo_missing_names_the_cache(tmp_path: Path) -> None:
    result = _estimate(["modelscope://qwen/nothing"], {"MODELSCOPE_CACHE": str(tmp_path)},
                       tmp_path)
    assert result.returncode == 1
    assert f"is not in the ModelScope cache ({tmp_path}/models/qwen/nothing)" in result.stderr
    assert "hint: " in result.stderr


def test_local_source_is_relative_to_the_stack_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "llama"
    folder.mkdir(parents=True)
    shutil.copyfile(CONFIGS / "llama-3.1-8b.json", folder / "config.json")
    data = _json(_estimate(["local://models/llama", "--json"], {}, tmp_path))
    assert data["params"] == 8_030_261_248
    absolute = _json(_estimate([f"local://{folder}", "--json"], {}, ROOT))
    assert absolute["params"] == data["params"]
    missing = _estimate(["local://models/none"], {}, tmp_path)
    assert missing.returncode == 1
    assert "error: model source `local://models/none` does not exist beside stack.toml" \
        in missing.stderr
