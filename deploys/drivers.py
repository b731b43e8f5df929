"""GPU drivers: which shell commands bring a host's driver to the desired state.

`driver_commands(facts, request)` is pure: it reads the host's facts (distro, kernel,
architecture, GPUs seen by the vendor tool, accelerators on the PCI bus, Secure Boot) and
returns the exact commands to run, `[]` when the host is already in the desired state,
or `Blocked` with the reason and a hint when nothing safe can be done from here. The
pyinfra operation (`deploys.ops.driver`) only runs what this function returns, so the
whole decision is tested as data (`tests/deploys/drivers/*.json`).

NVIDIA: Debian/Ubuntu through NVIDIA's CUDA repository (cuda-keyring), a pinned branch
(`nvidia-open-<branch>`, or `cuda-drivers-<branch>` for GPUs older than Turing; from
branch 590 the packages drop the suffix and `nvidia-driver-pinning-<branch>` pins it),
nouveau blacklisted with the initramfs rebuilt, `nvidia-persistenced` enabled,
`nvidia-fabricmanager` on NVSwitch systems, packages held; RHEL 9 through the CUDA repo,
`kernel-devel`, EPEL `dkms` and the `nvidia-driver:<branch>-open` module stream. AMD:
ROCm through `amdgpu-install --usecase=rocm`, the SSH user added to `render` and
`video`. Every other vendor is verified only.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stack.snapshot import NodeFacts
from stack.spec import NVIDIA_BRANCH, ROCM_RELEASE

NVIDIA_REPO = "https://developer.download.nvidia.com/compute/cuda/repos"
AMD_REPO = "https://repo.radeon.com/amdgpu-install"
EPEL_RPM = "https://dl.fedoraproject.org/pub/epel/epel-release-latest-{major}.noarch.rpm"
CUDA_KEYRING = "cuda-keyring_1.1-1_all.deb"
APT = "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends"

# PCI vendor ids (sysfs) -> our vendor names; a GPU is seen here before its driver exists.
PCI_VENDORS = {
    "0x10de": "nvidia", "0x1002": "amd", "0x19e5": "ascend", "0x1d94": "hygon",
    "0x1e3e": "iluvatar", "0x1ed5": "mthreads", "0xcabc": "cambricon",
}
# what a missing driver looks like for the vendors we only verify
VENDOR_TOOLS = {
    "nvidia": ("nvidia-smi", "the NVIDIA driver"),
    "amd": ("rocm-smi", "ROCm (amdgpu-install --usecase=rocm)"),
    "ascend": ("npu-smi", "the Ascend NPU driver and firmware (Huawei's CANN guide)"),
    "hygon": ("hy-smi", "the Hygon DCU driver (DTK)"),
    "iluvatar": ("ixsmi", "the Iluvatar CoreX driver"),
    "mthreads": ("mthreads-gmi", "the Moore Threads MUSA driver"),
    "cambricon": ("cnmon", "the Cambricon Neuware driver"),
    "apple": ("system_profiler", "macOS (Metal ships with the OS)"),
}
_UBUNTU_CODENAMES = {"20.04": "focal", "22.04": "jammy", "24.04": "noble"}
q = shlex.quote  # every word from stack.toml or the facts is quoted where a command is built


def _words(words: list[str]) -> str:
    return " ".join(q(w) for w in words)


@dataclass(frozen=True)
class DriverRequest:
    """What stack.toml asks for one vendor on one node (`[nodes."*".drivers.VENDOR]`)."""

    node: str
    vendor: str
    mode: str = "verify"  # install | verify
    version: str | None = None  # NVIDIA branch (`580`) or ROCm release (`6.4.1`)
    user: str | None = None  # the SSH user (joins render/video for ROCm)


@dataclass(frozen=True)
class Blocked:
    """Nothing safe can be done on this host: why, and what the operator should do."""

    reason: str
    hint: str


@dataclass(frozen=True)
class _Distro:
    family: str  # debian | rhel
    name: str  # ubuntu | debian | rhel | rocky | almalinux
    version: str  # 24.04, 12, 9.4
    major: str

    @property
    def repo_slug(self) -> str:
        """NVIDIA's CUDA repository folder: `ubuntu2404`, `debian12`, `rhel9`."""
        if self.name == "ubuntu":
            return "ubuntu" + self.version.replace(".", "")
        if self.family == "rhel":
            return "rhel" + self.major
        return self.name + self.major


