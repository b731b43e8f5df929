"""Inference runtimes: one folder per name and version, `PREFIX/runtimes/NAME/VERSION`.

`install_script(...)` is pure: it returns the POSIX `sh` script that installs one runtime
version, tested as data (`tests/deploys/runtimes/*.json`). Every script works in a
temporary folder beside the destination, moves it into place, and writes the marker
`.installed` last, so an interrupted install is never taken for a finished one; an
unmarked folder left by an interrupted run is removed first. The marker's second line is
`recipe DIGEST` (`recipe_digest`): a folder made by another recipe (the catalogue added a
requirement, stack.toml changed an index) is installed again, and the plan says so.

The layout the agent relies on: `RUNTIME/bin/llama-server`, `RUNTIME/bin/ggml-rpc-server`
(with their `.so` files beside them); a pip runtime is a venv at `RUNTIME` itself
(`RUNTIME/bin/vllm`, `RUNTIME/bin/python`), as the agent's command builders expect.

Sources:
- `pip`: a venv with the package. A venv is not relocatable (its scripts name its own
  python), so it is created at its final path, and the marker alone says it is complete.
- `archive`: a URL (fetched on the host) or a controller file (uploaded by the caller to
  `upload`), sha256-checked, extracted; a single top-level folder is flattened.
- `build`: a source archive built with cmake on the host; or, when the controller holds a
  finished build for the same archive sha256, cmake arguments, targets, OS and arch
  (`stack.wheelhouse.build_cache_key`), that build's `bin/` is uploaded as a tarball
  ("prebuilt on the controller for hosts of the same arch/OS") and only extracted.
- `system`: binaries already on the host; `RUNTIME/bin` links to them after a check.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from stack.errors import ConfigError
from stack.spec import PREFIX_PATTERN, RuntimeSpec

MARKER = ".installed"
# what a runtime folder is made from: a change to any of these installs it again
# (`requires` is only checked, `env` and `backend` are the instance's, `versions` lists
# the folders)
RECIPE_FIELDS = frozenset({
    "source", "package", "index_url", "extra_index_url", "from_extra_index", "requirements",
    "no_deps", "remove_files", "python", "build_env", "url", "subdir", "cmake_args",
    "targets", "path"})
# a runtime's name and version are one folder name each, never `.` or `..`
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_PREFIX = re.compile(PREFIX_PATTERN)
DEFAULT_BINARIES = {"llama.cpp": ("llama-server",), "stable-diffusion.cpp": ()}


@dataclass(frozen=True)
class RuntimeInstall:
    """One runtime version to install on one host, with everything already resolved."""

    name: str
    version: str
    spec: RuntimeSpec
    prefix: str
    # host path of an uploaded archive (controller file) or prebuilt bin/ tarball
    upload: str | None = None
    prebuilt: bool = False
    sha256: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    variant: str = ""  # a catalogue recipe's accelerator variant: the folder `VERSION-VARIANT`

    @property
    def folder(self) -> str:
        """The folder under `PREFIX/runtimes/NAME/`."""
        return runtime_folder(self.version, self.variant)

    @property
    def path(self) -> str:
        return runtime_path(self.prefix, self.name, self.folder)

    @property
    def digest(self) -> str:
        return recipe_digest(self.spec, self.version, self.variant)


def recipe_digest(spec: RuntimeSpec, version: str, variant: str) -> str:
    """16 hex digits naming what makes one runtime folder: the recipe's fields that
    change the install (`RECIPE_FIELDS`), for this version and variant."""
    body = spec.model_dump(mode="json", include=set(RECIPE_FIELDS))
    body.update(version=version, variant=variant, sha256=spec.sha256.get(version))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def installed(installed_recipes: Mapping[str, Mapping[str, str]] | None,
              runtimes: Mapping[str, Collection[str]], name: str, folder: str,
              digest: str) -> bool:
    """True when a host's facts show `NAME/FOLDER` installed by the recipe `digest`.
    Facts that do not report recipes (`None`: a snapshot from before them) take an
    installed folder for the recipe's."""
    if folder not in runtimes.get(name, ()):
        return False
    return installed_recipes is None or installed_recipes.get(name, {}).get(folder) == digest


def runtime_folder(version: str, variant: str) -> str:
    """The folder of a runtime version: `VERSION`, or `VERSION-VARIANT` for a catalogue
    recipe's accelerator variant (`0.3.36-cuda`)."""
    return f"{version}-{variant}" if variant else version


def runtime_path(prefix: str, name: str, version: str) -> str:
    """Where a runtime version lives on a host: always two folders below
    `PREFIX/runtimes`, so the scripts that replace or remove it delete nothing else."""
    if not _PREFIX.match(prefix):
        raise ConfigError(f"the prefix {prefix!r} is not an absolute path of plain folder "
                          "names", hint='set e.g. `prefix = "/opt/stack"` in stack.toml.')
    for what, part in (("name", name), ("version", version)):
        if not is_folder_name(part):
            raise ConfigError(
                f"runtime {what} {part!r} is not a plain folder name",
                hint="runtime names and versions use letters, digits and `._+-` and start "
                "with a letter or digit.")
    return f"{prefix.rstrip('/')}/runtimes/{name}/{version}"


