"""The agent's own configuration: `PREFIX/etc/agent.toml`.

```toml
node = "gpu-01"                      # this host's name in stack.toml
listen = "10.0.0.11:7070"            # host:port of the agent API
token_file = "/opt/stack/etc/agent.token"   # mode 0600; the API bearer token
prefix = "/opt/stack"

[paths]                              # all optional, defaults under the prefix
state = "/opt/stack/state"
logs = "/opt/stack/logs"
models = "/opt/stack/models"
runtimes = "/opt/stack/runtimes"

[tuning]                             # all optional
tick_seconds = 1.0
probe_interval_seconds = 5.0
startup_timeout_seconds = 900
stop_grace_seconds = 10
log_max_bytes = 52428800
log_keep = 3
```
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Strict):
    """Folders the agent reads and writes; empty means the default under the prefix."""

    state: str = ""
    logs: str = ""
    models: str = ""
    runtimes: str = ""


class Tuning(_Strict):
    """Timings and limits of the reconcile loop."""

    tick_seconds: float = Field(default=1.0, gt=0, le=60)
    probe_interval_seconds: float = Field(default=5.0, gt=0)
    startup_timeout_seconds: float = Field(default=900.0, gt=0)
    stop_grace_seconds: float = Field(default=10.0, ge=0)
    stable_after_seconds: float = Field(default=60.0, gt=0)
    unhealthy_after_failures: int = Field(default=3, ge=1)
    # a backend that stays unhealthy this long (hung, not crashed) is killed and restarted
    # with the crash backoff; 0 only reports it
    restart_unhealthy_after_seconds: float = Field(default=120.0, ge=0)
    log_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    log_keep: int = Field(default=3, ge=1)
    # the API's connections (agent.http): a request, head and body, arrives within this
    # many seconds; at most this many connections are open; idle ones close after
    request_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_connections: int = Field(default=64, ge=1, le=10000)
    keep_alive_seconds: float = Field(default=5.0, ge=1, le=3600)
    # read each serving backend's own metrics page when /metrics or /v1/status is asked
    # (agent.engine_scraper); false: no engine series and no `engine` in the status
    engine_metrics: bool = True


class AgentConfig(_Strict):
    """The parsed agent.toml, with every path made absolute."""

    node: str
    listen: str = "127.0.0.1:7070"
    token_file: str
    prefix: str
    paths: Paths = Field(default_factory=Paths)
    tuning: Tuning = Field(default_factory=Tuning)

    def _path(self, value: str, default: str) -> Path:
        return Path(value) if value else Path(self.prefix) / default

    @property
    def state_dir(self) -> Path:
        return self._path(self.paths.state, "state")

    @property
    def logs_dir(self) -> Path:
        return self._path(self.paths.logs, "logs")

    @property
    def models_dir(self) -> Path:
        return self._path(self.paths.models, "models")

    @property
    def runtimes_dir(self) -> Path:
        return self._path(self.paths.runtimes, "runtimes")

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def assignment_file(self) -> Path:
        return self.state_dir / "assignment.json"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "agent.pid"

    def listen_address(self) -> tuple[str, int]:
        """The API's host and port, from `listen`."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise AgentError(
                f"`listen` must be HOST:PORT, got {self.listen!r}",
                hint='write it like `listen = "127.0.0.1:7070"`.',
            )
        return host.strip("[]"), int(port)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate agent.toml; errors name the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AgentError(
            f"agent config `{path}` does not exist",
            hint="pass the file `stack apply` wrote: `stack-agent --config PREFIX/etc/agent.toml`.",
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise AgentError(f"`{path}` is not valid TOML: {exc}", hint="fix the syntax.") from exc
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise AgentError(
            f"`{key}` in `{path}`: {err['msg']}",
            hint="see docs/agent.md for the keys of agent.toml.",
        ) from exc
    cfg.listen_address()
    return cfg


def read_token(cfg: AgentConfig) -> str:
    """The API token, refusing a token file that others can read."""
    path = Path(cfg.token_file)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise AgentError(
            f"`token_file` {path} does not exist",
            hint=f"write the agent token there with mode 0600 (`chmod 600 {path}`).",
        ) from exc
    if st.st_mode & 0o077:
        raise AgentError(
            f"`token_file` {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
            "it must be readable by its owner only",
            hint=f"run `chmod 600 {path}`.",
        )
    token = path.read_text().strip()
    if not token:
        raise AgentError(f"`token_file` {path} is empty", hint="write the agent token into it.")
    return token


def ensure_dirs(cfg: AgentConfig) -> None:
    """Create the agent's folders (state and instances are private to the owner)."""
    for folder in (cfg.state_dir, cfg.instances_dir):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    for folder in (cfg.logs_dir, cfg.models_dir):
        folder.mkdir(parents=True, exist_ok=True)
