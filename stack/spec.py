"""The schema of stack.toml: what the fleet is and which models run on it.

Every field carries a description: `stack schema` turns them into the JSON Schema editors
use, and docs/stack-toml.md is generated from it. Unknown keys are errors (`extra=forbid`).
"""

from __future__ import annotations

import math
import re
from datetime import date
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

BackendName = Literal[
    "llama.cpp", "vllm", "sglang", "vox-box", "stable-diffusion.cpp", "mindie", "custom"
]
BACKENDS: tuple[str, ...] = (
    "llama.cpp", "vllm", "sglang", "vox-box", "stable-diffusion.cpp", "mindie", "custom"
)
ModelKind = Literal[
    "llm", "vlm", "embedding", "rerank", "image", "speech-to-text", "text-to-speech"
]
VendorName = Literal[
    "nvidia", "amd", "apple", "ascend", "hygon", "mthreads", "iluvatar", "cambricon", "cpu"
]
Policy = Literal["spread", "binpack"]
# what a stable-diffusion.cpp diffusion model loads beside it (its `--vae`, `--clip_l`, ...)
DiffusionPart = Literal["vae", "clip_l", "clip_g", "t5xxl", "llm"]

# Every string that reaches a path, a shell command or a template on the hosts has a
# pattern here (and is quoted where it is used, too). `RULES` says each pattern in words,
# with a hint, for the error messages (stack.config.messages).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_FOLDER = r"\.?[A-Za-z0-9_+@-][A-Za-z0-9._+@-]*"  # one folder name, never `.` or `..`
PREFIX_PATTERN = rf"^(/{_FOLDER})+/?$"
HOST_PATH_PATTERN = r"^(/\.?[A-Za-z0-9_+@{}-][A-Za-z0-9._+@{}-]*)+/?$"
SUBDIR_PATTERN = rf"^{_FOLDER}(/{_FOLDER})*/?$"
# a file beside a model (relative: uploaded with a `local://` model file) or on the hosts
MODEL_FILE_PATTERN = rf"^/?{_FOLDER}(/{_FOLDER})*$"
# files in a venv's site-packages: plain names and `*`, never `.`, `..` or absolute
_SITE_PART = r"[A-Za-z0-9_*][A-Za-z0-9_.*+-]*"
SITE_PATH_PATTERN = rf"^{_SITE_PART}(/{_SITE_PART})*$"
VERSION_PATTERN = r"^[A-Za-z0-9]+([._+-][A-Za-z0-9]+)*$"
DRIVER_VERSION_PATTERN = r"^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
PACKAGE_PATTERN = r"^[A-Za-z0-9][^\x00-\x1f\x7f]*$"
INDEX_URL_PATTERN = r"^(https?|file)://[^\s\x00-\x1f\x7f]+$"
URL_PATTERN = r"^(https?://|ftp://|local://|/)[^\s\x00-\x1f\x7f]+$"
TARGET_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_VALUE_PATTERN = r"^[^\x00-\x1f\x7f]*$"
INTERPRETER_PATTERN = r"^python3(\.[0-9]{1,2})?$"
REQUIREMENT_PATTERN = r"^([A-Za-z0-9_][A-Za-z0-9_.+-]*|(/[A-Za-z0-9_.+@-]+)+)$"
SSH_ADDRESS_PATTERN = r"^(@local|[A-Za-z0-9_:\[][A-Za-z0-9_.:%\[\]-]*)$"
ADDRESS_PATTERN = r"^[A-Za-z0-9_:\[][A-Za-z0-9_.:%\[\]-]*$"
USER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$"
HTTP_PATH_PATTERN = r"^/[!-~]*$"
# files on the controller: plain names, no `..`; the stack's own (kept in git) relative
_NAME_PART = r"\.?[A-Za-z0-9_+@-][A-Za-z0-9._+@-]*"
CONTROLLER_FILE_PATTERN = rf"^(~/|/)?{_NAME_PART}(/{_NAME_PART})*$"
STACK_FILE_PATTERN = rf"^{_NAME_PART}(/{_NAME_PART})*$"
# NVIDIA installs a branch (`nvidia-open-580`, `nvidia-driver:580-open`): three digits;
# AMD a ROCm release as repo.radeon.com/amdgpu-install/ names its folders (`6.4`, `6.4.1`).
NVIDIA_BRANCH = re.compile(r"^[0-9]{3}$")
NVIDIA_FULL_VERSION = re.compile(r"^([0-9]{3})\.[0-9]{1,3}(\.[0-9]{1,3})?$")
# (a `.0` release is the folder without it: `6.4`, `7.0`)
ROCM_RELEASE = re.compile(r"^[1-9][0-9]?\.[0-9]{1,2}(\.[1-9][0-9]?)?$")

