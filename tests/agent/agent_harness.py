"""A real `stack-agent` process with its own prefix, for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-c", "import sys; from agent.main import main; sys.exit(main())"]
# the same agent, appending each start attempt to $STACK_TEST_START_ATTEMPTS
COUNTING_AGENT = [sys.executable, str(Path(__file__).with_name("counting_agent.py"))]
TOKEN = "agent-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_runtime(root: Path, llama_bin: Path) -> Path:
    """RUNTIME/bin with symlinks to the llama.cpp build, the documented layout."""
    runtime = root / "runtimes" / "llama.cpp" / "test"
    (runtime / "bin").mkdir(parents=True)
    for item in llama_bin.iterdir():
        (runtime / "bin" / item.name).symlink_to(item)
    return runtime


def hf_cache_with(prefix: Path, repo: str, filename: str, target: Path) -> None:
    """Fill the agent's Hugging Face cache as a finished download would have."""
    folder = prefix / "models" / "huggingface" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(target)


class Agent:
    """One agent process plus an API client."""

    def __init__(self, prefix: Path, node: str = "test-node", env: dict[str, str] | None = None,
                 tuning: str = "stop_grace_seconds = 3\n", command: list[str] = AGENT):
        self.prefix = prefix
        self.command = command
        self.node = node
        self.port = free_port()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        (prefix / "etc").mkdir(parents=True, exist_ok=True)
        token = prefix / "etc" / "agent.token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        self.config = prefix / "etc" / "agent.toml"
        self.config.write_text(
            f'node = "{node}"\nlisten = "127.0.0.1:{self.port}"\n'
            f'token_file = "{token}"\nprefix = "{prefix}"\n'
            "[tuning]\n" + tuning)
        # no kept-alive connections: the agent's server closes idle ones after 5 s, and a
        # request sent on one just then fails with "Server disconnected" (a test-only race)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}",
                                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
                                   limits=httpx.Limits(max_keepalive_connections=0))

    def start(self) -> None:
        self.log = open(self.prefix / "agent.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*self.command, "--config", str(self.config)], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: self._healthz(), 20, "agent /healthz")

    def _healthz(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert self.proc is not None and self.proc.poll() is None, self.output()
            return False

    def stop(self) -> None:
        """SIGTERM the agent (its backends keep running)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None

    def output(self) -> str:
        return (self.prefix / "agent.out").read_text(errors="replace")

    def assign(self, instances: list[dict[str, Any]]) -> httpx.Response:
        return self.client.put("/v1/assignment", json={
            "format_version": 1, "node": self.node, "instances": instances})

    def status(self) -> dict[str, Any]:
        response = self.client.get("/v1/status")
        response.raise_for_status()
        return dict(response.json())

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        for inst in self.status()["instances"]:
            if inst["id"] == instance_id:
                return dict(inst)
        return None

    def wait_state(self, instance_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            nonlocal found
            found = self.instance(instance_id) or {}
            return found.get("state") == state

        wait_for(check, timeout, f"{instance_id} {state} (last: {found}); log:\n{self.output()}")
        return found

    def cleanup(self) -> None:
        """Stop the agent and every backend group it recorded (tests leave nothing behind)."""
        self.stop()
        for rec in (self.prefix / "state" / "instances").glob("*.json"):
            try:
                pgid = json.loads(rec.read_text())["pgid"]
                os.killpg(pgid, signal.SIGKILL)
            except (ValueError, KeyError, OSError):
                continue
        self.client.close()


def running_agent(prefix: Path, node: str) -> Iterator[Agent]:
    """A started agent process (offline hub), cleaned up after (for module fixtures)."""
    a = Agent(prefix, node=node, env={"HF_HUB_OFFLINE": "1"})
    a.start()
    yield a
    a.cleanup()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def group_alive(pgid: int) -> list[int]:
    """Live processes in a process group (zombies excluded)."""
    from agent.procs import group_members

    return group_members(pgid)