def _distro(facts: NodeFacts) -> _Distro | None:
    parts = facts.distro.strip().lower().split()
    if len(parts) < 2:
        return None
    name, version = parts[0], parts[1]
    major = version.split(".")[0]
    if name in ("ubuntu", "debian"):
        return _Distro("debian", name, version, major)
    if name in ("rhel", "rocky", "almalinux", "centos"):
        return _Distro("rhel", name, version, major)
    return None


def _field(facts: NodeFacts, name: str, default: Any) -> Any:
    """An optional fact beyond the snapshot contract (kept in NodeFacts' extra fields)."""
    extra = facts.model_extra or {}
    return extra.get(name, default)


def pci_vendors(facts: NodeFacts) -> set[str]:
    """Accelerator vendors on the PCI bus (the `pci_accelerators` fact: vendor -> count)."""
    counts = facts.pci_accelerators
    return {str(vendor) for vendor, count in counts.items() if count}


def _branch(driver: str | None) -> str | None:
    match = re.match(r"^\s*(\d+)\.", driver or "")
    return match.group(1) if match else None


def _cc(value: str | None) -> float:
    """Compute capability as a number; unknown (no driver yet) counts as new."""
    try:
        major, _, minor = (value or "").partition(".")
        return int(major) + int(minor or 0) / 10
    except ValueError:
        return 99.0


def _nvidia_arch(arch: str) -> str:
    return {"aarch64": "sbsa", "arm64": "sbsa"}.get(arch, arch)


def driver_commands(facts: NodeFacts, request: DriverRequest) -> list[str] | Blocked:
    """The commands that bring `request.vendor`'s driver to the desired state on this host."""
    vendors_seen = {g.vendor for g in facts.gpus} | pci_vendors(facts)
    if request.vendor not in vendors_seen:
        return []  # nothing of that vendor on this host: the setting does not apply
    if request.mode == "install" and request.version is not None \
            and not _vendor_version(request.vendor, request.version):
        # stack.toml refuses these; a request made some other way stops here too, because
        # the version goes into package names, URLs and commands run as root
        return Blocked(f"`{request.node}`: {request.vendor} driver version "
                       f"{request.version!r} is not one modelstack can install",
                       'set `version` as the vendor writes it: NVIDIA a branch such as "580", '
                       'AMD a ROCm release such as "6.4.1".')
    if request.vendor == "nvidia":
        return _nvidia(facts, request)
    if request.vendor == "amd" and request.mode == "install":
        return _rocm(facts, request)
    return _verify(facts, request)


def _vendor_version(vendor: str, version: str) -> bool:
    pattern = {"nvidia": NVIDIA_BRANCH, "amd": ROCM_RELEASE}.get(vendor)
    return pattern is None or pattern.match(version) is not None


def _working(facts: NodeFacts, vendor: str) -> list[str]:
    """Driver versions the vendor tool reports (empty: tool missing or driver not loaded)."""
    return [g.driver or "" for g in facts.gpus if g.vendor == vendor and g.driver is not None]


def _verify(facts: NodeFacts, request: DriverRequest) -> list[str] | Blocked:
    if any(g.vendor == request.vendor for g in facts.gpus):
        return []
    tool, what = VENDOR_TOOLS.get(request.vendor, ("its tool", "the vendor's driver"))
    mode = "" if request.mode == "verify" else " (modelstack installs only NVIDIA and AMD)"
    return Blocked(
        f"`{request.node}` has {request.vendor} accelerators on the PCI bus but `{tool}` "
        f"does not report them{mode}",
        f"install {what} on `{request.node}`, then run `stack apply` again.",
    )


