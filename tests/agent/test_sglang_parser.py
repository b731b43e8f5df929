"""Every `python -m sglang.launch_server` line the agent builds (each SGLang case in
`commands/`) is accepted by SGLang itself, at the catalogue's default version
(`scripts/setup-sglang-parser`: SGLang without its GPU kernel packages). The line is run
by SGLang's real entry point: its argument parser, then the server-argument checks that
come before it looks for an accelerator (they read the model's `config.json`, so the
case's model path is pointed at a folder holding one); with no accelerator here it stops
there, with "No accelerator". The checks that need the accelerator (tensor parallel size
against the model's heads, memory) are not reached. The flags placement relies on are
read back from SGLang's own `prepare_server_args` and compared, so a version that renames
one fails here rather than in a production apply. A misspelt flag, and a combination
SGLang refuses, are refused: the check can fail."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.assignment import Instance
from agent.commands import Context, build_launch

CASES = sorted((Path(__file__).parent / "commands").glob("*.json"))
# where SGLang stops once every check before the accelerator passed
PARSED = "No accelerator (CUDA, XPU, HPU, NPU, MUSA, MPS) or platform plugin is available"
# a small Qwen2 whose 12 heads split over every tensor parallel size of the cases
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 768,
          "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 12,
          "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 32768,
          "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}
SETTINGS = ("model_path", "served_model_name", "host", "port", "api_key", "tp_size",
            "pp_size", "context_length", "mem_fraction_static", "nnodes", "node_rank",
            "dist_init_addr")
READ_BACK = ("import json, sys\n"
             "from sglang.srt.server_args import prepare_server_args\n"
             "args = prepare_server_args(sys.argv[2:])\n"
             "print(json.dumps({k: getattr(args, k) for k in sys.argv[1].split(',')}))")


def launch_args(case_file: Path) -> list[str] | None:
    """The arguments after `-m sglang.launch_server` in a case's line, or None for a case
    that starts no SGLang."""
    case = json.loads(case_file.read_text())
    if case["instance"].get("backend") != "sglang" or "error" in case:
        return None
    inst = Instance.model_validate(case["instance"])
    argv = build_launch(inst, Context(case["model_path"], "/opt/stack/state/instances")).argv
    assert argv[1:3] == ["-m", "sglang.launch_server"], argv
    return argv[3:]


SGLANG = [c for c in CASES if launch_args(c) is not None]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def with_model(args: list[str], folder: Path) -> list[str]:
    at = args.index("--model-path") + 1
    return [*args[:at], str(folder), *args[at + 1:]]


def launch(sglang_bin: Path, args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """`python -m sglang.launch_server ARGS`, offline, in an empty folder."""
    return subprocess.run([str(sglang_bin / "python"), "-m", "sglang.launch_server", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp,
                          errors="replace", env={**os.environ, "HF_HUB_OFFLINE": "1"})


def accepted(done: subprocess.CompletedProcess[str]) -> bool:
    """SGLang got past its parser and its checks: it stopped only for want of a GPU."""
    return PARSED in done.stderr


def read_back(sglang_bin: Path, args: list[str], tmp: Path) -> dict[str, Any]:
    """The settings SGLang's own `prepare_server_args` makes of ARGS."""
    done = subprocess.run([str(sglang_bin / "python"), "-c", READ_BACK, ",".join(SETTINGS),
                           *args], capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def test_the_sglang_cases_are_covered() -> None:
    assert [c.stem for c in SGLANG] == ["sglang_single", "sglang_worker"]


@pytest.mark.parametrize("case_file", SGLANG, ids=[c.stem for c in SGLANG])
def test_sglang_takes_each_line_up_to_the_accelerator(case_file: Path, sglang_bin: Path,
                                                     model_folder: Path,
                                                     tmp_path: Path) -> None:
    done = launch(sglang_bin, with_model(launch_args(case_file) or [], model_folder),
                  tmp_path)
    assert accepted(done), done.stderr[-3000:]


def test_the_flags_placement_relies_on_mean_what_we_mean(sglang_bin: Path,
                                                         tmp_path: Path) -> None:
    """The single line has the one-node flags, the worker's the multi-node ones; each is
    read back as the setting placement means."""
    single = read_back(sglang_bin, launch_args(SGLANG[0]) or [], tmp_path)
    assert single == {"model_path": "/m/q", "served_model_name": "qwen",
                      "host": "127.0.0.1", "port": 40030, "api_key": "sk-s", "tp_size": 2,
                      "pp_size": 1, "context_length": 4096, "mem_fraction_static": 0.8,
                      "nnodes": 1, "node_rank": 0, "dist_init_addr": None}
    worker = read_back(sglang_bin, launch_args(SGLANG[1]) or [], tmp_path)
    assert worker == {"model_path": "/m/q", "served_model_name": "qwen",
                      "host": "10.0.0.3", "port": 40030, "api_key": None, "tp_size": 3,
                      "pp_size": 1, "context_length": None, "mem_fraction_static": None,
                      "nnodes": 3, "node_rank": 2, "dist_init_addr": "10.0.0.1:40031"}


def test_a_misspelt_flag_is_refused(sglang_bin: Path, model_folder: Path,
                                    tmp_path: Path) -> None:
    args = [a + "s" if a == "--served-model-name" else a
            for a in with_model(launch_args(SGLANG[0]) or [], model_folder)]
    done = launch(sglang_bin, args, tmp_path)
    assert not accepted(done)
    assert "error: unrecognized arguments: --served-model-names" in done.stderr


def test_a_combination_sglang_refuses_is_refused(sglang_bin: Path, model_folder: Path,
                                                 tmp_path: Path) -> None:
    """A model's own `args` are appended to the line; SGLang checks them with the rest."""
    args = with_model(launch_args(SGLANG[0]) or [], model_folder)
    done = launch(sglang_bin, [*args, "--ssl-certfile", "cert.pem"], tmp_path)
    assert not accepted(done)
    assert "--ssl-certfile requires --ssl-keyfile" in done.stderr


def test_the_parser_is_the_catalogues_sglang(sglang_bin: Path) -> None:
    """A catalogue bump must move the parser too, or the lines are checked by another SGLang."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    default = tomllib.loads((root / "stack" / "catalog" / "runtimes.toml").read_text())
    done = subprocess.run([str(sglang_bin / "python"), "-c", "import importlib.metadata as m; "
                           "print(m.version('sglang'))"], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip() == default["sglang"]["default"], done.stdout + done.stderr