def is_folder_name(part: str) -> bool:
    """A runtime name or version that is one folder name (what `runtime_path` takes)."""
    return _FOLDER_NAME.match(part) is not None


def fingerprint(install: RuntimeInstall) -> str:
    """What the marker holds: the source that made this folder (for `stack status`)."""
    spec = install.spec
    what = spec.package or spec.url or spec.path or ""
    return f"{spec.source} {what.replace('{version}', install.version)}".strip()


def install_script(install: RuntimeInstall) -> str:
    """The `sh` script that installs `install` and writes its marker last."""
    q = shlex.quote
    dest = install.path
    tmp = f"{dest}.tmp"
    marker = f"{dest}/{MARKER}"
    recipe = f"recipe {install.digest}"
    head = [
        "set -eu",
        f"if [ -f {q(marker)} ] && [ \"$(sed -n 2p {q(marker)})\" = {q(recipe)} ]; then "
        "exit 0; fi",
        *_requires(install),
        f"rm -rf {q(dest)} {q(tmp)}",
    ]
    source = install.spec.source
    if source != "pip":
        head.append(f"mkdir -p {q(tmp)}")
    if source == "pip":
        body = _pip(install)
    elif source == "system":
        body = _system(install, tmp)
    elif source == "build" and not install.prebuilt:
        body = _fetch(install, tmp) + _build(install, tmp)
    else:
        body = _fetch(install, tmp) + _extract(install, tmp)
    if source != "pip":
        body += [f"mv {q(tmp)} {q(dest)}"]
    tail = [f"printf '%s\\n' {q(fingerprint(install))} {q(recipe)} > {q(marker)}"]
    return "\n".join(head + body + tail) + "\n"


def host_requires(spec: RuntimeSpec, prebuilt: bool) -> list[str]:
    """What an install needs on the host (`requires`): a prebuilt upload only unpacks."""
    return [r for r in spec.requires if r == "tar"] if prebuilt else list(spec.requires)


def _requires(install: RuntimeInstall) -> list[str]:
    """Stop before anything is removed when a command or path the install needs is
    missing, naming it (exit 6)."""
    q = shlex.quote
    lines = []
    for need in host_requires(install.spec, install.prebuilt):
        test = f"test -e {q(need)}" if need.startswith("/") else \
            f"command -v {q(need)} >/dev/null 2>&1"
        what = f"{install.name} {install.folder} needs {need} on this host"
        lines.append(f"{test} || {{ echo {q(what)} >&2; exit 6; }}")
    return lines


def _env_prefix(install: RuntimeInstall) -> str:
    """`NAME=value ` words for the install's own environment (`build_env`), quoted."""
    return "".join(f"{name}={shlex.quote(value)} "
                   for name, value in sorted(install.spec.build_env.items()))


def _pip(install: RuntimeInstall) -> list[str]:
    q = shlex.quote
    dest = install.path
    spec = install.spec
    version = install.version
    requirement = (spec.package or f"{install.name}=={{version}}").replace("{version}", version)
    first = [r.replace("{version}", version) for r in spec.from_extra_index]
    # what comes from the extra index alone is named again, so its dependencies come too
    more = first + [r.replace("{version}", version) for r in spec.requirements]
    index = f" --index-url {q(spec.index_url)}" if spec.index_url else ""
    extra = ""
    if spec.extra_index_url:
        extra = f" --extra-index-url {q(spec.extra_index_url.replace('{version}', version))}"
    head = f"{_env_prefix(install)}{q(dest)}/bin/python -m pip install --quiet{index}"
    # `from_extra_index`: the extra index is searched for those requirements only
    pip = head if first else head + extra
    installs = [f"{head}{extra} --no-deps {' '.join(q(r) for r in first)}"] if first else []
    if spec.no_deps:  # its dependencies first, then the package alone
        installs += ([f"{pip} {' '.join(q(r) for r in more)}"] if more else []) + \
            [f"{pip} --no-deps {q(requirement)}"]
    else:
        installs += [f"{pip} {' '.join(q(r) for r in [requirement, *more])}"]
    # the patterns are plain names and `*` (stack.spec.SITE_PATH_PATTERN): left unquoted
    site = f"{q(dest)}/lib/python3*/site-packages"
    removes = [f"rm -rf {' '.join(f'{site}/{p}' for p in spec.remove_files)}"] \
        if spec.remove_files else []
    return [
        f"mkdir -p {q(dest)}",
        f"{q(spec.python or 'python3')} -m venv {q(dest)}",
        *installs,
        *removes,
    ]


