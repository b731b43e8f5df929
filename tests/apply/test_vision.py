"""Vision served for real, through `stack apply` on a loopback host over real SSH: a
`local://` folder holding Gemma 3 270M's GGUF and a random-weight Gemma 3 vision projector
(`tests/fixtures/gemma3_mmproj.py`: 256 image tokens per picture; no small real projector
is on PyPI). With no `kind`, no `backend` and no `mmproj` in stack.toml, the estimator
reads the folder as a vision-language model (an `mmproj*.gguf` beside the GGUF), llama.cpp
gets the main GGUF with `-m` and the projector with `--mmproj`, and the official `openai`
client's chat with an `image_url` content part (a PNG data URI) is answered through the
router with the image's 256 tokens in its prompt count. The projector's weights are
noise, so the answer means nothing: the image path is what is proven. A plan afterwards
is empty.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import one_host_stack, run_stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IMAGE_TOKENS = 256  # (896 / 14 patches per side / 4 pooled)^2


def _png(width: int, height: int) -> bytes:
    """An RGB gradient as a PNG."""
    rows = b"".join(b"\x00" + b"".join(bytes([x * 255 // width, y * 255 // height, 128])
                                       for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("vision")
    model = work / "gemma-vision"
    model.mkdir()
    try:
        os.link(gguf_model, model / gguf_model.name)
    except OSError:
        shutil.copy(gguf_model, model / gguf_model.name)
    subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "gemma3_mmproj.py"),
                    str(model / "mmproj-gemma3-random.gguf")], check=True, timeout=120)
    models = '''[models.gemma]
source = "local://gemma-vision"
context = 2048
args = ["-t", "2"]
'''
    with one_host_stack(work, "visiontest", models) as world:
        yield world


def test_the_plan_reads_a_vision_language_model(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--json", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    doc = json.loads(plan.stdout)
    assert [p["kind"] for p in doc["placements"]] == ["vlm"], doc["placements"]
    instance = doc["assignments"]["node-01"]["instances"][0]
    assert instance["mmproj"] == "mmproj-gemma3-random.gguf"
    assert instance["model_path"].endswith("/models/gemma/gemma-3-270m-q4_k_m.gguf")


def test_a_chat_with_an_image_counts_the_image_tokens(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=120)
    picture = "data:image/png;base64," + base64.b64encode(_png(32, 32)).decode()
    text = {"type": "text", "text": "What is in this picture?"}
    with_image = client.chat.completions.create(model="gemma", max_tokens=8, messages=[
        {"role": "user", "content": [text, {"type": "image_url",
                                            "image_url": {"url": picture}}]}])
    without = client.chat.completions.create(model="gemma", max_tokens=8, messages=[
        {"role": "user", "content": [text]}])
    assert with_image.usage is not None and without.usage is not None
    extra = with_image.usage.prompt_tokens - without.usage.prompt_tokens
    # the image's tokens and the markers around them
    assert IMAGE_TOKENS <= extra <= IMAGE_TOKENS + 4, (with_image.usage, without.usage)
    assert with_image.choices[0].message.content is not None


def test_a_plan_after_apply_is_empty(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "No changes. The fleet matches stack.toml." in plan.stdout
