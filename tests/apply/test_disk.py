"""A host whose disk cannot hold the uploads is refused by name, with a hint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deploys.probe import HostState
from deploys.services import Service
from deploys.steps import HostTarget, ModelUpload
from stack.apply.targets import check_disk, upload_bytes
from stack.errors import ApplyError
from stack.snapshot import NodeFacts


def _target(tmp_path: Path, free: int, model_size: int) -> HostTarget:
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(b"x" * 1000)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"m" * model_size)
    facts = NodeFacts(disk_free_bytes=free)
    return HostTarget(
        node="gpu-01", prefix="/opt/stack", facts=facts,
        probed=HostState(),
        drivers=[], runtimes=[], runtime_uploads={}, bundle=bundle, bundle_version="v",
        wheel_name="w.whl", agent_toml="", agent_token="", models=[
            ModelUpload(model, "/opt/stack/models/m/m.gguf", "00")],
        agent_service=Service("agent", "s", "/opt/stack", ("a",)), router_service=None,
    )


def test_a_full_disk_is_named_with_the_host_and_a_hint(tmp_path: Path) -> None:
    target = _target(tmp_path, free=2000, model_size=50_000)
    assert upload_bytes(target) == 3 * 1000 + 50_000
    with pytest.raises(ApplyError) as err:
        check_disk("gpu-01", "/opt/stack", target.facts, target)
    assert err.value.message.startswith("`gpu-01` has 0.0 GiB free at `/opt/stack`")
    assert "free space on that disk" in err.value.hint


def test_enough_disk_passes(tmp_path: Path) -> None:
    target = _target(tmp_path, free=10**9, model_size=50_000)
    check_disk("gpu-01", "/opt/stack", target.facts, target)


def test_the_bundle_counts_as_its_extracted_wheels_and_the_venv(tmp_path: Path) -> None:
    # an xz tarball takes a fraction of its wheels: both they and the venv are counted
    target = dataclasses.replace(_target(tmp_path, free=10**9, model_size=50_000),
                                 bundle_bytes=4_700)
    assert upload_bytes(target) == 1000 + 2 * 4_700 + 50_000