RULES: dict[str, tuple[str, str]] = {  # pattern -> (what the value must be, hint)
    PREFIX_PATTERN: (
        "an absolute path of plain folder names (letters, digits, `._+@-`; no `..`)",
        'e.g. `prefix = "/opt/stack"`, or a folder the SSH user owns to install without '
        "root."),
    HOST_PATH_PATTERN: (
        "an absolute path on the hosts of plain folder names (letters, digits, `._+@-`, "
        "`{version}`; no `..`)", 'e.g. `path = "/opt/llama.cpp/{version}/bin"`.'),
    SUBDIR_PATTERN: (
        "a folder inside the archive (a relative path of plain folder names; no `..`)",
        'e.g. `subdir = "vendor/llama.cpp"`.'),
    MODEL_FILE_PATTERN: (
        "a file beside the model (a relative path of plain names; no `..`) or an absolute "
        "path on the hosts", 'e.g. `mmproj = "mmproj-model-f16.gguf"`.'),
    SITE_PATH_PATTERN: (
        "files in the venv's site-packages: a relative path of plain names and `*` "
        "(letters, digits, `_.+-*`); no `..`, not absolute",
        'e.g. `remove_files = ["torchaudio/lib/*.so"]`.'),
    VERSION_PATTERN: (
        "a version of letters and digits separated by `.`, `_`, `+` or `-`",
        'e.g. `"0.11.0"`; each version is a folder on the hosts, '
        "`PREFIX/runtimes/NAME/VERSION`."),
    DRIVER_VERSION_PATTERN: (
        "a driver version of letters and digits separated by `.`, `_` or `-`",
        'NVIDIA: the branch, e.g. `version = "580"`; AMD: the ROCm release, e.g. '
        '`version = "6.4.1"`.'),
    SHA256_PATTERN: (
        "a sha256 digest (64 hex digits, lower case)",
        "`sha256sum FILE` prints it; write it in lower case."),
    PACKAGE_PATTERN: (
        "a pip requirement that starts with the package's name",
        'e.g. `package = "vllm=={version}"`.'),
    INDEX_URL_PATTERN: (
        "an http(s) or file URL without spaces",
        'e.g. `index_url = "https://download.pytorch.org/whl/cu128"`.'),
    URL_PATTERN: (
        "an http(s) URL, `local://PATH` or an absolute path on the controller, without "
        "spaces", 'e.g. `url = "https://example.com/llama.cpp-{version}.tar.gz"`.'),
    TARGET_PATTERN: (
        "a cmake target name", 'e.g. `targets = ["llama-server", "ggml-rpc-server"]`.'),
    ENV_NAME_PATTERN: (
        "an environment variable name",
        "use letters, digits and `_`, not starting with a digit, e.g. `HF_HUB_OFFLINE`."),
    SSH_ADDRESS_PATTERN: (
        "a host name or IP address, or `@local`",
        'e.g. `address = "10.0.0.11"` or `address = "gpu-01.lab"`.'),
    ADDRESS_PATTERN: (
        "a host name or IP address", 'e.g. `address = "10.0.0.11"`.'),
    USER_PATTERN: ("a user name", "letters, digits, `_`, `.` and `-`, e.g. `\"ubuntu\"`."),
    HTTP_PATH_PATTERN: (
        "an HTTP path starting with `/`, without spaces", 'e.g. `health_path = "/health"`.'),
    CONTROLLER_FILE_PATTERN: (
        "a file on this machine: a path of plain names (letters, digits, `._+@-`), "
        "relative, absolute or under `~/`; no `..`",
        'e.g. `key = "~/.ssh/id_ed25519"`.'),
    STACK_FILE_PATTERN: (
        "a file beside stack.toml: a relative path of plain names (letters, digits, "
        "`._+@-`); no `..`, not absolute", 'e.g. `known_hosts = "known_hosts"`, kept in git.'),
    ENV_VALUE_PATTERN: (
        "a value on one line without control characters", 'e.g. `HIP_PATH = "/opt/rocm"`.'),
    INTERPRETER_PATTERN: (
        "`python3` or `python3.N`", 'e.g. `python = "python3.12"`.'),
    REQUIREMENT_PATTERN: (
        "a command name or an absolute path of plain folder names",
        'e.g. `requires = ["cmake", "/usr/local/cuda/bin/nvcc"]`.'),
}

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64)]
Prefix = Annotated[str, StringConstraints(pattern=PREFIX_PATTERN, max_length=200)]
HostPath = Annotated[str, StringConstraints(pattern=HOST_PATH_PATTERN, max_length=500)]
Subdir = Annotated[str, StringConstraints(pattern=SUBDIR_PATTERN, max_length=500)]
ModelFile = Annotated[str, StringConstraints(pattern=MODEL_FILE_PATTERN, max_length=500)]
SitePath = Annotated[str, StringConstraints(pattern=SITE_PATH_PATTERN, max_length=300)]
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN, max_length=64)]
DriverVersion = Annotated[str, StringConstraints(pattern=DRIVER_VERSION_PATTERN, max_length=32)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
Package = Annotated[str, StringConstraints(pattern=PACKAGE_PATTERN, max_length=500)]
IndexUrl = Annotated[str, StringConstraints(pattern=INDEX_URL_PATTERN, max_length=1000)]
Url = Annotated[str, StringConstraints(pattern=URL_PATTERN, max_length=1000)]
Target = Annotated[str, StringConstraints(pattern=TARGET_PATTERN, max_length=100)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN, max_length=100)]
EnvValue = Annotated[str, StringConstraints(pattern=ENV_VALUE_PATTERN, max_length=4096)]
Interpreter = Annotated[str, StringConstraints(pattern=INTERPRETER_PATTERN)]
Requirement = Annotated[str, StringConstraints(pattern=REQUIREMENT_PATTERN, max_length=300)]
SshAddress = Annotated[str, StringConstraints(pattern=SSH_ADDRESS_PATTERN, max_length=253)]
Address = Annotated[str, StringConstraints(pattern=ADDRESS_PATTERN, max_length=253)]
User = Annotated[str, StringConstraints(pattern=USER_PATTERN, max_length=64)]
HttpPath = Annotated[str, StringConstraints(pattern=HTTP_PATH_PATTERN, max_length=200)]
ControllerFile = Annotated[str, StringConstraints(pattern=CONTROLLER_FILE_PATTERN,
                                                  max_length=500)]