def _system(install: RuntimeInstall, tmp: str) -> list[str]:
    q = shlex.quote
    path = (install.spec.path or "").replace("{version}", install.version)
    missing = q(f"runtime folder {path} is missing")
    checks = [f"test -d {q(path)} || {{ echo {missing} >&2; exit 3; }}"]
    # a runtime may carry any name; what it must hold depends on the backend it serves
    for binary in DEFAULT_BINARIES.get(install.spec.backend or install.name, ()):
        target = f"{path}/{binary}"
        checks.append(
            f"test -x {q(target)} || {{ echo {q(f'{target} is missing')} >&2; exit 3; }}"
        )
    return [*checks, f"ln -s {q(path)} {q(tmp)}/bin"]


def _fetch(install: RuntimeInstall, tmp: str) -> list[str]:
    """Put the archive at TMP/archive and check its sha256."""
    q = shlex.quote
    archive = f"{tmp}/archive"
    if install.upload:
        lines = [f"mv {q(install.upload)} {q(archive)}"]
    else:
        url = (install.spec.url or "").replace("{version}", install.version)
        lines = [
            "if command -v curl >/dev/null; then "
            f"curl -fsSL -o {q(archive)} {q(url)}; else wget -qO {q(archive)} {q(url)}; fi"
        ]
    if install.sha256:
        lines.append(
            f"echo {q(install.sha256 + '  ' + archive)} | sha256sum -c --quiet - "
            f"|| {{ echo {q(f'sha256 of {install.name} {install.version} does not match')} "
            ">&2; exit 4; }"
        )
    return lines


def _extract(install: RuntimeInstall, tmp: str) -> list[str]:
    q = shlex.quote
    archive = f"{tmp}/archive"
    return [
        f"mkdir {q(tmp)}/x",
        f"case \"$(head -c 4 {q(archive)} | od -An -tx1 | tr -d ' ')\" in "
        f"504b0304) (cd {q(tmp)}/x && unzip -q ../archive);; "
        f"*) tar -xf {q(archive)} -C {q(tmp)}/x;; esac",
        f"rm -f {q(archive)}",
        # one top-level folder: its content is the runtime
        f"set -- {q(tmp)}/x/*; if [ $# -eq 1 ] && [ -d \"$1\" ] && [ ! -d {q(tmp)}/x/bin ]; "
        f"then mv \"$1\"/* \"$1\"/.[!.]* {q(tmp)}/ 2>/dev/null || true; "
        f"else mv {q(tmp)}/x/* {q(tmp)}/; fi",
        f"rm -rf {q(tmp)}/x",
    ]


def _build(install: RuntimeInstall, tmp: str) -> list[str]:
    q = shlex.quote
    spec = install.spec
    src = f"{tmp}/src"
    source_dir = f"{src}/{spec.subdir}" if spec.subdir else src
    args = " ".join(q(a) for a in spec.cmake_args)
    targets = " ".join(q(t) for t in spec.targets)
    target_flag = f" --target {targets}" if targets else ""
    return [
        f"mkdir {q(src)}",
        f"tar -xf {q(tmp)}/archive -C {q(src)} --strip-components=1",
        f"rm -f {q(tmp)}/archive",
        f"{_env_prefix(install)}cmake -S {q(source_dir)} -B {q(tmp)}/build {args} "
        f"> {q(tmp)}/cmake.log 2>&1 "
        f"|| {{ tail -20 {q(tmp)}/cmake.log >&2; exit 5; }}",
        f"{_env_prefix(install)}cmake --build {q(tmp)}/build{target_flag} "
        f"-j\"$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)\" "
        f"> {q(tmp)}/build.log 2>&1 || {{ tail -20 {q(tmp)}/build.log >&2; exit 5; }}",
        f"mkdir -p {q(tmp)}/bin",
        f"cp -a {q(tmp)}/build/bin/. {q(tmp)}/bin/",
        f"find {q(tmp)}/build \\( -name '*.so*' -o -name '*.dylib' \\) "
        f"-exec cp -a {{}} {q(tmp)}/bin/ \\;",
        f"rm -rf {q(src)} {q(tmp)}/build {q(tmp)}/cmake.log {q(tmp)}/build.log",
    ]


def unused_versions(
    installed: Mapping[str, Iterable[str]], listed: Mapping[str, Iterable[str]],
    in_use: Collection[tuple[str, str]],
) -> dict[str, list[str]]:
    """The runtime versions on a host to remove: installed (`installed`, from the facts),
    no longer listed in stack.toml (`listed`: name -> `versions`; a runtime it no longer
    names lists nothing) and used by no instance on that host (`in_use`: (name, version)).
    The plan shows them as deletes; apply removes them once its instances run elsewhere."""
    out: dict[str, list[str]] = {}
    for name, versions in sorted(installed.items()):
        if not is_folder_name(name):
            continue  # not a folder apply made: left alone
        keep = set(listed.get(name, ()))
        stale = sorted(v for v in set(versions) if v not in keep and (name, v) not in in_use
                       and is_folder_name(v))
        if stale:
            out[name] = stale
    return out


def removal_script(prefix: str, name: str, versions: list[str]) -> str:
    """Remove runtime versions that no instance uses any more."""
    q = shlex.quote
    paths = " ".join(q(runtime_path(prefix, name, v)) for v in versions)
    return f"rm -rf {paths}\n"
