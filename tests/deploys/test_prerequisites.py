"""Build prerequisites: facts.sh checks what the recipes need, the plan says what apply
installs first (distro packages) and what it cannot (toolkits, with a hint naming the
host), and apply's runtime step runs those package commands before the install."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

from deploys.prerequisites import CHECKED, PACKAGES, TOOLKITS, install_commands, plan_prerequisites
from deploys.runtimes import RuntimeInstall, host_requires
from deploys.steps import runtime_step
from stack.catalog import Recipe, catalogue, recipe
from stack.config import load_text
from stack.snapshot import NodeFacts

ROOT = Path(__file__).resolve().parents[2]
TWO_LINES = '[stack]\nname = "lab"\n[models.m]\nsource = "hf://a/b"\nbackend = "llama.cpp"\n'


def _facts(distro: str, **tools: bool) -> NodeFacts:
    every = dict.fromkeys(CHECKED, True)
    every.update({k.replace("_", "."): v for k, v in tools.items()})
    return NodeFacts(address="10.0.0.1", distro=distro, build_tools=every)


def test_facts_sh_checks_exactly_the_listed_requirements_and_they_cover_the_catalogue() -> None:
    script = (ROOT / "deploys" / "facts.sh").read_text()
    loop = re.search(r"for tool in (.*?); do", script, re.S)
    assert loop is not None
    assert tuple(loop.group(1).replace("\\\n", " ").split()) == CHECKED
    needed = {r for entry in catalogue().values()
              for v in [entry, *entry.variants.values()] for r in v.requires}
    assert needed <= set(CHECKED)
    assert set(CHECKED) <= set(PACKAGES) | set(TOOLKITS)


def test_facts_sh_reports_tools_on_this_machine(tmp_path: Path) -> None:
    out = subprocess.run(["sh", str(ROOT / "deploys" / "facts.sh")], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                     "STACK_PREFIX": str(tmp_path)})
    tools = json.loads(out.stdout)["build_tools"]
    assert list(tools) == list(CHECKED)
    assert tools["tar"] is True and tools["/opt/dtk/llvm/bin/clang"] is False


def test_missing_build_tools_are_installed_first_with_the_distro_package_manager() -> None:
    pre = plan_prerequisites(["cmake", "c++", "tar"], _facts("debian 12", cmake=False,
                                                             **{"c++": False}))
    assert (pre.packages, pre.manager, pre.missing) == (("cmake", "g++"), "apt-get", ())
    assert install_commands(pre) == [
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && "
        "apt-get install -y -qq --no-install-recommends cmake g++"]
    rhel = plan_prerequisites(["c++"], _facts("rocky 9.4", **{"c++": False}))
    assert install_commands(rhel) == ["dnf install -y -q gcc-c++"]


def test_a_missing_toolkit_is_named_with_the_host_and_what_to_install() -> None:
    pre = plan_prerequisites(["cmake", "/usr/local/cuda/bin/nvcc"],
                             _facts("ubuntu 24.04", **{"/usr/local/cuda/bin/nvcc": False}))
    assert pre.packages == () and pre.missing == ("/usr/local/cuda/bin/nvcc",)
    hint = pre.hint("gpu-01", "llama.cpp")
    assert "CUDA toolkit" in hint and "gpu-01" in hint and "/usr/local/cuda/bin/nvcc" in hint


def test_what_the_facts_do_not_say_is_left_to_the_script() -> None:
    pre = plan_prerequisites(["cmake"], NodeFacts(address="x", distro="debian 12"))
    assert pre == type(pre)()
    unknown_distro = plan_prerequisites(["cmake"], _facts("arch", cmake=False))
    assert unknown_distro.packages == () and unknown_distro.missing == ("cmake",)


def test_a_controller_build_needs_no_build_tools_on_the_host() -> None:
    found = recipe(load_text(TWO_LINES), "llama.cpp", "0.3.36", "nvidia")
    assert isinstance(found, Recipe)
    assert host_requires(found.spec, prebuilt=True) == ["tar"]
    assert "/usr/local/cuda/bin/nvcc" in host_requires(found.spec, prebuilt=False)


def test_the_runtime_step_installs_the_packages_before_the_runtime() -> None:
    found = recipe(load_text(TWO_LINES), "llama.cpp", "0.3.36", "cpu")
    assert isinstance(found, Recipe)
    install = RuntimeInstall("llama.cpp", "0.3.36", found.spec, "/opt/stack", variant="cpu")

    # the fields runtime_step reads
    target = SimpleNamespace(node="cpu-01", facts=_facts("debian 12", cmake=False),
                             runtime_uploads={})
    step = runtime_step("runtime llama.cpp 0.3.36-cpu", target, install)  # type: ignore[arg-type]
    assert step.commands[0].endswith("apt-get install -y -qq --no-install-recommends cmake")
    assert "needs cmake on this host" in step.commands[-1]  # and the script checks again