StackFile = Annotated[str, StringConstraints(pattern=STACK_FILE_PATTERN, max_length=500)]
Port = Annotated[int, Field(ge=1, le=65535)]
MAX_REPLICAS = 1000
MAX_BYTES = 2**60  # 1 EiB: more than any disk or memory, far below what overflows

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object) -> int:
    """`"24GiB"`, `"500 MB"` or an integer number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"24GiB\" or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _at_most_1eib(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            size = float(match.group(1)) * _UNITS[match.group(2).lower()]
            return _at_most_1eib(int(size) if math.isfinite(size) else MAX_BYTES + 1)
    raise ValueError(f"expected a size such as \"24GiB\" or a number of bytes, got {value!r}")


def _at_most_1eib(size: int) -> int:
    if size > MAX_BYTES:
        raise PydanticCustomError("less_than_equal", "at most {le}", {"le": "1 EiB"})
    return size


Bytes = Annotated[
    int,
    BeforeValidator(parse_bytes),
    # editors see what may be written: a byte count or a size with a unit
    WithJsonSchema({"anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT][iI]?)?[bB]?\s*$"},
    ]}),
]


class _Strict(BaseModel):
    # inf and nan are TOML floats, but no timeout or fraction means them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class HostSpec(_Strict):
    """A host listed inline in stack.toml (instead of a pyinfra inventory file)."""

    address: SshAddress = Field(
        description="SSH address (name or IP), or `@local` for this machine.")
    user: User | None = Field(None, description="SSH user; default: the current user.")
    port: int = Field(22, ge=1, le=65535, description="SSH port.")
    key: ControllerFile | None = Field(None, description="Path to the SSH private key.")
    known_hosts: ControllerFile | None = Field(
        None, description="SSH known_hosts file for this host; default: ~/.ssh/known_hosts."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Labels for selectors.")


class StackSection(_Strict):
    """`[stack]`: the stack as a whole."""

    name: Name = Field(
        "stack", description="Name of the stack; used in service names and the lock.")
    inventory: StackFile | None = Field(
        None, description="A pyinfra inventory file (relative to stack.toml) listing the hosts."
    )
    prefix: Prefix = Field(
        "/opt/stack",
        description="Where runtimes, models and the agent are installed on hosts (absolute).",
    )
    placement: Policy = Field(
        "spread", description="Default placement: `spread` replicas over nodes, or `binpack`."
    )
    port_range: tuple[Port, Port] = Field(
        (40000, 40999), description="Ports given to model instances on each node."
    )
    known_hosts: StackFile | None = Field(
        None, description="The known_hosts file (relative to stack.toml, kept in git) that pins "
        "every host's SSH key; `stack hosts trust` writes it. Default: ~/.ssh/known_hosts.",
    )


class FromEnv(_Strict):
    """`{ from_env = "NAME" }`: a value taken from the controller's environment when
    `stack plan` and `stack apply` run, so it is never written in stack.toml; plans show
    only its name and a keyed digest, and hosts get it in a file of mode 0600."""

    from_env: EnvName = Field(description="The controller's environment variable to read.")


ENV_SETTING_ERROR = 'must be a string or `{ from_env = "NAME" }`'
FROM_ENV_ERROR = "`from_env` must name an environment variable"


def _env_setting(value: object) -> object:
    """A string as it is (one line: no string in stack.toml holds a control character,
    stack.config.values), else `{ from_env = "NAME" }`; one error for anything else
    rather than one per member of the union."""
    if isinstance(value, str | FromEnv):
        return value
    if not isinstance(value, dict) or set(value) != {"from_env"}:
        raise ValueError(ENV_SETTING_ERROR)
    name = value["from_env"]
    if not isinstance(name, str) or not re.match(ENV_NAME_PATTERN, name) or len(name) > 100:
        raise ValueError(FROM_ENV_ERROR)
    return FromEnv(from_env=name)


# an `env` value: a string written here, or `{ from_env = "NAME" }` for a secret
EnvSetting = Annotated[str | FromEnv, BeforeValidator(_env_setting)]


class DriverSpec(_Strict):
    """`[nodes."PATTERN".drivers.VENDOR]`: what to do about a vendor's driver."""

    mode: Literal["install", "verify"] = Field(
        "verify", description="`install` the driver when missing, or only `verify` it."
    )
    version: DriverVersion | None = Field(
        None, description="NVIDIA: the driver branch, e.g. `580`; AMD: the ROCm release, "
        "e.g. `6.4.1`.")