def _secure_boot_block(facts: NodeFacts, request: DriverRequest, module: str) -> Blocked | None:
    if facts.secure_boot:
        return Blocked(
            f"`{request.node}` has Secure Boot on, and the {module} kernel module built by "
            "DKMS is unsigned, so it would not load",
            "enroll a MOK key at the console (mokutil --import) or turn Secure Boot off, "
            "or install signed modules (Ubuntu: `ubuntu-drivers install --gpgpu`), then "
            "run `stack apply` again.",
        )
    return None


def _nvidia(facts: NodeFacts, request: DriverRequest) -> list[str] | Blocked:
    loaded = [_branch(d) for d in _working(facts, "nvidia")]
    if request.mode == "verify" or request.version is None:
        if loaded:
            return []
        return _verify(facts, request)
    if loaded and all(b == request.version for b in loaded):
        return []
    distro = _distro(facts)
    if distro is None:
        return _unknown_distro(facts, request)
    blocked = _secure_boot_block(facts, request, "nvidia")
    if blocked:
        return blocked
    old = any(_cc(g.compute_capability) < 7.5 for g in facts.gpus if g.vendor == "nvidia")
    nvswitch = bool(_field(facts, "nvswitch", False))
    if distro.family == "debian":
        return _nvidia_apt(facts, request.version, distro, old, nvswitch)
    return _nvidia_dnf(facts, request.version, distro, old, nvswitch)


def _nvidia_apt(
    facts: NodeFacts, branch: str, distro: _Distro, old: bool, nvswitch: bool
) -> list[str]:
    repo = f"{NVIDIA_REPO}/{distro.repo_slug}/{_nvidia_arch(facts.arch)}"
    unsuffixed = int(branch) >= 590
    base = "cuda-drivers" if old else "nvidia-open"
    driver = base if unsuffixed else f"{base}-{branch}"
    packages = [driver]
    pinned = [f"nvidia-driver-pinning-{branch}"] if unsuffixed else []
    fabric = [f"nvidia-fabricmanager-{branch}"] if nvswitch else []
    headers = "linux-headers-" + (shlex.quote(facts.kernel) if facts.kernel else "generic")
    commands = [
        f"{APT} ca-certificates wget",
        f"wget -qO /tmp/{CUDA_KEYRING} {q(f'{repo}/{CUDA_KEYRING}')}",
        f"dpkg -i /tmp/{CUDA_KEYRING}",
        "apt-get update",
        f"{APT} {headers} dkms",
        *[f"{APT} {q(p)}" for p in pinned],
        f"{APT} {_words(packages + fabric)}",
        *_nouveau_off("update-initramfs -u"),
        "systemctl enable nvidia-persistenced",
    ]
    if nvswitch:
        commands.append("systemctl enable nvidia-fabricmanager")
    commands.append("apt-mark hold " + _words(pinned + packages + fabric))
    return commands



def _nvidia_dnf(
    facts: NodeFacts, branch: str, distro: _Distro, old: bool, nvswitch: bool
) -> list[str]:
    repo = f"{NVIDIA_REPO}/{distro.repo_slug}/{_nvidia_arch(facts.arch)}"
    kernel = shlex.quote(facts.kernel) if facts.kernel else "$(uname -r)"
    stream = f"nvidia-driver:{branch}" + ("-dkms" if old else "-open")
    commands = [
        f"dnf config-manager --add-repo {q(f'{repo}/cuda-{distro.repo_slug}.repo')}",
        f"dnf install -y {q(EPEL_RPM.format(major=distro.major))}",
        f"dnf install -y kernel-devel-{kernel} kernel-headers-{kernel} dkms",
        f"dnf module install -y {q(stream)}",
        *_nouveau_off("dracut -f"),
        "systemctl enable nvidia-persistenced",
    ]
    if nvswitch:
        commands += [
            f"dnf install -y {q(f'nvidia-fabricmanager-{branch}')}",
            "systemctl enable nvidia-fabricmanager",
        ]
    return commands


