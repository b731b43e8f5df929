"""Controller-side artifacts uploaded to hosts, built once and cached.

- The agent bundle, one per host target (`stack.bundle_target`: python3 minor version,
  OS, architecture, C library): the project's wheel (`pip wheel --no-deps .`, pure Python,
  one for all targets) plus the wheels of what the agent and the router import (the `host`
  extra of pyproject.toml, not the controller's dependencies), downloaded by pip for that
  target (`pip download --only-binary=:all: --python-version --platform`), packed in one
  xz tarball (the wheels stored, not deflated, so that xz compresses them as a whole) so a
  host installs it with `pip install --no-index` (air-gapped hosts work). A
  stack that needs more on its hosts gets the project's extras too (`agent_extras`:
  `modelscope` when a model has a ModelScope source). Cached under
  `~/.cache/modelstack/wheelhouse/` by the requirement list and the target (`deps-*`), the
  project's sources (`project-*`) and both (`bundle-*`).
- Prebuilt runtimes ("prebuilt on the controller for hosts of the same arch/OS"): a
  finished cmake build on the controller, keyed by the source archive's sha256, the cmake
  arguments and targets, OS and arch, is uploaded as a tarball of its `bin/` instead of
  building on every host. The builds of `scripts/setup-llama-cpp` and
  `scripts/setup-sd-cpp` (`~/.cache/modelstack/NAME/VERSION/bin`, `SETUP_BUILDS`) count
  when the archive is that script's sdist and the arguments, targets and subdir are the
  script's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stack.bundle_target import AGENT_HINT, BundleTarget, for_target
from stack.errors import ApplyError
from stack.spec import StackSpec

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("stack", "agent", "router", "deploys", "templates")

# the build `scripts/setup-llama-cpp` makes: same args, same targets
SETUP_LLAMA_CPP_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF", "-DGGML_RPC=ON",
)
SETUP_LLAMA_CPP_TARGETS = ("llama-server", "ggml-rpc-server")
# the build `scripts/setup-sd-cpp` makes (stable-diffusion.cpp): same args, same targets
SETUP_SD_CPP_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DSD_BUILD_EXAMPLES=ON", "-DSD_SERVER_BUILD_FRONTEND=OFF",
    "-DSD_WEBP=OFF", "-DSD_WEBM=OFF",
)
SETUP_SD_CPP_TARGETS = ("sd-server", "sd-cli")


def cache_dir() -> Path:
    """`$MODELSTACK_CACHE` or `~/.cache/modelstack`."""
    return Path(os.environ.get("MODELSTACK_CACHE") or Path.home() / ".cache" / "modelstack")


def python_tag() -> str:
    """The controller's Python as `3.11`."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def platform_tag() -> str:
    """`linux-x86_64`: the OS and arch a prebuilt runtime is for."""
    return f"{platform.system().lower()}-{platform.machine()}"


def controller_target() -> BundleTarget:
    """This machine as a bundle target: what a host whose facts do not name its python3
    (an older snapshot) is taken for."""
    name = "CS_GNU_LIBC_VERSION"
    libc = os.confstr(name) or "" if name in os.confstr_names else ""
    return BundleTarget(python_tag(), platform.system().lower(), platform.machine(), libc)


def _sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, cached beside it by size and mtime (model files are large)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir() / "sha256" / hashlib.sha256(key.encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    value = _sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def source_hash(root: Path = ROOT) -> str:
    """A hash of everything that goes into the project's wheel."""
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes())
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# project extras (pyproject.toml `[project.optional-dependencies]`) the agent needs for
# models with a source of this scheme
SOURCE_EXTRAS = {"modelscope://": "modelscope"}
# the extra that lists what the agent and the router import: all a host installs
HOST_EXTRA = "host"


def agent_extras(spec: StackSpec) -> tuple[str, ...]:
    """The project extras the hosts' agents need for this stack's models, sorted."""
    return tuple(sorted({extra for model in spec.models.values()
                         for scheme, extra in SOURCE_EXTRAS.items()
                         if model.source.startswith(scheme)}))