class NodeSpec(_Strict):
    """`[nodes."PATTERN"]`: settings for every host whose name matches the glob."""

    labels: dict[str, str] = Field(default_factory=dict, description="Labels for selectors.")
    prefix: Prefix | None = Field(None, description="Install prefix for these hosts.")
    ssh_user: User | None = Field(None, description="SSH user.")
    ssh_port: int | None = Field(None, ge=1, le=65535, description="SSH port.")
    ssh_key: str | None = Field(None, description="Path to the SSH private key.")
    agent_port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of the agent's API on these hosts; default 7070. Two stacks on one "
        "host need different ports (and prefixes).",
    )
    sudo: bool = Field(False, description="Use sudo for operations that need root.")
    drivers: dict[VendorName, DriverSpec] = Field(
        default_factory=dict, description="Drivers to install or verify, per vendor."
    )
    weight: int = Field(
        1, ge=1, le=1000,
        description="Share of requests the router gives a replica whose main runs on these "
        "hosts, relative to the same model's other replicas (2: twice as many, for GPUs "
        "twice as fast).",
    )
    reserved_vram: Bytes = Field(0, description="VRAM per GPU kept free of models.")
    reserved_ram: Bytes = Field(0, description="RAM kept free of models.")
    cpu_inference: bool = Field(
        False, description="Allow models to run on the CPU of these hosts (llama.cpp, "
                           "stable-diffusion.cpp)."
    )
    address: Address | None = Field(
        None, description="Private address backends bind to; default: the SSH address."
    )
    env: dict[EnvName, EnvSetting] = Field(
        default_factory=dict, max_length=1024,
        description="Environment of the agent (its model downloads: `HF_TOKEN`, "
        "`HF_ENDPOINT`, `HTTPS_PROXY`) and of every instance on these hosts; a value is a "
        'string or `{ from_env = "NAME" }` (the controller\'s environment). Merged key by key.',
    )