def _nouveau_off(rebuild_initramfs: str) -> list[str]:
    return [
        "printf 'blacklist nouveau\\noptions nouveau modeset=0\\n' "
        "> /etc/modprobe.d/blacklist-nouveau.conf",
        rebuild_initramfs,
    ]


def _rocm(facts: NodeFacts, request: DriverRequest) -> list[str] | Blocked:
    wanted = request.version
    # without a `rocm_version` fact, working GPUs are taken as the wanted release
    if _working(facts, "amd") and (wanted is None or _rocm_version(facts) in (None, wanted)):
        return []
    if request.version is None:
        return Blocked(
            f"`drivers.amd.version` is not set for `{request.node}`, so the ROCm release to "
            "install is unknown",
            "set e.g. `version = \"6.4.1\"` under `[nodes.\"...\".drivers.amd]`.",
        )
    distro = _distro(facts)
    if distro is None:
        return _unknown_distro(facts, request)
    blocked = _secure_boot_block(facts, request, "amdgpu")
    if blocked:
        return blocked
    build = rocm_installer_version(request.version)
    base = f"{AMD_REPO}/{request.version}"
    if distro.family == "debian":
        codename = _UBUNTU_CODENAMES.get(distro.version)
        if distro.name != "ubuntu" or codename is None:
            return _unknown_distro(facts, request)
        deb = f"amdgpu-install_{build}-1_all.deb"
        install = [
            f"{APT} ca-certificates wget",
            f"wget -qO {q(f'/tmp/{deb}')} {q(f'{base}/ubuntu/{codename}/{deb}')}",
            f"{APT} {q(f'/tmp/{deb}')}",
            "apt-get update",
            f"{APT} linux-headers-{shlex.quote(facts.kernel) if facts.kernel else 'generic'}",
        ]
    else:
        rpm = f"amdgpu-install-{build}-1.el{distro.major}.noarch.rpm"
        install = [
            f"dnf install -y {q(f'{base}/rhel/{distro.version}/{rpm}')}",
            "dnf install -y kernel-devel-"
            + (shlex.quote(facts.kernel) if facts.kernel else "$(uname -r)"),
        ]
    user = request.user or facts.user or "root"
    return [*install, "amdgpu-install -y --usecase=rocm",
            f"usermod -a -G render,video {shlex.quote(user)}"]


def rocm_installer_version(release: str) -> str:
    """The version in the amdgpu-install package's name, as repo.radeon.com names it:
    6.4.1 -> 6.4.60401, 7.0 -> 7.0.70000; from ROCm 7 a point release keeps its third
    number in front, 7.0.2 -> 7.0.2.70002."""
    major, minor, patch = (int(p) for p in [*release.split("."), "0"][:3])
    build = major * 10000 + minor * 100 + patch
    if major >= 7 and patch:
        return f"{major}.{minor}.{patch}.{build}"
    return f"{major}.{minor}.{build}"


def _rocm_version(facts: NodeFacts) -> str | None:
    version = _field(facts, "rocm_version", None)
    return str(version) if version else None


def _unknown_distro(facts: NodeFacts, request: DriverRequest) -> Blocked:
    shown = facts.distro or "an unknown distribution"
    return Blocked(
        f"`{request.node}` runs {shown}, where modelstack cannot install the "
        f"{request.vendor} driver",
        "install the driver by hand and set `mode = \"verify\"`, or use Ubuntu 22.04/24.04, "
        "Debian 12 or RHEL 9.",
    )


def needs_reboot(facts: NodeFacts, commands: Sequence[str]) -> bool:
    """A fresh kernel module (or a pending kernel/driver update) loads only after a reboot."""
    mismatch = bool(_field(facts, "driver_mismatch", False))
    return bool(commands) or facts.reboot_required or mismatch
