"""Every `vllm serve` line the agent builds (each vLLM case in `commands/`, the Ray head's
included) is accepted by vLLM's own parser, at the catalogue's default version and at the
version its ROCm variant pins (`scripts/setup-vllm-parser`: vLLM without its CUDA packages
over the CPU torch wheel, on vLLM's CPU platform). vLLM prints the settings it parsed
(`non-default args: {...}`) before it looks for the model, which does not exist here: the
flags placement relies on are read back from that and compared, so a version that renames
one fails here rather than in a production apply. A misspelt flag is refused. The API key,
given to vLLM in `VLLM_API_KEY` (kept out of the process list), must be a variable vLLM
reads."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.assignment import Instance
from agent.commands import Context, build_launch

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted((Path(__file__).parent / "commands").glob("vllm_*.json"))
REFUSED = ("error: unrecognized arguments", "error: argument", "invalid choice")


def serve_args(case_file: Path) -> list[str] | None:
    """The arguments after `vllm serve` in a case's command line (inside the Ray head's
    `sh -c` too), or None for a case that starts no vLLM (a Ray worker)."""
    case = json.loads(case_file.read_text())
    inst = Instance.model_validate(case["instance"])
    argv = build_launch(inst, Context(case["model_path"], "/opt/stack/state/instances")).argv
    if argv[:2] == ["/bin/sh", "-c"]:
        argv = shlex.split(argv[2].split("&& exec ", 1)[1])
    if Path(argv[0]).name != "vllm":
        return None
    assert argv[1] == "serve"
    return argv[2:]


def parse(vllm_bin: Path, args: list[str], tmp: Path) -> tuple[str, dict[str, Any] | None]:
    """vLLM's output for `vllm serve ARGS` and the settings it says it parsed."""
    done = subprocess.run([str(vllm_bin / "vllm"), "serve", *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp, errors="replace",
                          env={**os.environ, "VLLM_TARGET_DEVICE": "cpu",
                               "HF_HUB_OFFLINE": "1"})
    output = done.stdout + done.stderr
    line = next((ln for ln in output.splitlines() if "non-default args: " in ln), None)
    if line is None or any(r in output for r in REFUSED):
        return output, None
    return output, ast.literal_eval(line.split("non-default args: ", 1)[1])


SERVE = [c for c in CASES if serve_args(c) is not None]


@pytest.fixture(params=["vllm_bin", "vllm_rocm_bin"], ids=["default", "rocm"])
def parser_bin(request: pytest.FixtureRequest) -> Path:
    """The parser of each vLLM version the catalogue installs (default, ROCm variant)."""
    path: Path = request.getfixturevalue(request.param)
    return path


def test_the_vllm_cases_are_covered() -> None:
    assert [c.stem for c in SERVE] == ["vllm_env_from_the_controller", "vllm_ray_head",
                                       "vllm_tensor_parallel"]


@pytest.mark.parametrize("case_file", SERVE, ids=[c.stem for c in SERVE])
def test_vllm_parses_each_line(case_file: Path, parser_bin: Path, tmp_path: Path) -> None:
    args = serve_args(case_file) or []
    output, parsed = parse(parser_bin, args, tmp_path)
    assert parsed is not None, output[-3000:]
    assert parsed["model"] == args[0] and parsed["served_model_name"] == [args[2]]


def test_the_flags_placement_relies_on_mean_what_we_mean(parser_bin: Path,
                                                         tmp_path: Path) -> None:
    """The Ray head's line has every layout flag; each is read back as the setting."""
    head = next(c for c in SERVE if c.stem == "vllm_ray_head")
    tp = next(c for c in SERVE if c.stem == "vllm_tensor_parallel")
    _, parsed = parse(parser_bin, serve_args(head) or [], tmp_path)
    assert parsed is not None
    assert (parsed["tensor_parallel_size"], parsed["pipeline_parallel_size"],
            parsed["distributed_executor_backend"], parsed["host"], parsed["port"]) == (
        2, 2, "ray", "10.0.0.1", 40020)
    _, parsed = parse(parser_bin, serve_args(tp) or [], tmp_path)
    assert parsed is not None
    assert (parsed["max_model_len"], parsed["gpu_memory_utilization"],
            parsed["tensor_parallel_size"]) == (8192, 0.85, 4)
    reads = subprocess.run([str(parser_bin / "python"), "-c",
                            "import vllm.envs as e; print('VLLM_API_KEY' in "
                            "e.environment_variables)"], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    assert reads.stdout.strip().splitlines()[-1] == "True", reads.stdout + reads.stderr


def test_a_misspelt_flag_is_refused(parser_bin: Path, tmp_path: Path) -> None:
    args = [a + "s" if a == "--served-model-name" else a
            for a in serve_args(SERVE[0]) or []]
    output, parsed = parse(parser_bin, args, tmp_path)
    assert parsed is None and "unrecognized arguments: --served-model-names" in output


def ray_lines(case_file: Path) -> list[list[str]]:
    """The `ray` command lines of a case: a worker's `ray start`, the head's `ray start`
    (inside its `sh -c`), and the `ray stop` that stops either."""
    case = json.loads(case_file.read_text())
    inst = Instance.model_validate(case["instance"])
    launch = build_launch(inst, Context(case["model_path"], "/opt/stack/state/instances"))
    argv = launch.argv
    if argv[:2] == ["/bin/sh", "-c"]:
        argv = shlex.split(argv[2].split(" && exec ", 1)[0])
    lines = [argv] if Path(argv[0]).name == "ray" else []
    return lines + ([launch.stop_argv] if launch.stop_argv else [])


RAY = [c for c in CASES if ray_lines(c)]


def ray_parses(vllm_bin: Path, line: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """`ray SUBCOMMAND ARGS --help`: click reads every option (an unknown one, or one
    missing its value, is an error) and then only prints the help."""
    return subprocess.run([str(vllm_bin / "ray"), *line[1:], "--help"], capture_output=True,
                          text=True, timeout=300, cwd=tmp)


@pytest.mark.parametrize("case_file", RAY, ids=[c.stem for c in RAY])
def test_rays_own_parser_takes_the_ray_lines(case_file: Path, vllm_bin: Path,
                                             tmp_path: Path) -> None:
    for line in ray_lines(case_file):
        done = ray_parses(vllm_bin, line, tmp_path)
        assert done.returncode == 0 and f"Usage: ray {line[1]}" in done.stdout, (
            line, done.stdout + done.stderr)
    start = ray_lines(case_file)[0]
    misspelt = [a.replace("--node-ip-address", "--node-ip-adress") for a in start]
    refused = ray_parses(vllm_bin, misspelt, tmp_path)
    assert refused.returncode == 2 and "No such option '--node-ip-adress'" in refused.stderr


def test_the_vllm_runtime_installs_the_ray_those_lines_run(vllm_bin: Path) -> None:
    """vLLM does not depend on Ray; the catalogue's vLLM recipe installs it, at the version
    whose parser is checked here."""
    import tomllib

    recipe = tomllib.loads((ROOT / "stack" / "catalog" / "runtimes.toml").read_text())["vllm"]
    ray = [r for r in recipe["requirements"] if r.startswith("ray==")]
    version = subprocess.run([str(vllm_bin / "ray"), "--version"], capture_output=True,
                             text=True, timeout=300).stdout
    assert ray and ray[0].removeprefix("ray==") in version, (ray, version)