class RuntimeSpec(_Strict):
    """`[runtimes.NAME]`: how to install an inference runtime (one folder per version)."""

    backend: BackendName | None = Field(
        None, description="The backend this runtime serves; default: the runtime's name."
    )
    versions: list[Version] = Field(
        min_length=1, max_length=100, description="Versions installed side by side.")
    source: Literal["pip", "archive", "build", "system"] | None = Field(
        None,
        description="`pip` (a venv), `archive` (URL or file), `build` (cmake), `system`; "
        "unset: the runtime catalogue's recipe for each node's accelerator, at these "
        "versions (`stack runtimes` lists it).",
    )
    package: Package | None = Field(
        None,
        description="pip: requirement, `{version}` replaced, e.g. `vllm=={version}`; "
        "archive/build: instead of `url`, a package whose source distribution is the "
        "archive, fetched by name on the controller with pip, e.g. "
        "`llama-cpp-python=={version}`.",
    )
    index_url: IndexUrl | None = Field(None, description="pip: package index URL.")
    extra_index_url: IndexUrl | None = Field(
        None, description="pip: an index searched besides PyPI, `{version}` replaced.")
    from_extra_index: list[Package] = Field(
        default_factory=list, max_length=20,
        description="pip: requirements taken from `extra_index_url`: installed first, "
        "without their dependencies, in a pip call of their own, then named again with "
        "`requirements` (their dependencies come from the other indexes); the other pip "
        "calls do not search that index (pip cannot limit an index to some projects), e.g. "
        "`torch==2.13.0+cpu` from PyTorch's CPU index.")
    requirements: list[Package] = Field(
        default_factory=list, max_length=100,
        description="pip: more requirements installed with `package` (`{version}` "
        "replaced), e.g. a matching plugin.")
    no_deps: bool = Field(
        False, description="pip: install `package` without its dependencies, after "
        "`requirements` (for packages whose own pins do not resolve).")
    remove_files: list[SitePath] = Field(
        default_factory=list, max_length=20,
        description="pip: files removed from the venv's site-packages after the install "
        "(patterns relative to it), e.g. `torchaudio/lib/*.so`: a native part that cannot "
        "load on the host and that the library imports without.")
    python: Interpreter | None = Field(
        None, description="pip: the interpreter that makes the venv, e.g. `python3.12` "
        "when the wheels exist for that version only; default `python3`.")
    requires: list[Requirement] = Field(
        default_factory=list, max_length=50,
        description="Commands (on PATH) or absolute paths the install needs on the host, "
        "checked first, e.g. `cmake` or `/usr/local/cuda/bin/nvcc`.")
    build_env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, description="Environment for the install or build only.")
    url: Url | None = Field(
        None, description="archive/build: URL or controller path, `{version}` replaced."
    )
    sha256: dict[str, Sha256] = Field(
        default_factory=dict, description="archive/build: expected sha256 per version."
    )
    subdir: Subdir | None = Field(
        None, description="build: the cmake source folder in the archive.")
    cmake_args: list[str] = Field(default_factory=list, description="build: cmake arguments.")
    targets: list[Target] = Field(default_factory=list, description="build: cmake targets.")
    path: HostPath | None = Field(
        None, description="system: folder holding the binaries, `{version}` replaced.")
    env: dict[EnvName, str] = Field(
        default_factory=dict, description="Environment for the runtime.")
    variant: dict[VendorName, Name] = Field(
        default_factory=dict,
        description="Without `source`: the runtime catalogue's variant for nodes of a "
        "vendor instead of its default, e.g. `{ amd = \"vulkan\" }` (`stack runtimes` "
        "lists the variants and the vendors that may take each).")