def bundle_version(root: Path = ROOT, extras: tuple[str, ...] = (),
                   target: BundleTarget | None = None) -> str:
    """The agent version a host of `target` should run: the package version plus a hash of
    the sources, so a code change without a version bump is still an upgrade that plan
    shows, the extras it was installed with, and the target its wheels are for
    (`0.1.0+HASH.modelscope@py3.12-linux-x86_64-glibc2.36`; no target: a host whose
    facts do not say, which gets the controller's)."""
    from agent.reconcile import VERSION

    return for_target(".".join([f"{VERSION}+{source_hash(root)}", *extras]), target)


@dataclass(frozen=True)
class AgentBundle:
    """The xz tarball hosts of one target install the agent and router from: `wheels/` holds
    the project's wheel, the wheels of `requirements.txt` (what the agent and the router
    import, with the stack's extras) and pip."""

    tarball: Path
    version: str  # `bundle_version()`: what `PREFIX/agent/.installed` holds
    wheel_name: str
    extras: tuple[str, ...] = ()
    unpacked_bytes: int = 0  # what its wheels take on the host once extracted


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ApplyError(
            f"{what} failed on the controller: {tail}",
            hint="check that pip can reach a package index (or fill "
            f"`{cache_dir() / 'wheelhouse'}` on a machine that can).",
        )
    return result


def fetch_sdist(requirement: str, what: str) -> Path:
    """The source distribution of `requirement` (`name==version`), fetched once by name
    with the controller's pip into `CACHE/sdist/` (so no registry host is written down)."""
    folder = cache_dir() / "sdist"
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}"
    for path in folder.glob(f"{stem}.*"):
        if path.name.endswith((".tar.gz", ".zip")):
            return path
    folder.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
          "--no-binary", ":all:", "-d", str(folder), requirement],
         f"`{what}`: downloading the source of `{requirement}`")
    for path in folder.glob(f"{stem}.*"):
        if path.name.endswith((".tar.gz", ".zip")):
            return path
    raise ApplyError(f"`{what}`: pip fetched no source archive for `{requirement}`",
                     hint="name an exact version (`name=={version}`) of a package that "
                     "publishes an sdist, or give `url` instead.")


def _dependencies(root: Path, extras: tuple[str, ...] = ()) -> list[str]:
    """What a host installs beside the project's wheel: the `host` extra (what the agent
    and the router import) and the stack's `extras`; none of the controller's own."""
    import tomllib

    optional = tomllib.loads((root / "pyproject.toml").read_text())["project"].get(
        "optional-dependencies", {})
    return [str(d) for extra in (HOST_EXTRA, *extras) for d in optional.get(extra, [])]


def local_wheels() -> Path:
    """`CACHE/wheelhouse/local`: wheels an operator adds for a target the index has none
    for (pip looks there too)."""
    return cache_dir() / "wheelhouse" / "local"


def _missing_wheel(output: str) -> str | None:
    """The requirement pip found no wheel for, from its error output."""
    match = re.search(r"No matching distribution found for (\S+)", output)
    return match.group(1) if match else None


