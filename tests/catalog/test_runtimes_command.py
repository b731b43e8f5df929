"""`stack runtimes`: the catalogue, the versions stack.toml pins, and per node of a facts
snapshot the folder each backend would use there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack.cli import run
from tests.schedule.cases_lib import load_facts

CASE = json.loads((Path(__file__).parents[1] / "plan" / "cases" / "catalogue_runtimes_per_node"
                   / "case.json").read_text())
HOSTS = """
[hosts.cpu-01]
address = "10.0.0.10"
[hosts.gpu-nv]
address = "10.0.0.11"
[hosts.gpu-amd]
address = "10.0.0.12"
"""


def _stack(tmp_path: Path, extra: str = "") -> Path:
    text = CASE["stack"].replace('name = "lab"\n', 'name = "lab"\n' + HOSTS, 1) + extra
    (tmp_path / "stack.toml").write_text(text)
    facts = load_facts(CASE["facts"])
    (tmp_path / "facts.json").write_text(facts.model_dump_json())
    return tmp_path


def test_each_node_gets_the_variant_of_its_devices(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stack(tmp_path)
    assert run(["runtimes", "-f", str(folder / "stack.toml"), "--facts",
                str(folder / "facts.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = {(r["node"], r["devices"]): r["runtimes"] for r in out["nodes"]}
    assert got[("gpu-nv", "nvidia")] == {"llama.cpp": "0.3.36-cuda", "vllm": "0.33.0-cuda"}
    assert got[("gpu-amd", "amd")] == {"llama.cpp": "0.3.36-rocm", "vllm": "0.18.0-rocm"}
    assert got[("cpu-01", "cpu")]["llama.cpp"] == "0.3.36-cpu"
    assert "no vllm build for cpu devices" in got[("cpu-01", "cpu")]["vllm"]
    rows = {(r["runtime"], r["variant"]): r for r in out["catalogue"]}
    assert rows[("vllm", "rocm")]["versions"] == "0.18.0 (default)"
    assert rows[("llama.cpp", "cuda")]["vendors"] == ["nvidia"]


def test_pinned_and_replaced_runtimes_are_said(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stack(tmp_path, '\n[runtimes.vllm]\nversions = ["0.30.0"]\n\n'
                    '[runtimes."llama.cpp"]\nversions = ["b6700"]\nsource = "build"\n'
                    'url = "https://example.com/llama.cpp-{version}.tar.gz"\n')
    assert run(["runtimes", "-f", str(folder / "stack.toml"), "--facts",
                str(folder / "facts.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["runtime"], r["variant"]): r for r in out["catalogue"]}
    assert rows[("vllm", "cuda")]["versions"] == "0.30.0 (pinned in stack.toml)"
    assert rows[("llama.cpp", "cpu")]["versions"] == "replaced by [runtimes] in stack.toml"
    got = {(r["node"], r["devices"]): r["runtimes"] for r in out["nodes"]}
    assert got[("gpu-amd", "amd")] == {"llama.cpp": "b6700", "vllm": "0.30.0-rocm"}
    assert out["stack_runtimes"] == {"vllm": "catalogue", "llama.cpp": "own recipe"}


def test_the_table_names_every_runtime(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stack(tmp_path)
    assert run(["runtimes", "-f", str(folder / "stack.toml")]) == 0
    text = capsys.readouterr().out
    for name in ("llama.cpp", "vllm", "sglang", "vox-box", "mindie"):
        assert name in text
