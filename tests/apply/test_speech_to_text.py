"""Speech-to-text served for real, through `stack apply` on a loopback host over real SSH:

Whisper tiny.en in CTranslate2's format (`scripts/setup-whisper-model`) as a `local://`
folder with no `backend` and no `[runtimes]` table: the estimator reads the folder as a
CTranslate2 Whisper model (speech-to-text, weights the size of model.bin), the scheduler
picks vox-box and places it on the host's CPU, apply installs the catalogue's vox-box CPU
recipe with pip on the host and starts it, and the official `openai` client's
`audio.transcriptions.create` gets the words of a sentence espeak-ng spoke, through the
router, as json, verbose_json (with segment times), text and srt. vox-box 0.0.21 answers
`text` and `srt` with the transcript as a JSON string; the router asks it for verbose_json
and renders those (router/rendering.py). A plan afterwards is empty.

About 3 minutes on 2 cores, most of it pip installing vox-box and CPU torch (1.7 GB) on the
host (pip's cache makes a second run faster).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SENTENCE_WORDS
from fleet import one_host_stack, run_stack

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory,
          whisper_model: Path) -> Iterator[dict[str, Any]]:
    models = f'''[models.whisper]
source = "local://{whisper_model}"
'''
    with one_host_stack(tmp_path_factory.mktemp("speech"), "speechtest", models) as world:
        yield world


@pytest.mark.timeout(2400)
def test_the_plan_places_whisper_on_vox_box(world: dict[str, Any], whisper_model: Path) -> None:
    plan = run_stack("plan", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "node.node-01.runtime.vox-box@0.0.21-cpu will be created" in plan.stdout, plan.stdout
    assert "backend: vox-box 0.0.21 (cpu build from the runtime catalogue)" in plan.stdout
    # tiny.en's claim from its model.bin (docs/estimate.md), and no context: vox-box has none
    assert "claim:   0.8 GiB RAM\n" in plan.stdout and "context:" not in plan.stdout
    estimate = run_stack("estimate", str(whisper_model), "--gpus", "0", cwd=world["dir"])
    assert estimate.returncode == 0, estimate.stdout + estimate.stderr
    assert ("RAM: weights 144 MiB + decoding caches 44 MiB (5 hypotheses, 4 layers x 384) "
            "+ 640 MiB") in " ".join(estimate.stdout.split()), estimate.stdout


@pytest.mark.timeout(2400)
def test_apply_serves_whisper_and_the_client_transcribes(
        world: dict[str, Any], spoken_wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    result = run_stack("apply", "--auto-approve", cwd=world["dir"], timeout=2000)
    assert result.returncode == 0, result.stdout + result.stderr
    applied = time.monotonic() - started
    runtime = world["fleet"].hosts["node-01"].prefix / "runtimes" / "vox-box" / "0.0.21-cpu"
    check = subprocess.run(
        [str(runtime / "bin" / "python"), "-c", "import torch, torchaudio; print("
         "torch.__version__, torchaudio._extension._IS_TORCHAUDIO_EXT_AVAILABLE)"],
        capture_output=True, text=True, timeout=120)
    # the CPU build of torch; torchaudio imports, without its CUDA-linked extension
    assert check.stdout.split() == ["2.13.0+cpu", "False"], check.stdout + check.stderr

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=180)
    begin = time.monotonic()
    with spoken_wav.open("rb") as audio:
        reply = client.audio.transcriptions.create(model="whisper", file=audio)
    first = time.monotonic() - begin
    text = reply.text.lower()
    assert all(word in text for word in SENTENCE_WORDS), text

    with spoken_wav.open("rb") as audio:
        verbose = client.audio.transcriptions.create(model="whisper", file=audio,
                                                     response_format="verbose_json")
    assert "fox" in verbose.text.lower() and verbose.segments, verbose
    assert verbose.segments[0].end > verbose.segments[0].start >= 0
    # vox-box answers text and srt with a JSON string: the router asks it for verbose_json
    # and renders them, as OpenAI's API answers them
    with spoken_wav.open("rb") as audio:
        plain = client.audio.transcriptions.create(model="whisper", file=audio,
                                                   response_format="text")
    assert isinstance(plain, str) and plain == verbose.text.strip() + "\n", plain
    with spoken_wav.open("rb") as audio:
        srt = client.audio.transcriptions.create(model="whisper", file=audio,
                                                 response_format="srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:0"), srt
    assert " --> 00:00:0" in srt and "fox" in srt.lower(), srt
    with capsys.disabled():
        print(f"\nspeech-to-text: apply {applied:.0f} s (vox-box install included), "
              f"first transcription {first:.1f} s")


# vox-box's own command-line parser (its `start` sub-command, as `vox-box` builds it), then
# its argument check, over a line given as arguments; exit 2 on an unknown flag
VOX_BOX_PARSER = """
import argparse, sys
from vox_box.cmd import setup_start_cmd
from vox_box.cmd.start import validate_args
parser = argparse.ArgumentParser(conflict_handler="resolve")
setup_start_cmd(parser.add_subparsers())
validate_args(parser.parse_args(sys.argv[1:]))
print("parsed")
"""


@pytest.mark.timeout(600)
def test_the_cuda_line_parses_with_vox_boxs_own_parser(world: dict[str, Any]) -> None:
    """The agent's CUDA line for Whisper (tests/agent/commands/vox_box_whisper.json), which
    cannot run here, through vox-box's real parser in the runtime apply installed; with a
    misspelt flag it is refused (docs/backends.md)."""
    import json

    from agent.assignment import Instance
    from agent.commands import Context, build_launch

    case = json.loads((ROOT / "tests" / "agent" / "commands" / "vox_box_whisper.json")
                      .read_text())
    argv = build_launch(Instance.model_validate(case["instance"]),
                        Context(case["model_path"], "/opt/stack/state/instances")).argv
    assert "cuda:0" in argv
    runtime = world["fleet"].hosts["node-01"].prefix / "runtimes" / "vox-box" / "0.0.21-cpu"
    python = str(runtime / "bin" / "python")
    ok = subprocess.run([python, "-c", VOX_BOX_PARSER, *argv[1:]], capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.strip() == "parsed", ok.stdout + ok.stderr
    misspelt = [a + "t" if a == "--data-dir" else a for a in argv[1:]]
    refused = subprocess.run([python, "-c", VOX_BOX_PARSER, *misspelt], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "unrecognized arguments: --data-dirt" in refused.stderr


def test_a_plan_after_apply_is_empty(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "No changes. The fleet matches stack.toml." in plan.stdout