class GpuSelector(_Strict):
    """Which GPUs a model may use."""

    vendor: list[VendorName] = Field(default_factory=list, description="Allowed vendors.")
    name: str | None = Field(None, description="Glob on the GPU name, e.g. `*H100*`.")
    min_memory: Bytes | None = Field(None, description="Minimum memory per GPU.")
    min_compute_capability: str | None = Field(
        None, pattern=r"^[0-9]+\.[0-9]+$", description="Minimum compute capability, e.g. `8.0`."
    )


class PinSpec(_Strict):
    """Pin a model's replicas to a node (and GPUs)."""

    node: str = Field(description="Node name.")
    gpus: list[Annotated[int, Field(ge=0, le=1023)]] = Field(
        default_factory=list, max_length=64, description="GPU indices on that node.")


class ModelSpec(_Strict):
    """`[models.NAME]`: a model to serve."""

    source: str = Field(
        description="`hf://ORG/NAME[/FILE][@REV]`, `modelscope://...`, an absolute host path, "
        "or `local://PATH` (uploaded from the controller)."
    )
    kind: ModelKind | None = Field(None, description="What the model does; inferred if omitted.")
    backend: BackendName | None = Field(None, description="Inference backend; chosen if omitted.")
    backend_version: Version | None = Field(
        None, description="Runtime version; newest if omitted.")
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS, description="Number of replicas.")
    gpus_per_replica: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="GPUs per replica, or `auto` for the smallest that fits."
    )
    distributed: bool = Field(False, description="Allow one replica to span several nodes.")
    selector: list[str] = Field(
        default_factory=list,
        description="Label selector: `k=v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`.",
    )
    gpu: GpuSelector = Field(
        default_factory=lambda: GpuSelector.model_validate({}), description="GPU selector."
    )
    context: int | None = Field(
        None, ge=256, le=2**24, description="Context size in tokens.")
    args: list[str] = Field(default_factory=list, description="Extra backend arguments.")
    env: dict[EnvName, EnvSetting] = Field(
        default_factory=dict, max_length=1024,
        description="Extra environment of the model's instances, over the node's `env`; a "
        'value is a string or `{ from_env = "NAME" }` (the controller\'s environment).')
    aliases: list[str] = Field(default_factory=list, description="Other names in the API.")
    placement: Policy | None = Field(None, description="Overrides `stack.placement`.")
    pin: PinSpec | None = Field(None, description="Pin to a node and GPUs.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM/SGLang: fraction of each GPU's memory to claim."
    )
    mmproj: ModelFile | None = Field(
        None, description="llama.cpp vision: the multimodal projector, a path beside the "
        "model's GGUF (or absolute on the host); default: the one `mmproj*.gguf` in a "
        "`local://` folder of GGUF files.")
    components: dict[DiffusionPart, Subdir] = Field(
        default_factory=dict,
        description="stable-diffusion.cpp: the parts a diffusion model that comes alone "
        "(FLUX, SD3, Wan, Qwen-Image GGUFs) loads beside it, by role (`vae`, `clip_l`, "
        "`clip_g`, `t5xxl`, `llm`), paths beside the model file, e.g. `{ vae = "
        "\"ae.safetensors\", clip_l = \"clip_l.safetensors\", t5xxl = "
        "\"t5xxl_fp16.safetensors\" }`; uploaded with a `local://` model file.")
    offload: Literal["auto", "full", "none"] = Field(
        "auto",
        description="llama.cpp: layers on accelerators. `auto`: all, else as many as fit (at "
        "least half) with the rest on the main node's CPU; `full`: every layer on "
        "accelerators, never partly on the CPU; `none`: CPU only. `-ngl N` in `args` wins.",
    )
    command: str | None = Field(
        None,
        description="custom: command template with {model_path} {port} {host} {name} {api_key}.",
    )
    health_path: HttpPath | None = Field(
        None, description="custom: health path; default `/health`.")

    @model_validator(mode="after")
    def _custom_needs_command(self) -> ModelSpec:
        if self.backend == "custom" and not self.command:
            raise ValueError("backend `custom` needs `command`")
        return self


