"""The agent's desired state: `PREFIX/state/assignment.json` (`format_version` 1).

Shared by the controller (which writes it) and the agent (which reconciles towards it).
Documented in docs/agent.md. Keep this module free of heavy imports: the agent runs it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION: Final = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Devices(_Strict):
    """The accelerators an instance may use; `cpu` with no indices for CPU inference."""

    vendor: str = "cpu"
    indices: list[int] = Field(default_factory=list)


class Peer(_Strict):
    """Another part of a distributed instance (an RPC worker, a Ray worker, or the main)."""

    node: str
    host: str
    port: int


class Instance(_Strict):
    """One backend process (or one part of a distributed one) this node must run."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    replica: int = 0
    source: str
    # where the model files are (or will be) on this host; set by the controller
    model_path: str | None = None
    kind: str = "llm"
    backend: str
    backend_version: str | None = None
    runtime_path: str = Field(description="Folder of the runtime version (binaries, venv).")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    devices: Devices = Field(default_factory=Devices)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    api_key: str | None = None
    context: int | None = None
    role: Literal["single", "main", "worker"] = "single"
    peers: list[Peer] = Field(default_factory=list)
    health_path: str | None = None
    command: str | None = None  # custom backend template
    mmproj: str | None = None
    gpu_memory_utilization: float | None = None
    # llama.cpp split by whole layers (set by the scheduler): layers per device, this
    # node's GPUs (in `devices.indices` order; one entry for its CPU when it has none)
    # first, then each peer's devices in `peers` order. None: llama.cpp decides.
    layer_split: list[int] | None = None
    # the sha256 of an uploaded (`local://`) model's content: new content, new instance
    source_sha256: str | None = None

    def spec_hash(self) -> str:
        """Fingerprint of everything whose change needs the process replaced.

        The API key is left out: the controller computes this at plan time, where the
        stack's secret (from which keys are derived) may be absent, as in CI on a PR.
        An unset `layer_split` or `source_sha256` is left out too, so instances from before
        those fields keep their fingerprint.
        """
        exclude = {"api_key"} | {name for name in ("layer_split", "source_sha256")
                                 if getattr(self, name) is None}
        body = json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]
        return hashlib.sha256(body).hexdigest()[:16]


class Assignment(_Strict):
    """The instances one node must run."""

    format_version: Literal[1] = FORMAT_VERSION
    node: str
    instances: list[Instance] = Field(default_factory=list)
