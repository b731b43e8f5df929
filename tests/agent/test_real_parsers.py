"""Every llama-server, ggml-rpc-server and sd-server command line the agent builds (each
case in `commands/`, GPU ones included) is accepted by the real program's own argument
parser: the suite's CPU builds of llama.cpp and stable-diffusion.cpp are run with it.
Their model files do not exist, so each program stops right after parsing, at the model
load (or, for the RPC server, at binding an address this machine does not have). The
files the agent writes beside a launch (the API key file) are written under a temporary
instance folder; llama-server connects to its `--rpc` workers while parsing, so their
addresses are pointed at a real ggml-rpc-server on loopback. What is proven: every flag
exists, has a value where one is needed, and a value of the right form; not that a GPU
build would run it.

A misspelt flag makes each program refuse the line: the check can fail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.assignment import Instance
from agent.commands import Context, build_launch

CASES = sorted((Path(__file__).parent / "commands").glob("*.json"))
# what each program prints when its parser refuses a line, and once it got past parsing
REFUSED = ("invalid argument", "error while handling argument", "unknown argument",
           "invalid parameter for argument", "Invalid parameters", "terminate called")
PARSED = {"llama-server": "llama_server: initializing",
          "ggml-rpc-server": "Failed to create server socket",
          "sd-server": "] stable-diffusion.cpp"}


def _argv(case_file: Path, instance_dir: Path | None = None) -> list[str] | None:
    """The case's command line; with `instance_dir`, built for that folder and with the
    launch's files written there."""
    case = json.loads(case_file.read_text())
    if "error" in case:
        return None
    inst = Instance.model_validate(case["instance"])
    folder = str(instance_dir) if instance_dir else case.get("instance_dir",
                                                            "/opt/stack/state/instances")
    launch = build_launch(inst, Context(case["model_path"], folder))
    if instance_dir is not None:
        for path, text in launch.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    return launch.argv


@pytest.fixture(scope="module")
def rpc_worker(llama_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ggml-rpc-server on loopback, what `--rpc` addresses are pointed at."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("rpc") / "rpc.log"
    proc = subprocess.Popen([str(llama_bin / "ggml-rpc-server"), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "LD_LIBRARY_PATH": str(llama_bin)})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def _local_rpc(args: list[str], worker: str) -> list[str]:
    """`--rpc A,B` -> the same number of addresses, each the loopback worker's."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg == "--rpc":
            out[i + 1] = ",".join(worker for _ in out[i + 1].split(","))
    return out


def _cases(program: str) -> list[Path]:
    return [c for c in CASES if (argv := _argv(c)) and Path(argv[0]).name == program]


def run(folder: Path, program: str, args: list[str], tmp: Path) -> str:
    """The program's output for `args` (it stops by itself, or after 20 s)."""
    try:
        done = subprocess.run([str(folder / program), *args], capture_output=True, text=True,
                              timeout=20, cwd=tmp, errors="replace",
                              env={**os.environ, "LD_LIBRARY_PATH": str(folder)})
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        return out.decode(errors="replace") if isinstance(out, bytes) else out
    return done.stdout + done.stderr


def accepted(output: str, program: str) -> bool:
    return PARSED[program] in output and not any(r in output for r in REFUSED)


def _misspelt(args: list[str]) -> list[str]:
    """The line with its first long flag misspelt (`--port` -> `--portt`)."""
    index = next(i for i, a in enumerate(args) if a.startswith("--"))
    return [*args[:index], args[index] + "t", *args[index + 1:]]


LLAMA = _cases("llama-server")
RPC = _cases("ggml-rpc-server")
SD = _cases("stable-diffusion.cpp") + _cases("sd-server")


def test_every_command_case_of_these_programs_is_covered() -> None:
    assert len(LLAMA) >= 9 and len(RPC) == 1 and len(SD) == 4, (LLAMA, RPC, SD)


@pytest.mark.parametrize("case_file", LLAMA, ids=[c.stem for c in LLAMA])
def test_llama_server_parses_the_line(case_file: Path, llama_bin: Path, rpc_worker: str,
                                      tmp_path: Path) -> None:
    args = _local_rpc((_argv(case_file, tmp_path) or [])[1:], rpc_worker)
    output = run(llama_bin, "llama-server", args, tmp_path)
    assert accepted(output, "llama-server"), output[-2000:]
    refused = run(llama_bin, "llama-server", _misspelt(args), tmp_path)
    assert not accepted(refused, "llama-server"), refused[-2000:]


@pytest.mark.parametrize("case_file", RPC, ids=[c.stem for c in RPC])
def test_rpc_server_parses_the_line(case_file: Path, llama_bin: Path, tmp_path: Path) -> None:
    args = (_argv(case_file) or [])[1:]
    output = run(llama_bin, "ggml-rpc-server", args, tmp_path)
    assert accepted(output, "ggml-rpc-server"), output[-2000:]
    short = [*args[:-1]]  # the port's value left out
    assert not accepted(run(llama_bin, "ggml-rpc-server", short, tmp_path),
                        "ggml-rpc-server")


@pytest.mark.parametrize("case_file", SD, ids=[c.stem for c in SD])
def test_sd_server_parses_the_line(case_file: Path, sd_bin: Path, tmp_path: Path) -> None:
    args = (_argv(case_file) or [])[1:]
    output = run(sd_bin, "sd-server", args, tmp_path)
    assert accepted(output, "sd-server"), output[-2000:]
    refused = run(sd_bin, "sd-server", _misspelt(args), tmp_path)
    assert not accepted(refused, "sd-server"), refused[-2000:]
