"""What a runtime install needs on a host (its recipe's `requires`) against what the host
has (the `build_tools` fact): the distro packages apply installs first, and what it cannot.

`plan_prerequisites(requires, facts)` is pure and decides both for the plan and for apply:
- a missing command or header the distro packages (`cmake`, `c++`, `make`, `tar`,
  `python3.12`, Vulkan's `glslc` and headers) is installed with apt or dnf before the
  runtime (`install_commands`);
- a missing toolkit (the CUDA toolkit's `nvcc`, ROCm's or DTK's clang, MUSA, CANN) is not
  something apply installs: the plan names the host, the path and the package to install;
- what the facts do not say (an older snapshot, a requirement facts.sh does not check) is
  left to the install script, which checks every requirement itself first (exit 6).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from stack.snapshot import NodeFacts

# the requirements facts.sh checks (`build_tools`), in its order; tests/catalog holds this list
# to the catalogue's `requires` and to facts.sh
CHECKED = (
    "cmake", "c++", "make", "tar", "python3", "python3.12", "xcrun", "npu-smi",
    "/usr/local/cuda/bin/nvcc", "/opt/rocm", "/opt/rocm/llvm/bin/clang",
    "/opt/dtk/llvm/bin/clang", "/usr/local/musa/bin/mcc",
    "/usr/local/Ascend/ascend-toolkit/latest", "glslc", "/usr/include/vulkan/vulkan.h",
)
# command -> its package per distro family (Debian/Ubuntu apt, RHEL family dnf)
PACKAGES: dict[str, dict[str, str]] = {
    "cmake": {"debian": "cmake", "rhel": "cmake"},
    "c++": {"debian": "g++", "rhel": "gcc-c++"},
    "make": {"debian": "make", "rhel": "make"},
    "tar": {"debian": "tar", "rhel": "tar"},
    "python3": {"debian": "python3-venv", "rhel": "python3"},
    "python3.12": {"debian": "python3.12-venv", "rhel": "python3.12"},
    "glslc": {"debian": "glslc", "rhel": "glslc"},
    "/usr/include/vulkan/vulkan.h": {"debian": "libvulkan-dev", "rhel": "vulkan-loader-devel"},
}
# what to install by hand for what apply does not install
TOOLKITS: dict[str, str] = {
    "/usr/local/cuda/bin/nvcc": "the CUDA toolkit (NVIDIA's `cuda-toolkit` package)",
    "/opt/rocm": "ROCm (AMD's `amdgpu-install --usecase=rocm`)",
    "/opt/rocm/llvm/bin/clang": "ROCm's HIP SDK (`rocm-hip-sdk`)",
    "/opt/dtk/llvm/bin/clang": "Hygon's DTK toolkit",
    "/usr/local/musa/bin/mcc": "the MUSA toolkit (Moore Threads)",
    "/usr/local/Ascend/ascend-toolkit/latest": "the CANN toolkit (Huawei Ascend)",
    "npu-smi": "the Ascend driver (npu-smi)",
    "xcrun": "Xcode's command line tools (`xcode-select --install`)",
}


@dataclass(frozen=True)
class Prerequisites:
    """What one runtime install needs first on one host."""

    packages: tuple[str, ...] = ()  # distro packages apply installs first
    manager: str = ""  # apt-get | dnf
    missing: tuple[str, ...] = ()  # requirements apply cannot install
    what: tuple[str, ...] = ()  # what each of them is, to install by hand

    def hint(self, node: str, runtime: str) -> str:
        """What to do first about `missing`, naming the host."""
        return (f"install {', '.join(self.what)} on {node} first (apply checks "
                f"{', '.join(self.missing)}), or give {runtime} your own recipe "
                f'(`[runtimes."{runtime}"] source = ...`).')


def _family(facts: NodeFacts) -> str:
    name = facts.distro.strip().lower().split(" ")[0] if facts.distro else ""
    if name in ("ubuntu", "debian"):
        return "debian"
    if name in ("rhel", "rocky", "almalinux", "centos", "fedora"):
        return "rhel"
    return ""


def plan_prerequisites(requires: list[str] | tuple[str, ...],
                       facts: NodeFacts) -> Prerequisites:
    """The packages to install and the toolkits missing for `requires` on this host."""
    tools = facts.build_tools or {}
    family = _family(facts)
    packages: list[str] = []
    missing: list[str] = []
    for need in requires:
        if tools.get(need) is not False:
            continue  # present, or the facts do not say: the script checks it
        package = PACKAGES.get(need, {}).get(family)
        if package:
            packages.append(package)
        else:
            missing.append(need)
    return Prerequisites(
        packages=tuple(dict.fromkeys(packages)),
        manager={"debian": "apt-get", "rhel": "dnf"}.get(family, "") if packages else "",
        missing=tuple(missing),
        what=tuple(dict.fromkeys(
            TOOLKITS.get(m, f"`{m}`" + (f" ({facts.distro} has no package apply knows)"
                                         if m in PACKAGES else "")) for m in missing)))


def install_commands(pre: Prerequisites) -> list[str]:
    """The distro commands that install `pre.packages` (run as root, or with sudo)."""
    if not pre.packages:
        return []
    words = " ".join(shlex.quote(p) for p in pre.packages)
    if pre.manager == "apt-get":
        return ["export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && "
                f"apt-get install -y -qq --no-install-recommends {words}"]
    return [f"dnf install -y -q {words}"]
