"""Mutated stack.toml files through the real `stack validate` and `stack plan` (in process,
planning against a facts snapshot): whatever the file holds, the command exits 0 with a
valid plan, or exits 1 with errors that name stack.toml with a line number and give a
hint. Never a traceback.

The files start from every valid stack.toml in the repository (the root one, the valid
config cases, the examples in docs/getting-started.md, and a stack that places replicas
and installs drivers), and are mutated as data (a value replaced by a hostile, huge,
empty or wrongly typed one; a key removed, renamed or added) or as text (characters
inserted, deleted or replaced; a line repeated; the file cut short). Hypothesis runs
derandomized with a fixed number of examples, so CI sees the same files every time.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit
import tomlkit.exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import stack.spec as spec_module
from stack.cli import run
from stack.config import check_text
from stack.errors import MetadataUnavailable

ROOT = Path(__file__).resolve().parents[2]
QWEN_CONFIG = ROOT / "tests" / "estimate" / "configs" / "qwen2.5-7b-instruct.json"
EXAMPLES = 1000
LOCATED = re.compile(r"\(stack\.toml:\d+:\d+\)")
H100 = {"vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85520809984,
        "compute_capability": "9.0"}
RICH = """\
[stack]
name = "lab"
prefix = "/srv/stack"
port_range = [41000, 41099]

[hosts.gpu-01]
address = "10.0.0.11"
user = "ops"

[hosts.local]
address = "@local"

[nodes."gpu-*"]
labels = { zone = "a" }
drivers.nvidia = { mode = "install", version = "580" }
reserved_vram = "2GiB"

[nodes."*"]
cpu_inference = true

[runtimes.vllm]
source = "pip"
versions = ["0.11.0", "0.10.2"]
package = "vllm=={version}"
env = { VLLM_LOGGING_LEVEL = "INFO" }

[runtimes."llama.cpp"]
source = "archive"
versions = ["b6000"]
url = "https://example.org/llama-{version}.tar.gz"
sha256 = { "b6000" = "abababababababababababababababababababababababababababababababab" }

[models.qwen]
source = "local://models/qwen"
backend = "vllm"
backend_version = "0.11.0"
replicas = 2
context = 8192
gpu = { vendor = ["nvidia"], min_memory = "24GiB" }
aliases = ["default"]
args = ["--seed", "1"]
selector = ["zone=a"]

[router]
listen = "0.0.0.0:8080"

[[keys]]
name = "team-a"
hash = "sha256:abababababababababababababababababababababababababababababababab"
models = ["qwen"]
rpm = 600
"""


def _corpus() -> list[str]:
    texts = [RICH, (ROOT / "stack.toml").read_text()]
    for case in sorted((ROOT / "tests" / "config" / "cases").glob("*.toml")):
        data = tomllib.loads(case.read_text())
        if "error" not in data and "errors" not in data:
            texts.append(data["stack"])
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    # hosts, node settings, runtimes and models (its router example needs keys made later)
    texts.append("\n".join(re.findall(r"```toml\n(.*?)```", guide, re.S)[:3]))
    valid = [t for t in texts if check_text(t)[0] is not None]
    assert len(valid) == len(texts), "every file the fuzzer starts from is valid"
    return valid


CORPUS = _corpus()
# Values a mutation puts in place: hostile, huge, empty, of every TOML type.
HOSTILE = ["$(touch /tmp/pwned)", "`id`", "x; rm -rf /", "a\nb", "../../../etc", "/", "..",
           "", " ", "latest", "x" * 5000, "%n$MAINPID", "\u202eevil", "\x00", "-rf",
           "580.95.05", "6.4.0", "7.0", "hf://../..", "hf://a/b", "local://../../x",
           "local://models/qwen", "/models/q", "0.0.0.0:0", "[::1]:99999", "127.0.0.1:8080",
           "*", "gpu-*", "k=v", "k in (", "zone=a", "24GiB", "1e400 GiB", "-1 GiB", "auto",
           "0.11.0", "vllm", "llama.cpp", "custom", "qwen", "gpu-01", "local", "nvidia"]
INTS = st.one_of(st.sampled_from([0, -1, 1, 2, 7, 255, 256, 1000, 1001, 65535, 65536,
                                  2**31, 2**63 - 1, 2**63, 10**30]), st.integers())
FLOATS = st.sampled_from([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e308, 0.5,
                          1.5, -1.0])
STRINGS = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))
SCALARS = st.one_of(STRINGS, INTS, FLOATS, st.booleans())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["a", "name", "version", "x y"]),
                                            inner, max_size=2)),
    max_leaves=6,
)


def _like(draw: st.DrawFn, value: Any) -> Any:
    """A new value, mostly of the same TOML type as `value` (so it gets past the types)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(VALUES)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(INTS)
    if isinstance(value, float):
        return draw(FLOATS)
    if isinstance(value, str):
        return draw(STRINGS)
    if isinstance(value, list):
        return [*value, draw(SCALARS if not value else st.just(value[0]))] \
            if draw(st.booleans()) else [draw(SCALARS) for _ in value]
    return draw(VALUES)


