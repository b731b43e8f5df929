"""Controller-side artifacts uploaded to hosts, built once and cached.

- The agent bundle: the project's wheel (`pip wheel --no-deps .`) plus a wheelhouse of its
  runtime dependencies (`pip wheel`), packed in one tarball so a host installs it with
  `pip install --no-index` (air-gapped hosts work). A stack that needs more on its hosts
  gets the project's extras too (`agent_extras`: `modelscope` when a model has a
  ModelScope source; `huggingface-hub` is a dependency, always there). Cached under
  `~/.cache/modelstack/wheelhouse/<hash>` where the hash covers the project's sources, its
  dependency list, and the target Python and platform. Hosts must run the controller's
  Python minor version and architecture (checked by the caller from the facts).
- Prebuilt runtimes ("prebuilt on the controller for hosts of the same arch/OS"): a
  finished cmake build on the controller, keyed by the source archive's sha256, the cmake
  arguments and targets, OS and arch, is uploaded as a tarball of its `bin/` instead of
  building on every host. `scripts/setup-llama-cpp`'s build (`~/.cache/modelstack/
  llama.cpp/VERSION/bin`) counts when the archive is that script's sdist and the
  arguments are the script's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def cache_dir() -> Path:
    """`$MODELSTACK_CACHE` or `~/.cache/modelstack`."""
    return Path(os.environ.get("MODELSTACK_CACHE") or Path.home() / ".cache" / "modelstack")


def python_tag() -> str:
    """The controller's Python as `3.11`, which hosts' `python3` must match."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def platform_tag() -> str:
    """`linux-x86_64`: the OS and arch a bundle or a prebuilt runtime is for."""
    return f"{platform.system().lower()}-{platform.machine()}"


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


def agent_extras(spec: StackSpec) -> tuple[str, ...]:
    """The project extras the hosts' agents need for this stack's models, sorted."""
    return tuple(sorted({extra for model in spec.models.values()
                         for scheme, extra in SOURCE_EXTRAS.items()
                         if model.source.startswith(scheme)}))


def bundle_version(root: Path = ROOT, extras: tuple[str, ...] = ()) -> str:
    """The agent version every host should run: the package version plus a hash of the
    sources, so a code change without a version bump is still an upgrade that plan shows,
    and the extras it was installed with (`0.1.0+HASH.modelscope`)."""
    from agent.reconcile import VERSION

    return ".".join([f"{VERSION}+{source_hash(root)}", *extras])


@dataclass(frozen=True)
class AgentBundle:
    """The tarball hosts install the agent and router from."""

    tarball: Path
    version: str  # `bundle_version()`: what `PREFIX/agent/.installed` holds
    wheel_name: str
    extras: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        """What a host installs from the bundle's `wheels/`: the wheel with its extras."""
        return self.wheel_name + (f"[{','.join(self.extras)}]" if self.extras else "")


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ApplyError(
            f"{what} failed on the controller: {tail}",
            hint="check that pip can reach a package index (or fill "
            f"`{cache_dir() / 'wheelhouse'}` on a machine that can).",
        )


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
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return [str(d) for d in project.get("dependencies", [])] + [
        str(d) for extra in extras for d in optional.get(extra, [])]


def _dependency_wheels(root: Path, extras: tuple[str, ...] = ()) -> Path:
    """The wheelhouse of the runtime dependencies (and pip), cached by the dependency list."""
    deps = _dependencies(root, extras)
    key = hashlib.sha256(
        json.dumps([deps, python_tag(), platform_tag()]).encode()
    ).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / f"deps-{key}"
    if (folder / ".complete").exists():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix="deps.", dir=folder.parent))
    try:
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(tmp), "pip", *deps],
             "building the wheelhouse of modelstack's dependencies")
        (tmp / ".complete").touch()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_BUNDLES: dict[tuple[Path, tuple[str, ...]], AgentBundle] = {}


def agent_bundle(root: Path = ROOT, extras: tuple[str, ...] = ()) -> AgentBundle:
    """Build (or reuse) the wheel + wheelhouse tarball for this controller's Python, with
    the wheels of the project `extras` (`agent_extras`) too.

    Computed once per process: one apply uploads one version everywhere."""
    if (root, extras) not in _BUNDLES:
        _BUNDLES[(root, extras)] = _agent_bundle(root, extras)
    return _BUNDLES[(root, extras)]


def _agent_bundle(root: Path, extras: tuple[str, ...]) -> AgentBundle:
    src = source_hash(root)
    (cache_dir() / "wheelhouse").mkdir(parents=True, exist_ok=True)
    deps = _dependency_wheels(root, extras)
    key = hashlib.sha256(f"{src}:{deps.name}".encode()).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / key
    tarball = folder / "bundle.tar"
    meta = folder / "bundle.json"
    version = bundle_version(root, extras)
    if tarball.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return AgentBundle(tarball, version, info["wheel"], extras)
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bundle.", dir=folder))
    try:
        tree = work / "src"  # a clean copy: setuptools' in-tree build/ keeps stale files
        for name in ("pyproject.toml", "README.md"):
            if (root / name).exists():
                tree.mkdir(exist_ok=True)
                shutil.copy(root / name, tree / name)
        for part in SOURCE_DIRS:
            if (root / part).is_dir():
                shutil.copytree(root / part, tree / part,
                                ignore=shutil.ignore_patterns("__pycache__"))
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work),
              str(tree)], "building the modelstack wheel")
        wheel = next(work.glob("modelstack-*.whl"))
        with tarfile.open(work / "bundle.tar", "w") as tar:
            for path in sorted(deps.glob("*.whl")):
                tar.add(path, arcname=f"wheels/{path.name}")
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        (work / "bundle.tar").replace(tarball)
        meta.write_text(json.dumps({"version": version, "wheel": wheel.name}))
        return AgentBundle(tarball, version, wheel.name, extras)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- prebuilt runtimes -----------------------------------------------------------------


def build_cache_key(
    archive_sha256: str, cmake_args: list[str] | tuple[str, ...],
    targets: list[str] | tuple[str, ...], subdir: str | None, target_platform: str,
) -> str:
    """What makes two builds interchangeable."""
    body = json.dumps([archive_sha256, list(cmake_args), list(targets), subdir or "",
                       target_platform])
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def _setup_script_build(archive: Path, args: list[str], targets: list[str]) -> Path | None:
    """The `scripts/setup-llama-cpp` build, when the archive is that script's sdist."""
    name = archive.name
    if not (name.startswith("llama_cpp_python-") and name.endswith(".tar.gz")):
        return None
    if tuple(args) != SETUP_LLAMA_CPP_ARGS or tuple(targets) != SETUP_LLAMA_CPP_TARGETS:
        return None
    version = name[len("llama_cpp_python-"):-len(".tar.gz")]
    folder = cache_dir() / "llama.cpp" / version
    return folder / "bin" if (folder / ".complete").exists() else None


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
    return _setup_script_build(archive, args, targets)


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
