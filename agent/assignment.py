"""The agent's desired state: `PREFIX/state/assignment.json` (`format_version` 1).

Shared by the controller (which writes it) and the agent (which reconciles towards it).
Documented in docs/agent.md. Keep this module free of heavy imports: the agent runs it.

The schema refuses what cannot run, before anything reaches a file name, a command
line, a socket or a device list: ids are short safe names (they become file names),
numbers are strict (no `true` for 1, no `"1"`) and in range, ports 1-65535, device
indices >= 0, environment names POSIX names, and no string holds a control character
or a lone surrogate (a NUL cannot be passed to `exec`, a newline would split a log line,
a surrogate cannot be written as UTF-8). Every bound is at least as wide as what
`stack.toml` allows, so nothing the controller sends is refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    StringConstraints,
    field_validator,
    model_serializer,
)

FORMAT_VERSION: Final = 1

# C0 and C1 controls, DEL, and lone surrogates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# the same, but tab, newline and carriage return: a custom `command` may span lines
_CONTROL_BUT_SPACE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _refuse(pattern: re.Pattern[str]) -> AfterValidator:
    def check(text: str) -> str:
        found = pattern.search(text)
        if found:
            raise ValueError(f"must not hold control characters or lone surrogates, found "
                             f"U+{ord(found.group()):04X} at character {found.start()}")
        return text
    return AfterValidator(check)


def _absolute(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must be an absolute path (starting with `/`)")
    return text


def _unique(values: list[int]) -> list[int]:
    if len(set(values)) != len(values):
        raise ValueError("must not list a device twice")
    return values


NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# instance ids become file names (`<id>.log.3`, `.<id>.json.<pid>.tmp`): short and safe
ID_MAX_LENGTH: Final = 128
Id = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=ID_MAX_LENGTH)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=128)]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]+([._+-][A-Za-z0-9]+)*$",
                                           max_length=128)]
# an IP address (v4, v6 with an optional zone, bracketed or not) or a host name
Address = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:\[][A-Za-z0-9_.:%\[\]-]*$",
                                           max_length=253)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
HttpPath = Annotated[str, StringConstraints(pattern=r"^/[!-~]*$", max_length=2048)]
# an API key: printable ASCII without spaces (a key file holds it on one line)
Secret = Annotated[str, StringConstraints(pattern=r"^[!-~]+$", max_length=1024)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# one-line text: a model name, a source, a relative path (PATH_MAX long at most)
Text = Annotated[str, StringConstraints(max_length=4096), _refuse(_CONTROL)]
HostPath = Annotated[Text, AfterValidator(_absolute)]
# an argument or environment value: one line, up to 64 KiB (the kernel takes 128 KiB)
Arg = Annotated[str, StringConstraints(max_length=65536), _refuse(_CONTROL)]
# a command template: may be written over several lines
Template = Annotated[str, StringConstraints(max_length=65536), _refuse(_CONTROL_BUT_SPACE)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
DeviceIndex = Annotated[int, Strict(), Field(ge=0, le=65535)]
Count = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
Fraction = Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]
MAX_ITEMS: Final = 1024  # instances, peers, args, env entries, devices, split entries


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None


# an IP address and nothing else (it reaches a MindIE rank table file)
IpAddress = Annotated[str, StringConstraints(max_length=45), AfterValidator(_ip_address)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretEnv(_Strict):
    """An environment value taken from the controller's environment (`from_env`).

    The plan carries only `digest`, a keyed HMAC of the value (`stack.env`), so a new value
    shows as a change without the value being in the plan; `stack apply` fills `value`
    when it writes assignment.json (mode 0600).
    """

    from_env: EnvName
    digest: Annotated[str, StringConstraints(pattern=r"^hmac-sha256:[0-9a-f]{64}$")]
    value: Arg | None = None


def _environment(plain: dict[str, str], secret: dict[str, SecretEnv]) -> dict[str, str]:
    return {**plain, **{name: s.value for name, s in secret.items() if s.value is not None}}


class Devices(_Strict):
    """The accelerators an instance may use; `cpu` with no indices for CPU inference."""

    vendor: Name = "cpu"
    indices: Annotated[list[DeviceIndex], AfterValidator(_unique)] = Field(
        default_factory=list, max_length=MAX_ITEMS)


class RankDevice(_Strict):
    """One NPU in a MindIE rank table: its physical id and its own NIC's address
    (`address_N` of the node's /etc/hccn.conf)."""

    device_id: DeviceIndex
    device_ip: IpAddress


class RankServer(_Strict):
    """One node in a MindIE rank table: its address and its NPUs, in rank order."""

    host: IpAddress
    devices: list[RankDevice] = Field(min_length=1, max_length=MAX_ITEMS)


class Peer(_Strict):
    """Another part of a distributed instance (an RPC worker, a Ray worker, or the main)."""

    node: Name
    host: Address
    port: Port


class Instance(_Strict):
    """One backend process (or one part of a distributed one) this node must run."""

    id: Id
    model: Annotated[str, StringConstraints(max_length=256), _refuse(_CONTROL)]
    replica: Count = 0
    source: Text
    # where the model files are (or will be) on this host; set by the controller
    model_path: HostPath | None = None
    kind: Name = "llm"
    backend: Name
    backend_version: Version | None = None
    runtime_path: Text = Field(
        description="Folder of the runtime version (binaries, venv); empty: none.")
    # the recipe that folder is installed by: a new one (reinstalled) restarts the process
    runtime_recipe: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    args: list[Arg] = Field(default_factory=list, max_length=MAX_ITEMS)
    env: dict[EnvName, Arg] = Field(default_factory=dict, max_length=MAX_ITEMS)
    # values from the controller's environment (HF_TOKEN ...): filled only on the host
    secret_env: dict[EnvName, SecretEnv] = Field(default_factory=dict, max_length=MAX_ITEMS)
    devices: Devices = Field(default_factory=Devices)
    host: Address = "127.0.0.1"
    port: Port
    api_key: Secret | None = None
    context: Annotated[int, Strict(), Field(ge=1, le=2**31 - 1)] | None = None
    role: Literal["single", "main", "worker"] = "single"
    peers: list[Peer] = Field(default_factory=list, max_length=MAX_ITEMS)
    health_path: HttpPath | None = None
    command: Template | None = None  # custom backend template
    mmproj: Text | None = None
    # stable-diffusion.cpp: the parts a diffusion model loads beside it (`--vae PATH`, ...)
    components: dict[Literal["vae", "clip_l", "clip_g", "t5xxl", "llm"], Text] = Field(
        default_factory=dict, max_length=5)
    gpu_memory_utilization: Fraction | None = None
    # llama.cpp split by whole layers (set by the scheduler): layers per device, this
    # node's GPUs (in `devices.indices` order; one entry for its CPU when it has none)
    # first, then each peer's devices in `peers` order. None: llama.cpp decides.
    layer_split: list[Count] | None = Field(None, max_length=MAX_ITEMS)
    # the sha256 of an uploaded (`local://`) model's content: new content, new instance
    source_sha256: Sha256 | None = None
    # MindIE over several nodes: every node of the replica, the main first, with its NPUs;
    # the same on every part, which writes it as the rank table (ranks counted in order)
    rank_table: list[RankServer] | None = Field(default=None, max_length=MAX_ITEMS)

    @model_serializer(mode="wrap")
    def _without_unset_extras(self, handler: SerializerFunctionWrapHandler) -> Any:
        # an instance that does not span MindIE nodes, or has no diffusion components, is
        # written (and planned, and fingerprinted) as before those fields existed
        data = handler(self)
        if isinstance(data, dict):
            if data.get("rank_table", "") is None:
                del data["rank_table"]
            if data.get("components", None) == {}:
                del data["components"]
        return data

    @field_validator("runtime_path")
    @classmethod
    def _runtime_path_absolute(cls, value: str) -> str:
        # empty when the backend needs no installed runtime (a custom absolute command)
        return _absolute(value) if value else value

    def spec_hash(self) -> str:
        """Fingerprint of everything whose change needs the process replaced.

        The API key is left out: the controller computes this at plan time, where the
        stack's secret (from which keys are derived) may be absent, as in CI on a PR.
        Values from the controller's environment are left out for the same reason (and
        never enter a plan); their digests count. An unset `layer_split`, `source_sha256`,
        `rank_table` or `runtime_recipe` and an empty `secret_env` are left out too, so
        instances from before those fields keep their fingerprint.
        """
        exclude = {"api_key"} | {name for name in ("layer_split", "source_sha256", "rank_table",
                                                   "runtime_recipe")
                                 if getattr(self, name) is None}
        if not self.secret_env:
            exclude.add("secret_env")
        body = self.model_dump(mode="json", exclude=exclude)
        for item in body.get("secret_env", {}).values():
            item.pop("value", None)
        text = json.dumps(body, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def environment(self) -> dict[str, str]:
        """The environment the backend gets on top of the agent's: `env` and the values of
        `secret_env` (the node's and the model's settings, merged by the controller)."""
        return _environment(self.env, self.secret_env)


class Assignment(_Strict):
    """The instances one node must run."""

    format_version: Literal[1] = FORMAT_VERSION
    node: Name
    instances: list[Instance] = Field(default_factory=list, max_length=MAX_ITEMS)
    # the node's own environment (`[nodes."PATTERN"] env`): the agent's model downloads
    # see it (HF_TOKEN, HF_ENDPOINT, HTTPS_PROXY); each instance carries it in its own env
    env: dict[EnvName, Arg] = Field(default_factory=dict, max_length=MAX_ITEMS)
    secret_env: dict[EnvName, SecretEnv] = Field(default_factory=dict, max_length=MAX_ITEMS)

    def environment(self) -> dict[str, str]:
        """The node's environment with the values from the controller filled in."""
        return _environment(self.env, self.secret_env)

    @field_validator("format_version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: Any) -> Any:
        # `true == 1` in Python, and a Literal takes it: refuse it before the comparison
        if isinstance(value, bool):
            raise ValueError(f"must be the integer {FORMAT_VERSION}, not a boolean")
        return value