def _dependency_wheels(root: Path, extras: tuple[str, ...], target: BundleTarget,
                       hosts: tuple[str, ...]) -> Path:
    """The wheelhouse of the host requirements (and pip) for one target, downloaded once by
    pip for that target's Python, platform and C library (`--only-binary`), cached by the
    requirement list and the target."""
    deps = _dependencies(root, extras)
    platforms = target.pip_platforms()
    key = hashlib.sha256(json.dumps([deps, target.tag, platforms]).encode()).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / f"deps-{target.tag}-{key}"
    if (folder / ".complete").exists():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix="deps.", dir=folder.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
               "--implementation", "cp", "--python-version", target.python,
               *(f"--platform={tag}" for tag in platforms), "-d", str(tmp), "pip", *deps]
        if local_wheels().is_dir():
            cmd[4:4] = ["--find-links", str(local_wheels())]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise _download_error(result.stderr or result.stdout, target, hosts)
        (tmp / "requirements.txt").write_text("".join(f"{d}\n" for d in deps))
        (tmp / ".complete").touch()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _download_error(output: str, target: BundleTarget, hosts: tuple[str, ...]) -> ApplyError:
    names = ", ".join(f"`{h}`" for h in hosts) or "the hosts"
    missing = _missing_wheel(output)
    if missing is None:
        tail = "\n".join(output.strip().splitlines()[-5:])
        return ApplyError(
            f"downloading the agent's wheels for {names} ({target.describe()}) failed on "
            f"the controller: {tail}",
            hint="check that pip can reach a package index (or fill "
            f"`{cache_dir() / 'wheelhouse'}` on a machine that can).")
    return ApplyError(
        f"the package index has no wheel of `{missing}` for {names} "
        f"({target.describe()}), which the agent needs",
        hint=f"give that host a python3 the package publishes wheels for, or build the wheel "
        f"on such a host (`pip wheel '{missing}'`) and put it into `{local_wheels()}`.")