class Timeouts(_Strict):
    """Router timeouts, in seconds."""

    connect: float = Field(5.0, gt=0, description="Connecting to a replica.")
    first_byte: float = Field(300.0, gt=0, description="Until the replica's first byte.")
    idle: float = Field(120.0, gt=0, description="Between two chunks of a response.")


class AgentSpec(_Strict):
    """`[agent]`: how the agent on every host runs its instances (agent.toml `[tuning]`)."""

    probe_interval_seconds: float = Field(
        5.0, gt=0, le=3600, description="Seconds between health probes of a ready instance.")
    startup_timeout_seconds: float = Field(
        900.0, gt=0, le=7 * 86400, description="How long an instance may take to become ready.")
    stop_grace_seconds: float = Field(
        10.0, ge=0, le=3600, description="Seconds between SIGTERM and SIGKILL on stop.")
    restart_unhealthy_after_seconds: float = Field(
        120.0, ge=0, le=7 * 86400,
        description="Restart a backend unhealthy this long (0: only report).")
    log_max_bytes: int = Field(50 * 1024 * 1024, ge=1024, le=2**40,
                               description="Rotate an instance's log at this size.")
    log_keep: int = Field(3, ge=1, le=100, description="Rotated logs kept per instance.")


class MonitoringSpec(_Strict):
    """`[monitoring]`: the Prometheus files `stack monitoring` writes (alert thresholds)."""

    scrape_interval_seconds: int | None = Field(
        None, ge=1, le=3600, description="Write a `global:` section with this scrape and "
        "rule evaluation interval into prometheus.yml; none: Prometheus' own (1 minute).")
    rate_window_seconds: int = Field(
        300, ge=1, le=86400, description="The window of the rates the alerts compute (5xx "
        "ratio, time to first token, restarts); at least 4 scrape intervals.")
    alert_for_seconds: int = Field(
        300, ge=0, le=7 * 86400, description="How long a condition holds before its alert "
        "fires (`for:`), for every alert but `ModelstackInstanceDown` and "
        "`ModelstackTargetDown`.")
    instance_down_for_seconds: int = Field(
        300, ge=0, le=7 * 86400, description="How long an instance may be unhealthy, "
        "crash-looping, failed or pending before `ModelstackInstanceDown` fires.")
    target_down_for_seconds: int = Field(
        120, ge=0, le=7 * 86400, description="How long a router or agent may fail its "
        "scrapes before `ModelstackTargetDown` fires.")
    crash_loop_restarts: int = Field(
        3, ge=1, le=10**6, description="Restarts of one instance within the rate window "
        "that fire `ModelstackCrashLooping` (so does the agent's `crash-looping` state).")
    gpu_temperature_celsius: float = Field(
        85.0, gt=0, le=200, description="A GPU above this temperature fires `ModelstackGpuHot`.")
    router_5xx_ratio: float = Field(
        0.05, gt=0, le=1, description="A model whose share of 5xx answers is above this "
        "fires `ModelstackRouter5xx`.")
    ttft_p95_seconds: float = Field(
        10.0, gt=0, le=86400, description="A model whose time to first token p95 (at the "
        "router) is above this fires `ModelstackSlowFirstToken`.")


def _redis_url(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"redis://[^\s/@]+(/[0-9]{1,2})?", value):
        raise ValueError("must be `redis://HOST[:PORT][/DB]`, e.g. `redis://10.0.0.5:6379/0`")
    return value


class LimitsSpec(_Strict):
    """`[router.limits]`: where limit windows are counted."""

    store: Annotated[str | None, AfterValidator(_redis_url)] = Field(
        None, description="`redis://HOST[:PORT][/DB]` shared by "
        "every router host (a password in the URL would be in stack.toml: keep the store on "
        "the private network); none: each router counts alone.")
    on_store_down: Literal["local", "refuse"] = Field(
        "local", description="While the store does not answer: count in each router alone "
        "(`local`), or refuse limited requests with a 503 (`refuse`).")


