"""Runtime installs: the exact script per case (`runtimes/*.json`), and the scripts run
for real in a temporary prefix (archive, prebuilt, system, interrupted install; the
catalogue's stable-diffusion.cpp CPU recipe from its real build)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import deploys
from agent.assignment import Instance
from agent.commands import Context, build_launch
from deploys.runtimes import (
    MARKER,
    RuntimeInstall,
    install_script,
    installed,
    recipe_digest,
    removal_script,
    runtime_path,
    unused_versions,
)
from stack.apply.targets import runtime_install
from stack.catalog import Recipe, prebuilt_on_controller, recipe
from stack.config import load_text
from stack.errors import ConfigError
from stack.snapshot import NodeFacts
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


def test_the_cpu_stable_diffusion_cpp_recipe_installs_its_real_build_and_sd_server_runs(
    tmp_path: Path, sd_bin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catalogue's CPU recipe for real: `scripts/setup-sd-cpp` built it with the
    recipe's cmake args and targets (tests/catalog checks they are the same), apply takes
    that build as the controller's prebuilt one (`runtime_install`, as for a host of this
    OS and arch), the recipe's install script puts it in
    PREFIX/runtimes/stable-diffusion.cpp/0.4.7-cpu, and the agent's sd-server command line
    (tests/agent/commands/stable_diffusion_cpp.json) parses: sd-server reads its options in
    order and stops at `--help` with 0 only when every one before it is known."""
    monkeypatch.setenv("MODELSTACK_CACHE", str(sd_bin.parents[2]))  # CACHE/NAME/VERSION/bin
    spec = load_text('[stack]\nname = "lab"\n\n[models.sd]\nsource = "/m/sd.gguf"\n'
                     'backend = "stable-diffusion.cpp"\n')
    found = recipe(spec, "stable-diffusion.cpp", "0.4.7", "cpu")
    assert isinstance(found, Recipe)
    facts = NodeFacts(os=platform.system().lower(), arch=platform.machine())
    assert prebuilt_on_controller(found, f"{facts.os}-{facts.arch}")  # what the plan says
    prefix = tmp_path / "p"
    install, local = runtime_install(tmp_path, found, str(prefix), facts)
    assert install.prebuilt and local == sd_bin.parent / "bin.tar.gz"
    assert install.upload is not None
    Path(install.upload).parent.mkdir(parents=True)
    shutil.copy(local, install.upload)  # what apply's upload does
    result = subprocess.run(["sh", "-c", install_script(install)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert install.path == f"{prefix}/runtimes/stable-diffusion.cpp/0.4.7-cpu"
    assert (Path(install.path) / MARKER).exists()
    for binary in ("sd-server", "sd-cli"):
        assert os.access(Path(install.path) / "bin" / binary, os.X_OK)

    case = json.loads((Path(__file__).parents[1] / "agent" / "commands" /
                       "stable_diffusion_cpp.json").read_text())
    inst = Instance.model_validate({**case["instance"], "runtime_path": install.path})
    launch = build_launch(inst, Context(case["model_path"], str(tmp_path / "instances")))
    assert launch.argv[0] == f"{install.path}/bin/sd-server"
    ran = subprocess.run([*launch.argv, "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **launch.env})
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    for option in ("--listen-ip", "--listen-port", "--model", "--steps"):
        assert option in ran.stdout
    unknown = subprocess.run([*launch.argv, "--no-such-option", "--help"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, **launch.env})
    assert unknown.returncode != 0  # so the 0 above says every option was known


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


@pytest.mark.parametrize(("prefix", "name", "version"), [
    ("/opt/stack", "vllm", "../../../victim"), ("/opt/stack", "..", "0.11.0"),
    ("/opt/stack", "vllm", ".."), ("/opt/stack", "vllm", "a/b"),
    ("/opt/stack", "vllm", "1\nrm -rf /"), ("/opt/stack", "vllm", ""),
    ("/opt/../etc", "vllm", "0.11.0"), ("/", "vllm", "0.11.0"), ("opt", "vllm", "0.11.0"),
])
def test_a_runtime_path_is_built_only_from_plain_folder_names_below_the_prefix(
    prefix: str, name: str, version: str,
) -> None:
    with pytest.raises(ConfigError):
        runtime_path(prefix, name, version)
    with pytest.raises(ConfigError):
        removal_script(prefix, name, [version])
    spec = RuntimeSpec.model_construct(versions=[version], source="pip", package="x")
    with pytest.raises(ConfigError):
        install_script(RuntimeInstall(name=name, version=version, prefix=prefix, spec=spec))


def test_removal_leaves_host_folders_that_are_not_plain_names_alone() -> None:
    installed = {"vllm": ["0.10.0", "..", "$(touch x)"], "../etc": ["1"]}
    assert unused_versions(installed, {"vllm": []}, set()) == {"vllm": ["0.10.0"]}


def _deleted(script: str) -> list[str]:
    """The paths every `rm` in the script is given (each line lexed as sh would)."""
    paths = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for index, word in enumerate(words):
            if word != "rm":
                continue
            for arg in words[index + 1:]:
                if set(arg) <= set(";&|()"):
                    break
                if not arg.startswith("-"):
                    paths.append(arg)
    return paths


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_install_and_removal_scripts_delete_only_below_the_runtime_folder(path: Path) -> None:
    install = _install(json.loads(path.read_text()))
    runtimes = f"{install.prefix.rstrip('/')}/runtimes/"
    scripts = [install_script(install), removal_script(install.prefix, install.name,
                                                       [install.version, "0.1"])]
    deleted = [p for script in scripts for p in _deleted(script)]
    assert deleted
    for target in deleted:
        assert posixpath.normpath(target).startswith(runtimes + install.name + "/"), target


@pytest.mark.parametrize("pattern", ["../x", "/etc/passwd", "a/../../b", ".", "a/./b",
                                     "a b", "a;rm", "$(x)", "a/", ""])
def test_remove_files_are_plain_names_in_site_packages(pattern: str) -> None:
    """`remove_files` is left unquoted in the script (for its `*`): nothing else passes."""
    with pytest.raises(ValueError):
        RuntimeSpec(versions=["1"], source="pip", remove_files=[pattern])
    assert RuntimeSpec(versions=["1"], source="pip",
                       remove_files=["torchaudio/lib/*.so"]).remove_files


def test_the_recipe_digest_follows_what_makes_the_folder_and_nothing_else() -> None:
    base = RuntimeSpec(versions=["0.33.0"], source="pip", package="vllm=={version}",
                       requirements=["ray==2.60.0"])
    digest = recipe_digest(base, "0.33.0", "cuda")
    same = [base.model_copy(update={"versions": ["0.33.0", "0.34.0"]}),
            base.model_copy(update={"requires": ["python3"], "env": {"A": "1"}})]
    assert [recipe_digest(s, "0.33.0", "cuda") for s in same] == [digest, digest]
    other = [base.model_copy(update={"requirements": []}),
             base.model_copy(update={"extra_index_url": "https://example.org/simple"}),
             base.model_copy(update={"sha256": {"0.33.0": "ab" * 32}})]
    digests = {recipe_digest(s, "0.33.0", "cuda") for s in other}
    digests |= {recipe_digest(base, "0.34.0", "cuda"), recipe_digest(base, "0.33.0", "rocm")}
    assert digest not in digests and len(digests) == 5
    # another version's checksum does not touch this one
    assert recipe_digest(base.model_copy(update={"sha256": {"0.34.0": "ab" * 32}}),
                         "0.33.0", "cuda") == digest


def test_a_folder_counts_as_installed_only_by_its_own_recipe() -> None:
    runtimes = {"vllm": ["0.33.0-cuda"]}
    assert installed({"vllm": {"0.33.0-cuda": "a" * 16}}, runtimes, "vllm", "0.33.0-cuda",
                     "a" * 16)
    assert not installed({"vllm": {"0.33.0-cuda": "a" * 16}}, runtimes, "vllm",
                         "0.33.0-cuda", "b" * 16)
    assert not installed({}, runtimes, "vllm", "0.33.0-cuda", "a" * 16)  # an older marker
    assert installed(None, runtimes, "vllm", "0.33.0-cuda", "a" * 16)  # facts do not say
    assert not installed(None, runtimes, "vllm", "0.34.0-cuda", "a" * 16)


def test_a_changed_recipe_installs_the_folder_again_and_facts_read_its_digest(
        tmp_path: Path) -> None:
    old, new = tmp_path / "bin-old", tmp_path / "bin-new"
    for folder in (old, new):
        folder.mkdir()
        (folder / "llama-server").write_text(f"#!/bin/sh\necho {folder.name}\n")
        (folder / "llama-server").chmod(0o755)

    def install(path: Path) -> RuntimeInstall:
        spec = RuntimeSpec(versions=["b1"], source="system", path=str(path))
        return RuntimeInstall(name="llama.cpp", version="b1", prefix=str(tmp_path), spec=spec)

    first = install(old)
    assert _sh(install_script(first)).returncode == 0
    marker = Path(first.path) / MARKER
    assert marker.read_text().splitlines()[1] == f"recipe {first.digest}"
    stamp = marker.stat().st_mtime_ns
    assert _sh(install_script(first)).returncode == 0 and marker.stat().st_mtime_ns == stamp
    second = install(new)
    assert second.digest != first.digest
    assert _sh(install_script(second)).returncode == 0
    assert marker.read_text().splitlines()[1] == f"recipe {second.digest}"
    ran = subprocess.run([str(Path(second.path) / "bin" / "llama-server")], text=True,
                         capture_output=True, check=True)
    assert ran.stdout.strip() == "bin-new"
    # facts.sh reports each folder's recipe; an older marker (one line) reports none
    (tmp_path / "runtimes" / "vllm" / "0.1").mkdir(parents=True)
    (tmp_path / "runtimes" / "vllm" / "0.1" / MARKER).write_text("pip vllm==0.1\n")
    raw = json.loads(subprocess.run(
        ["sh", str(Path(deploys.__file__).parent / "facts.sh")], capture_output=True,
        text=True, check=True, env={**os.environ, "STACK_PREFIX": str(tmp_path)}).stdout)
    assert raw["runtimes"] == ["llama.cpp/b1", "vllm/0.1"]
    assert raw["runtime_recipes"] == [f"llama.cpp/b1={second.digest}"]
