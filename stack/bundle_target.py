"""The kind of host an agent bundle is built for (`BundleTarget`), read from its facts.

The agent and the router are pure Python, but some of their dependencies are not
(pydantic-core, uvloop, httptools, orjson): a host needs the wheels of those for its own
`python3` minor version, CPU architecture and C library. The controller builds one
wheelhouse per target (`stack.wheelhouse`), and the agent version a host should run names
its target (`host_agent_version`), so a host on another Python gets its own bundle and
a plan after apply is empty. Pure: facts in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass

from stack.snapshot import NodeFacts

# the oldest python3 the agent runs on (pyproject.toml `requires-python`)
MIN_PYTHON = (3, 11)
# manylinux2014 (glibc 2.17, CentOS 7): what a glibc host of unknown version is taken for
OLDEST_GLIBC = (2, 17)
# musllinux tags of a musl host (Alpine 3.13 and later have musl 1.2)
MUSL_TAGS = ("1_2", "1_1")
# `uname -m` -> the architecture wheel tags name
WHEEL_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}
# legacy manylinux names: (glibc minor, tag) with the same meaning as manylinux_2_<minor>
LEGACY_MANYLINUX = ((17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1"))


def _version(text: str) -> tuple[int, int] | None:
    major, _, rest = text.partition(".")
    minor = rest.partition(".")[0]
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


@dataclass(frozen=True)
class BundleTarget:
    """What picks a host's binary wheels: CPython `python` (`3.12`), `os` and `arch` as
    the facts say them (`linux`, `x86_64`), and `libc` (`glibc 2.36`, `musl`, or `""`:
    macOS, or a Linux host that did not say, taken for manylinux2014)."""

    python: str
    os: str
    arch: str
    libc: str = ""
    macos: str = ""  # the macOS release of a darwin host (`14.5`), from its facts' distro

    @property
    def tag(self) -> str:
        """`py3.12-linux-x86_64-glibc2.36`: what a bundle version and its cache name carry."""
        parts = [f"py{self.python}", self.os, self.arch]
        if self.libc:
            parts.append(self.libc.replace(" ", ""))
        if self.macos:
            parts.append(f"macos{self.macos}")
        return "-".join(parts)

    def describe(self) -> str:
        """`CPython 3.12, linux x86_64, glibc 2.36`, for messages."""
        system = self.libc or (f"macOS {self.macos}" if self.macos else "")
        return ", ".join(p for p in (f"CPython {self.python}", f"{self.os} {self.arch}",
                                     system) if p)

    def problem(self) -> str | None:
        """Why no bundle can be built for this target, or None."""
        version = _version(self.python)
        if version is None:
            return f"its python3 reports the version `{self.python}`"
        if version < MIN_PYTHON:
            return (f"its python3 is {self.python}; the agent needs "
                    f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
        if self.os not in ("linux", "darwin"):
            return f"the agent bundle is built for linux and darwin hosts, not `{self.os}`"
        return None

    def pip_platforms(self) -> list[str]:
        """The `pip download --platform` tags this host installs, most specific first."""
        arch = WHEEL_ARCH.get(self.arch, self.arch)
        if self.os == "darwin":
            # pip widens a macosx tag to every older macOS release and to universal2
            mac_arch = "arm64" if arch == "aarch64" else arch
            release = _version(self.macos) or ((11, 0) if mac_arch == "arm64" else (10, 9))
            major, minor = release if release < (11, 0) else (release[0], 0)
            return [f"macosx_{major}_{minor}_{mac_arch}"]
        family, _, version = self.libc.partition(" ")
        if family == "musl":
            return [f"musllinux_{tag}_{arch}" for tag in MUSL_TAGS]
        glibc = _version(version) if family == "glibc" else None
        major, newest = glibc if glibc and glibc >= OLDEST_GLIBC else OLDEST_GLIBC
        tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 4, -1)]
        tags += [f"{name}_{arch}" for minor, name in LEGACY_MANYLINUX if minor <= newest]
        return tags


def bundle_target(facts: NodeFacts) -> BundleTarget | None:
    """The host's target from its facts; None when they do not say its python3 (an older
    snapshot): the controller's own target is assumed then, as before targets existed."""
    if not facts.python:
        return None
    name, _, release = facts.distro.partition(" ")
    macos = release if facts.os == "darwin" and name == "macos" else ""
    return BundleTarget(facts.python, facts.os, facts.arch, facts.libc, macos)


# what to do about a host no agent can be installed on (`agent_problem`)
AGENT_HINT = "install python3 3.11 or newer there and put it first on the SSH user's PATH."


def agent_problem(facts: NodeFacts) -> str | None:
    """Why no agent can be installed on this host, from its facts (no `python3`, one too
    old, an OS the bundle is not built for); None when one can, or the facts do not say."""
    if not facts.python:
        tools = facts.build_tools or {}
        return ("it has no `python3` on the SSH user's PATH"
                if tools.get("python3") is False else None)
    target = bundle_target(facts)
    return target.problem() if target is not None else None


def for_target(agent: str, target: BundleTarget | None) -> str:
    """The agent version `agent` (`0.1.0+HASH[.extras]`) built for `target`
    (`...@py3.12-linux-x86_64-glibc2.36`); unchanged without one."""
    return f"{agent}@{target.tag}" if target is not None else agent


def host_agent_version(agent: str, facts: NodeFacts) -> str:
    """The agent version this host should report: the fleet's built for its target."""
    return for_target(agent, bundle_target(facts))
