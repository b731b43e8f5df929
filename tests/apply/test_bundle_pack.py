"""The agent bundle's tarball: wheels stored (not deflated) inside one xz tarball, which the
agent-install step's own extraction line unpacks into the same files."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from deploys.probe import HostState
from deploys.services import Service
from deploys.steps import HostTarget, agent_install_step
from stack.snapshot import NodeFacts
from stack.wheelhouse import _pack


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        tool = zipfile.ZipInfo("demo/tool.so", (2026, 1, 2, 3, 4, 6))
        tool.external_attr = 0o755 << 16
        whl.writestr(tool, b"\x7fELF" + bytes(range(256)) * 64)
        whl.writestr("demo/__init__.py", "VALUE = 1\n" * 500)
        whl.writestr("demo-1.0.dist-info/RECORD", "demo/__init__.py,,\n")
    return path


def _extract_line() -> str:
    """The line of the agent-install script that unpacks the uploaded tarball."""
    target = HostTarget(
        node="n", prefix="/p", facts=NodeFacts(), probed=HostState(), drivers=[],
        runtimes=[], runtime_uploads={}, bundle=Path("/b"), bundle_version="v",
        wheel_name="w.whl", agent_toml="", agent_token="", models=[],
        agent_service=Service("agent", "s", "/p", ("a",)), router_service=None)
    script = agent_install_step(target).commands[-1]
    return next(line for line in script.splitlines() if "bundle.tar.xz |" in line)


def test_wheels_come_out_stored_with_their_files_and_modes(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "demo-1.0-py3-none-any.whl")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("demo\n")
    host = tmp_path / "host"
    host.mkdir()
    unpacked = _pack(host / "bundle.tar.xz", [wheel, requirements])

    subprocess.run(["sh", "-c", f"set -eu; {_extract_line()}"], cwd=host, check=True)
    out = host / "wheels" / wheel.name
    assert (host / "wheels" / "requirements.txt").read_text() == "demo\n"
    assert unpacked == out.stat().st_size + len("demo\n")
    with zipfile.ZipFile(wheel) as before, zipfile.ZipFile(out) as after:
        assert after.namelist() == before.namelist()
        for info in after.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert after.read(info) == before.read(info.filename)
            assert info.external_attr == before.getinfo(info.filename).external_attr
            assert info.date_time == before.getinfo(info.filename).date_time
    # the tarball is smaller than the deflated wheel it carries
    assert (host / "bundle.tar.xz").stat().st_size < wheel.stat().st_size