def _project_wheel(root: Path) -> Path:
    """The project's own wheel (pure Python: one for every target), cached by its sources."""
    folder = cache_dir() / "wheelhouse" / f"project-{source_hash(root)}"
    found = sorted(folder.glob("modelstack-*.whl"))
    if found:
        return found[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="project.", dir=folder.parent))
    try:
        tree = work / "src"  # a clean copy: setuptools' in-tree build/ keeps stale files
        tree.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (root / name).exists():
                shutil.copy(root / name, tree / name)
        for part in SOURCE_DIRS:
            if (root / part).is_dir():
                shutil.copytree(root / part, tree / part,
                                ignore=shutil.ignore_patterns("__pycache__"))
        out = work / "out"
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out),
              str(tree)], "building the modelstack wheel")
        shutil.rmtree(folder, ignore_errors=True)
        out.replace(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return next(folder.glob("modelstack-*.whl"))


_BUNDLES: dict[tuple[Path, tuple[str, ...], BundleTarget | None], AgentBundle] = {}


def agent_bundle(root: Path = ROOT, extras: tuple[str, ...] = (),
                 target: BundleTarget | None = None,
                 hosts: tuple[str, ...] = ()) -> AgentBundle:
    """Build (or reuse) the bundle for hosts of `target` (None: a host whose facts do not
    name its python3, which gets the controller's own target), with the wheels of the
    project `extras` (`agent_extras`) too. `hosts` name those hosts in errors: a target
    pip has no wheel of a requirement for, or a python3 the agent cannot run on.

    Computed once per process: one apply uploads one version to every host of a target."""
    if (root, extras, target) not in _BUNDLES:
        _BUNDLES[(root, extras, target)] = _agent_bundle(root, extras, target, hosts)
    return _BUNDLES[(root, extras, target)]


def _agent_bundle(root: Path, extras: tuple[str, ...], target: BundleTarget | None,
                  hosts: tuple[str, ...]) -> AgentBundle:
    build_for = target or controller_target()
    problem = build_for.problem()
    if problem is not None:
        names = ", ".join(f"`{h}`" for h in hosts) or "this host"
        raise ApplyError(f"no agent can be installed on {names}: {problem}", hint=AGENT_HINT)
    version = bundle_version(root, extras, target)
    (cache_dir() / "wheelhouse").mkdir(parents=True, exist_ok=True)
    wheel = _project_wheel(root)
    deps = _dependency_wheels(root, extras, build_for, hosts)
    key = hashlib.sha256(f"{wheel.parent.name}:{deps.name}".encode()).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / f"bundle-{build_for.tag}-{key}"
    tarball = folder / "bundle.tar.xz"
    size_file = folder / "unpacked-bytes"
    if not (tarball.exists() and size_file.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        members = [*sorted(deps.glob("*.whl")), deps / "requirements.txt", wheel]
        tmp = folder / "bundle.tar.xz.tmp"
        unpacked = _pack(tmp, members)
        size_file.write_text(f"{unpacked}\n")
        tmp.replace(tarball)
    return AgentBundle(tarball, version, wheel.name, extras,
                       int(size_file.read_text()))


def _stored(wheel: Path) -> bytes:
    """`wheel` with its members stored, not deflated: the same files, names and modes
    (pip reads either), so that xz compresses the whole bundle instead of meeting
    deflated data it cannot shrink (17.2 MB of wheels: 17.0 MB with xz as they are,
    11.8 MB stored)."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    return out.getvalue()


def _pack(tarball: Path, members: list[Path]) -> int:
    """Write `members` into `tarball` (xz) under `wheels/`, wheels stored; the bytes they
    take once extracted."""
    import io

    unpacked = 0
    with tarfile.open(tarball, "w:xz", preset=6) as tar:
        for path in members:
            data = _stored(path) if path.suffix == ".whl" else path.read_bytes()
            info = tarfile.TarInfo(f"wheels/{path.name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
            unpacked += len(data)
    return unpacked


# -- prebuilt runtimes -----------------------------------------------------------------


def build_cache_key(
    archive_sha256: str, cmake_args: list[str] | tuple[str, ...],
    targets: list[str] | tuple[str, ...], subdir: str | None, target_platform: str,
) -> str:
    """What makes two builds interchangeable."""
    body = json.dumps([archive_sha256, list(cmake_args), list(targets), subdir or "",
                       target_platform])
    return hashlib.sha256(body.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class SetupBuild:
    """A build a `scripts/setup-*` script makes from a pinned sdist, cached per machine in
    `CACHE/FOLDER/VERSION/bin` with a `.complete` marker."""

    sdist: str  # the sdist's file name up to its version: `llama_cpp_python-`
    subdir: str  # the sources' folder inside it
    args: tuple[str, ...]
    targets: tuple[str, ...]
    folder: str  # below the cache folder


SETUP_BUILDS = (
    SetupBuild("llama_cpp_python-", "vendor/llama.cpp", SETUP_LLAMA_CPP_ARGS,
               SETUP_LLAMA_CPP_TARGETS, "llama.cpp"),
    SetupBuild("stable_diffusion_cpp_python-", "vendor/stable-diffusion.cpp",
               SETUP_SD_CPP_ARGS, SETUP_SD_CPP_TARGETS, "stable-diffusion.cpp"),
)


def _setup_script_build(archive: Path, args: list[str], targets: list[str],
                        subdir: str | None) -> Path | None:
    """A `scripts/setup-*` build (`SETUP_BUILDS`), when the archive is that script's sdist
    and the build asked for is the one the script makes."""
    name = archive.name
    for build in SETUP_BUILDS:
        if not (name.startswith(build.sdist) and name.endswith(".tar.gz")):
            continue
        if (tuple(args), tuple(targets), subdir) != (build.args, build.targets, build.subdir):
            return None
        version = name[len(build.sdist):-len(".tar.gz")]
        folder = cache_dir() / build.folder / version
        return folder / "bin" if (folder / ".complete").exists() else None
    return None


def prebuilt_bin(
    archive: Path, archive_sha256: str, args: list[str], targets: list[str],
    subdir: str | None, target_platform: str,
) -> Path | None:
    """A finished controller build of this archive for this platform, if there is one."""
    if target_platform != platform_tag():
        return None
    key = build_cache_key(archive_sha256, args, targets, subdir, target_platform)
    folder = cache_dir() / "builds" / key
    if (folder / ".complete").exists():
        return folder / "bin"
    return _setup_script_build(archive, args, targets, subdir)


def prebuilt_tarball(bin_dir: Path) -> Path:
    """`bin/` packed once (cached beside the build) for upload."""
    tarball = bin_dir.parent / "bin.tar.gz"
    if tarball.exists() and tarball.stat().st_mtime >= bin_dir.stat().st_mtime:
        return tarball
    tmp = tarball.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
        tar.add(bin_dir, arcname="bin")
    tmp.replace(tarball)
    return tarball
