"""Runtime installs: the exact script per case (`runtimes/*.json`), and the scripts run
for real in a temporary prefix (archive, prebuilt, system, interrupted install)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from deploys.runtimes import MARKER, RuntimeInstall, install_script
from stack.spec import RuntimeSpec

CASES = sorted((Path(__file__).parent / "runtimes").glob("*.json"))


def _install(case: dict[str, object], **override: object) -> RuntimeInstall:
    fields = {k: v for k, v in case["install"].items() if k != "spec"}  # type: ignore[union-attr]
    spec = RuntimeSpec.model_validate(case["install"]["spec"])  # type: ignore[index]
    return RuntimeInstall(spec=spec, **{**fields, **override})  # type: ignore[arg-type]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_install_script_matches_the_case(path: Path) -> None:
    case = json.loads(path.read_text())
    assert install_script(_install(case)).splitlines() == case["expect"]


def _sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


def _tarball(tmp: Path, top: str) -> tuple[Path, str]:
    src = tmp / "src" / top / "bin"
    src.mkdir(parents=True)
    (src / "llama-server").write_text("#!/bin/sh\necho ok\n")
    (src / "llama-server").chmod(0o755)
    (src / "libllama.so").write_text("lib")
    archive = tmp / "rt.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp / "src" / top, arcname=top)
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_archive_install_lands_with_bin_layout_and_marker_last(tmp_path: Path) -> None:
    archive, digest = _tarball(tmp_path, "llama-b1")
    upload = tmp_path / "upload.tgz"
    upload.write_bytes(archive.read_bytes())
    install = RuntimeInstall(
        name="llama.cpp", version="b1", prefix=str(tmp_path / "p"), upload=str(upload),
        sha256=digest, spec=RuntimeSpec(versions=["b1"], source="archive", url="local://rt.tar.gz"),
    )
    result = _sh(install_script(install))
    assert result.returncode == 0, result.stderr
    dest = Path(install.path)
    assert (dest / "bin" / "llama-server").exists()
    assert (dest / "bin" / "libllama.so").exists()
    assert (dest / MARKER).read_text().startswith("archive")
    assert not Path(install.path + ".tmp").exists()
    # a second run is a no-op even when the upload is gone
    assert _sh(install_script(install)).returncode == 0


def test_archive_with_wrong_sha256_fails_and_leaves_no_marker(tmp_path: Path) -> None:
    archive, _ = _tarball(tmp_path, "top")
    install = RuntimeInstall(
        name="llama.cpp", version="b2", prefix=str(tmp_path / "p"), upload=str(archive),
        sha256="0" * 64, spec=RuntimeSpec(versions=["b2"], source="archive", url="local://rt.tar.gz"),
    )
    result = _sh(install_script(install))
    assert result.returncode == 4
    assert "sha256 of llama.cpp b2 does not match" in result.stderr
    assert not (Path(install.path) / MARKER).exists()


def test_an_unmarked_leftover_is_replaced(tmp_path: Path) -> None:
    archive, digest = _tarball(tmp_path, "top")
    install = RuntimeInstall(
        name="llama.cpp", version="b3", prefix=str(tmp_path / "p"), upload=str(archive),
        sha256=digest, spec=RuntimeSpec(versions=["b3"], source="archive", url="local://rt.tar.gz"),
    )
    Path(install.path).mkdir(parents=True)
    (Path(install.path) / "half-written").write_text("x")
    assert _sh(install_script(install)).returncode == 0
    assert not (Path(install.path) / "half-written").exists()
    assert (Path(install.path) / "bin" / "llama-server").exists()


def test_system_runtime_links_bin_after_checking_the_binary(tmp_path: Path) -> None:
    spec = RuntimeSpec(versions=["sys"], source="system", path=str(tmp_path / "missing"))
    install = RuntimeInstall(name="llama.cpp", version="sys", prefix=str(tmp_path), spec=spec)
    failed = _sh(install_script(install))
    assert failed.returncode == 3 and "missing" in failed.stderr
    real = tmp_path / "usr-bin"
    real.mkdir()
    (real / "llama-server").write_text("#!/bin/sh\n")
    (real / "llama-server").chmod(0o755)
    spec = RuntimeSpec(versions=["sys"], source="system", path=str(real))
    install = RuntimeInstall(name="llama.cpp", version="sys", prefix=str(tmp_path), spec=spec)
    assert _sh(install_script(install)).returncode == 0
    assert (Path(install.path) / "bin" / "llama-server").exists()