FIELD_NAMES = sorted({name for model in vars(spec_module).values()
                      if isinstance(model, type) and issubclass(model, BaseModel)
                      and model.__module__ == spec_module.__name__
                      for name in model.model_fields})


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        data = data[step]
    return data


def _mutate_data(draw: st.DrawFn, text: str) -> str:
    try:
        data = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.TOMLKitError:  # an earlier mutation broke the syntax
        return _mutate_text(draw, text)
    paths = list(_paths(data))
    leaves = [p for p in paths if p and not isinstance(_at(data, p), dict | list)]
    path = draw(st.sampled_from(leaves if leaves and draw(st.integers(0, 4)) else paths))
    parent = _at(data, path[:-1])
    action = draw(st.sampled_from(["replace"] * 6 + ["delete", "rename", "add"]))
    if not path or action == "add":
        target = parent if not path else parent[path[-1]]
        if isinstance(target, dict):
            target[draw(st.sampled_from(FIELD_NAMES))] = draw(VALUES)
        elif isinstance(target, list):
            target.append(draw(VALUES))
    elif action == "replace":
        parent[path[-1]] = _like(draw, parent[path[-1]])
    elif action == "delete":
        del parent[path[-1]]
    elif action == "rename" and isinstance(parent, dict):
        parent[draw(st.sampled_from([*HOSTILE[:12], *FIELD_NAMES]))] = parent.pop(path[-1])
    try:
        return tomlkit.dumps(data)
    except (TypeError, ValueError, tomlkit.exceptions.TOMLKitError):
        # a value TOML cannot hold: keep the file as it was
        return text


def _mutate_text(draw: st.DrawFn, text: str) -> str:
    if not text:
        return draw(st.sampled_from(["[", "=", "a = ", "[[keys]]\n"]))
    at = draw(st.integers(0, len(text) - 1))
    action = draw(st.sampled_from(["insert", "delete", "replace", "repeat line", "cut"]))
    piece = draw(st.sampled_from(["[", "]", "{", "}", '"', "'", "=", "\n", ".", ",", "#",
                                  "\\", '"""', "'''", "[[", "0", "-", "\x00", "é"]))
    if action == "insert":
        return text[:at] + piece + text[at:]
    if action == "delete":
        return text[:at] + text[at + draw(st.integers(1, 8)):]
    if action == "replace":
        return text[:at] + piece + text[at + 1:]
    if action == "repeat line":
        lines = text.splitlines(keepends=True)
        line = draw(st.integers(0, len(lines) - 1))
        return "".join([*lines[:line + 1], lines[line], *lines[line + 1:]])
    return text[:at]


@st.composite
def stack_files(draw: st.DrawFn) -> str:
    """A valid stack.toml with one or two data mutations, and a text mutation in one
    of four."""
    # half the files start from the one that places replicas and installs drivers
    text = CORPUS[0] if draw(st.booleans()) else draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 2))):
        text = _mutate_data(draw, text)
    if draw(st.integers(0, 3)) == 0:  # most text mutations only test the TOML parser
        text = _mutate_text(draw, text)
    return text


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "models" / "qwen").mkdir(parents=True)
    shutil.copy(QWEN_CONFIG, folder / "models" / "qwen" / "config.json")
    nodes = {
        "gpu-01": {"address": "10.0.0.11", "memory_bytes": 540 * 10**9, "os": "linux",
                   "arch": "x86_64", "distro": "ubuntu 24.04", "kernel": "6.8.0-45-generic",
                   "disk_free_bytes": 2 * 10**12, "runtimes": {"vllm": ["0.10.2"]},
                   "pci_accelerators": {"nvidia": 2}, "agent": {},
                   "gpus": [{**H100, "index": g, "uuid": f"GPU-{g}"} for g in range(2)]},
        "local": {"address": "127.0.0.1", "memory_bytes": 16 * 10**9, "os": "linux",
                  "arch": "x86_64", "disk_free_bytes": 10**11, "agent": {}},
    }
    (folder / "facts.json").write_text(json.dumps({"format_version": 1, "nodes": nodes}))
    (folder / ".stack").mkdir()
    (folder / ".stack" / "secret").write_bytes(b"s" * 32)
    return folder


def _stack(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(argv))
    return code, out.getvalue(), err.getvalue()


def _no_network(*_: object) -> None:
    raise MetadataUnavailable("this test reads no model hub", hint="")


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(text=stack_files())
def test_a_mutated_stack_toml_is_planned_or_refused_with_a_located_error(
    text: str, stack_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("stack.sources._fetch_hf", _no_network)
    monkeypatch.setattr("stack.sources._fetch_modelscope", _no_network)
    path = stack_dir / "stack.toml"
    path.write_text(text, encoding="utf-8")
    for command in (["validate"], ["plan", "--facts", str(stack_dir / "facts.json"),
                                   "--allow-unschedulable"]):
        code, _, err = _stack(command[0], "-f", str(path), *command[1:])
        if code == 0:
            continue
        assert code == 1, (command, code, err)
        errors = [block for block in err.split("error: ")[1:]]
        assert errors, err
        for block in errors:
            assert LOCATED.search(block) and "\nhint: " in block, (command, err)
