"""The agent bundle carries the ModelScope library only for stacks that use it."""

from __future__ import annotations

from pathlib import Path

from deploys.probe import HostState
from deploys.services import Service
from deploys.steps import HostTarget, agent_install_step
from stack.config import load_text
from stack.pipeline import agent_version
from stack.snapshot import NodeFacts
from stack.wheelhouse import ROOT, AgentBundle, _dependencies, agent_extras, bundle_version

HF = '[models.q]\nsource = "hf://Qwen/Qwen2.5-7B-Instruct"\n'
MS = '[models.m]\nsource = "modelscope://Qwen/Qwen2.5-7B-Instruct"\n'


def test_modelscope_is_an_extra_of_the_bundle_only_when_a_model_has_a_modelscope_source(
        tmp_path: Path) -> None:
    assert agent_extras(load_text(HF)) == ()
    assert agent_extras(load_text(HF + MS)) == ("modelscope",)
    assert agent_version(load_text(HF)) == bundle_version()
    assert agent_version(load_text(HF + MS)) == bundle_version() + ".modelscope"
    deps = _dependencies(ROOT, ("modelscope",))
    assert [d for d in deps if d.startswith("modelscope")] == ["modelscope>=1.9,<2"]
    assert not [d for d in _dependencies(ROOT) if d.startswith("modelscope")]
    assert [d for d in _dependencies(ROOT) if d.startswith("huggingface-hub")]
    assert not [d for d in _dependencies(ROOT) if d.startswith(("pyinfra", "gevent", "rich"))]

    bundle = AgentBundle(tmp_path / "bundle.tar", "v", "modelstack-0.1.0-py3-none-any.whl",
                         ("modelscope",))
    target = HostTarget(
        node="gpu-01", prefix="/opt/stack", facts=NodeFacts(), probed=HostState(),
        drivers=[], runtimes=[], runtime_uploads={},
        bundle=bundle.tarball, bundle_version="v", wheel_name=bundle.wheel_name,
        agent_toml="", agent_token="", models=[],
        agent_service=Service("agent", "s", "/opt/stack", ("a",)), router_service=None)
    script = agent_install_step(target).commands[-1]
    # the bundle's requirements.txt lists the extras' requirements; the wheel goes alone
    assert "--no-index --find-links wheels -r wheels/requirements.txt" in script
    assert "--no-index --no-deps --force-reinstall " \
        "wheels/modelstack-0.1.0-py3-none-any.whl" in script
