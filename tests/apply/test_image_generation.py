"""Image generation served for real, through `stack apply` on a loopback host over real SSH:

the random-weight SD 1.x tiny UNet (a diffusers folder, `scripts/setup-sd-model`) as a
`local://` folder, no `[runtimes]` table (the catalogue's stable-diffusion.cpp CPU recipe,
uploaded from `scripts/setup-sd-cpp`'s build), placed on the host's CPU; the router probes
sd-server on /v1/models (it serves no /health) and the official `openai` client's
`images.generate` gets a valid 64x64 PNG (noise: this proves the path, not the picture).
sd-server takes its generation settings inside the prompt (`<sd_cpp_extra_args>`), in
0.4.7 in its native schema (examples/server/api.md): `{"seed": 42, "sample_params":
{"sample_steps": 2, "guidance": {"txt_cfg": 1.0}}}`. The flat `{"sample_steps": 2,
"cfg_scale": 1.0, "seed": 42}` is ignored without an error (the PNG's parameters then say
20 steps, CFG 7), so the test reads the steps back from the PNG's text chunk.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet import one_host_stack, run_stack  # tests/ is on sys.path (tests/conftest.py)

pytestmark = pytest.mark.integration

PROMPT = ('a red apple <sd_cpp_extra_args>{"seed":42,"sample_params":{"sample_steps":2,'
          '"guidance":{"txt_cfg":1.0}}}</sd_cpp_extra_args>')


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sd_bin: Path,
          sd_model: Path) -> Iterator[dict[str, Any]]:
    models = f'''[models.sd]
source = "local://{sd_model}"
args = ["-t", "2"]
'''
    with pytest.MonkeyPatch.context() as patch:
        # the catalogue's CPU recipe is uploaded from scripts/setup-sd-cpp's build
        patch.setenv("MODELSTACK_CACHE", str(sd_bin.parents[2]))  # CACHE/NAME/VERSION/bin
        with one_host_stack(tmp_path_factory.mktemp("image"), "imagetest", models) as world:
            yield world


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_apply_serves_a_diffusers_folder_and_images_generate_returns_a_png(
        world: dict[str, Any]) -> None:
    started = time.monotonic()
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runtime stable-diffusion.cpp 0.4.7-cpu" in result.stdout, result.stdout
    prefix = world["fleet"].hosts["node-01"].prefix
    runtime = prefix / "runtimes" / "stable-diffusion.cpp" / "0.4.7-cpu"
    assert (runtime / "bin" / "sd-server").exists()
    applied = time.monotonic() - started

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=180)
    reply = client.images.generate(model="sd", prompt=PROMPT, size="64x64",
                                   response_format="b64_json")
    assert reply.data and reply.data[0].b64_json
    png = base64.b64decode(reply.data[0].b64_json)
    assert _png_size(png) == (64, 64)
    assert b"Steps: 2," in png and b"Seed: 42" in png  # sd-server's parameters text chunk
    print(f"apply {applied:.0f} s, images.generate {time.monotonic() - started - applied:.0f} s")

    # the router's probes (every 5 s, ejected after 3 failures) keep the replica up: with
    # /health, which sd-server answers 404, it was ejected after 15 s and requests got 503
    time.sleep(17)
    health = httpx.get(world["url"].removesuffix("/v1") + "/healthz", timeout=10).json()
    assert health == {"status": "ok", "replicas_up": 1}, health
    # three at once (issue 14 saw 2 of 3 get 503 when the replica was ejected): sd-server
    # takes them one after another, the router holds them until it answers
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda size: client.images.generate(
            model="sd", prompt=PROMPT, size=size, response_format="b64_json"),
            ["64x64", "64x64", "128x64"]))
    sizes = [_png_size(base64.b64decode(r.data[0].b64_json or "")) for r in replies if r.data]
    assert sizes == [(64, 64), (64, 64), (128, 64)]
    # a `url` answer: sd-server serves none, the router answers a data: URL of the PNG
    linked = client.images.generate(model="sd", prompt=PROMPT, size="64x64",
                                    response_format="url")
    assert linked.data and (linked.data[0].url or "").startswith("data:image/png;base64,")
    png = base64.b64decode((linked.data[0].url or "").partition(",")[2])
    assert _png_size(png) == (64, 64)
