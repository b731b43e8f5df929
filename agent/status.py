"""The agent's report of one instance: what `stack-agent` writes into `state/status.json`
and `/v1/status`, and what the controller reads back as the instance's facts
(`stack.snapshot.InstanceFacts` is this type). Documented in docs/agent.md.

Keep this module free of heavy imports: the agent runs it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineStatus(BaseModel):
    """An instance's engine metrics in `/v1/status` (agent.engine_scraper): present for a
    serving instance of a backend with metrics; a value the backend lacks is null."""

    model_config = ConfigDict(extra="allow")

    backend: str
    up: bool  # the last read of the backend's metrics page succeeded
    requests_running: int | float | None = None
    requests_waiting: int | float | None = None
    kv_cache_usage_ratio: float | None = None
    prompt_tokens_total: int | float | None = None
    generation_tokens_total: int | float | None = None


class InstanceStatus(BaseModel):
    """One instance as its agent reports it (unknown fields are kept, for newer agents)."""

    model_config = ConfigDict(extra="allow")

    id: str
    model: str
    replica: int = 0
    role: Literal["single", "main", "worker"] = "single"
    kind: str | None = None  # llm, embedding, rerank, image, ... (older agents: unknown)
    backend: str
    backend_version: str | None = None
    gpus: list[int] = Field(default_factory=list)
    vendor: str = "cpu"
    host: str | None = None  # the address the backend listens on
    port: int
    state: str = "unknown"
    last_error: str | None = None
    restarts: int = 0
    pid: int | None = None
    # a fingerprint of everything that would restart the instance (args, env, source)
    spec_hash: str | None = None
    progress: dict[str, Any] | None = None  # a download in progress
    adopted: bool = False  # found running when the agent started
    started_at: float | None = None
    last_exit_code: int | None = None
    layer_split: list[int] | None = None  # llama.cpp layers per device, when split
    source_sha256: str | None = None  # an uploaded model's content
    last_log_lines: list[str] | None = None  # the backend's last lines, when it failed
    engine: EngineStatus | None = None  # only in `/v1/status`, not in status.json

    def to_json(self) -> dict[str, Any]:
        """The JSON the agent reports: a split, log lines only when there are some."""
        return self.model_dump(mode="json", exclude_unset=True)
