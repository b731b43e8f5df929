"""Each host gets the agent's wheels for its own python3, architecture and C library.

Pure parts (the target from the facts, the pip platform tags, the version a host should
report, the plan) and the errors a target the package index cannot serve gives; the wheels
themselves are downloaded in tests/apply/test_apply_other_python.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.bundle_target import BundleTarget, bundle_target, host_agent_version
from stack.changes import _host_changes
from stack.config import load_text
from stack.errors import ApplyError
from stack.placement import Placements, with_instances
from stack.snapshot import AgentFacts, NodeFacts, Observed
from stack.wheelhouse import _download_error, agent_bundle, bundle_version

DEBIAN = NodeFacts(python="3.11", libc="glibc 2.36", arch="x86_64")
UBUNTU_ARM = NodeFacts(python="3.12", libc="glibc 2.39", arch="aarch64")


def test_the_target_is_read_from_the_facts_and_names_the_agent_version() -> None:
    assert bundle_target(UBUNTU_ARM) == BundleTarget("3.12", "linux", "aarch64", "glibc 2.39")
    assert host_agent_version("0.1.0+abc", UBUNTU_ARM) == \
        "0.1.0+abc@py3.12-linux-aarch64-glibc2.39"
    mac = NodeFacts(os="darwin", distro="macos 14.5", arch="arm64", python="3.13")
    assert host_agent_version("0.1.0+abc", mac) == "0.1.0+abc@py3.13-darwin-arm64-macos14.5"
    # an older snapshot does not say: the version without a target, as before
    assert host_agent_version("0.1.0+abc", NodeFacts()) == "0.1.0+abc"
    assert bundle_version(target=bundle_target(DEBIAN)) == \
        f"{bundle_version()}@py3.11-linux-x86_64-glibc2.36"


def test_linux_platform_tags_go_from_the_hosts_glibc_down_to_the_oldest_manylinux() -> None:
    tags = BundleTarget("3.12", "linux", "aarch64", "glibc 2.31").pip_platforms()
    assert tags[0] == "manylinux_2_31_aarch64" and "manylinux_2_17_aarch64" in tags
    assert tags[-3:] == ["manylinux2014_aarch64", "manylinux2010_aarch64", "manylinux1_aarch64"]
    assert "manylinux_2_32_aarch64" not in tags
    # a glibc of unknown version is taken for manylinux2014's
    assert BundleTarget("3.12", "linux", "x86_64").pip_platforms()[0] == \
        "manylinux_2_17_x86_64"
    assert BundleTarget("3.12", "linux", "x86_64", "musl").pip_platforms() == \
        ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64"]
    assert BundleTarget("3.12", "darwin", "arm64", macos="14.5").pip_platforms() == \
        ["macosx_14_0_arm64"]


def test_a_python_older_than_the_agent_needs_is_refused_naming_the_host() -> None:
    old = BundleTarget("3.10", "linux", "x86_64", "glibc 2.31")
    with pytest.raises(ApplyError) as err:
        agent_bundle(target=old, hosts=("node-03",))
    assert err.value.message == ("no agent can be installed on `node-03`: its python3 is "
                                 "3.10; the agent needs 3.11 or newer")
    assert err.value.hint is not None and "python3 3.11 or newer" in err.value.hint


def test_a_wheel_the_index_lacks_is_named_with_the_hosts_and_the_target(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELSTACK_CACHE", str(tmp_path))
    target = BundleTarget("3.12", "linux", "riscv64", "glibc 2.36")
    pip = ("ERROR: Could not find a version that satisfies the requirement uvloop>=0.19 "
           "(from versions: none)\nERROR: No matching distribution found for uvloop>=0.19\n")
    err = _download_error(pip, target, ("node-02", "node-04"))
    assert err.message == ("the package index has no wheel of `uvloop>=0.19` for `node-02`, "
                           "`node-04` (CPython 3.12, linux riscv64, glibc 2.36), which the "
                           "agent needs")
    assert err.hint == ("give that host a python3 the package publishes wheels for, or build "
                        "the wheel on such a host (`pip wheel 'uvloop>=0.19'`) and put it "
                        f"into `{tmp_path / 'wheelhouse' / 'local'}`.")


def test_a_host_on_another_python_is_planned_its_own_agent_and_is_clean_after_apply() -> None:
    spec = load_text("")
    facts = Observed(nodes={"a": DEBIAN.model_copy(update={"agent": AgentFacts(
        version="0.1.0+abc", running=True)}), "b": UBUNTU_ARM})
    changes = {c.address: c.reason for c in _host_changes(spec, facts, Placements(()),
                                                          "0.1.0+abc")}
    assert changes == {
        "node.a.agent": "agent 0.1.0+abc -> 0.1.0+abc@py3.11-linux-x86_64-glibc2.36",
        "node.b.agent": "install the agent 0.1.0+abc@py3.12-linux-aarch64-glibc2.39"}
    applied = with_instances(facts, Placements(()), agent_version="0.1.0+abc")
    assert _host_changes(spec, applied, Placements(()), "0.1.0+abc") == []