class RouterSpec(_Strict):
    """`[router]`: the OpenAI-compatible endpoint."""

    hosts: list[str] = Field(
        default_factory=list, description="Nodes (names or globs) running a router; default all."
    )
    listen: str = Field(
        "127.0.0.1:8080",
        description="`HOST:PORT` to listen on (`[::1]:8080` for IPv6). Off loopback, at "
        "least one `[[keys]]` table is required.",
    )
    tls_cert: str | None = Field(None, description="TLS certificate file (controller path).")
    tls_key: str | None = Field(None, description="TLS key file (controller path).")
    workers: int = Field(1, ge=1, le=64, description="Worker processes (SO_REUSEPORT).")
    timeouts: Timeouts = Field(
        default_factory=lambda: Timeouts.model_validate({}), description="Timeouts."
    )
    balancing: Literal["least-outstanding", "round-robin", "prefix"] = Field(
        "least-outstanding", description="How a replica is chosen: the fewest requests in "
        "flight per unit of `weight`; in turn, each as often as its `weight` says; or "
        "`prefix`: prompts starting with the same 1,024 characters (a long system prompt, "
        "a conversation so far) go to the same replica, whose prompt cache holds them, "
        "unless it carries over 25% more than the average load (plus one); shorter "
        "prompts by load."
    )
    affinity: Literal["none", "user", "header"] = Field(
        "none", description="Session affinity: by the `user` field or a header."
    )
    affinity_header: str = Field("x-session-id", description="Header used by `header` affinity.")
    retries: int = Field(2, ge=0, le=10, description="Retries on another replica before 1st byte.")
    max_body_bytes: Bytes = Field(32 * 1024**2, description="Largest request body.")
    limits: LimitsSpec = Field(
        default_factory=lambda: LimitsSpec.model_validate({}),
        description="Where keys' and users' `rpm`/`tpm` are counted (a Redis every router "
        "host shares, or each router alone).")


class UserSpec(_Strict):
    """`[users.NAME]`: someone who holds keys; the models and quotas all of them share."""

    models: list[str] = Field(default_factory=list,
                              description="Models the user's keys may use; empty: all.")
    rpm: int | None = Field(None, ge=1, le=10**9,
                            description="Requests per minute over all the user's keys.")
    tpm: int | None = Field(None, ge=1, le=10**12,
                            description="Tokens per minute over all the user's keys.")


class KeySpec(_Strict):
    """`[[keys]]`: an API key, stored only as its hash (`stack keys create`)."""

    name: Name = Field(description="Key name.")
    owner: str | None = Field(None, description="Who holds the key.")
    user: Name | None = Field(None, description="The `[users.NAME]` the key belongs to.")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="`sha256:` + hex digest.")
    models: list[str] = Field(default_factory=list, description="Allowed models; empty: all.")
    rpm: int | None = Field(None, ge=1, le=10**9, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, le=10**12, description="Tokens per minute.")
    expires: date | None = Field(None, description="Last day the key works.")


class StackSpec(_Strict):
    """The whole stack.toml."""

    stack: StackSection = Field(
        default_factory=lambda: StackSection.model_validate({}), description="The stack."
    )
    hosts: dict[str, HostSpec] = Field(default_factory=dict, description="Inline hosts.")
    nodes: dict[str, NodeSpec] = Field(
        default_factory=dict, description="Per-host settings by glob on host names."
    )
    runtimes: dict[str, RuntimeSpec] = Field(default_factory=dict, description="Runtimes.")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Models.")
    router: RouterSpec = Field(
        default_factory=lambda: RouterSpec.model_validate({}), description="The router."
    )
    agent: AgentSpec = Field(
        default_factory=lambda: AgentSpec.model_validate({}),
        description="The agent on every host.",
    )
    monitoring: MonitoringSpec = Field(
        default_factory=lambda: MonitoringSpec.model_validate({}),
        description="Prometheus alert thresholds (`stack monitoring`).",
    )
    keys: list[KeySpec] = Field(default_factory=list, description="API keys.")
    users: dict[Name, UserSpec] = Field(
        default_factory=dict, description="Users: keys' holders with shared quotas.")
    # Merged `[nodes."PATTERN"]` settings by set of matching patterns, filled by
    # `stack.nodes.node_settings`: computed once per loaded stack.toml, not per call.
    _node_settings: dict[tuple[object, ...], NodeSpec] = PrivateAttr(default_factory=dict)
