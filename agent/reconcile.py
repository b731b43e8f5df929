"""The agent's reconcile loop: desired instances (assignment.json) against running ones.

Each pass re-reads the assignment file when it changed, stops what is no longer desired
(or changed), and gives every desired instance one `Runner.step`, which says when it next
needs one. The loop sleeps until the earliest of those, at most a tick (1 s), or until a
wake-up (a backend exited, a probe finished, a stop finished, a new assignment arrived).
A terminally failed instance asks for nothing: it is only looked at on the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent import procs
from agent.assignment import FORMAT_VERSION, Assignment, Instance
from agent.config import AgentConfig
from agent.errors import AgentError, shown
from agent.json_input import decode_json
from agent.logs import mark, rotate_if_large
from agent.models import ModelStore
from agent.runner import Runner, Shared, instance_hash

log = logging.getLogger("agent")

VERSION = "0.1.0"
ROTATE_EVERY = 10.0


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_\[\]-]{1,40}$")


def _key(loc: tuple[int | str, ...]) -> str:
    """A schema error's location as a dotted key (other keys from outside quoted and cut)."""
    return ".".join(str(p) if isinstance(p, int) or _PLAIN_KEY.match(p) else shown(p, 30)
                    for p in loc)


def parse_assignment(data: Any, node: str) -> Assignment:
    """Validate an assignment for this node; `AgentError` gives the reason."""
    if not isinstance(data, dict):
        raise AgentError("the assignment must be a JSON object",
                         hint="send {\"format_version\": 1, \"node\": ..., \"instances\": [...]}.")
    version = data.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        given = (f"`format_version` {shown(version)} is not supported" if version is not None
                 else "has no `format_version`")
        raise AgentError(
            f"the assignment {given}; this agent reads {FORMAT_VERSION}",
            hint="upgrade the agent to the controller's version (`stack apply` does it).")
    try:
        assignment = Assignment.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"`{_key(e['loc'])}`: {e['msg']}" for e in exc.errors()[:5])
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise AgentError(f"the assignment is invalid: {reasons}{more}",
                         hint="compare it with the schema in docs/agent.md.") from None
    if assignment.node != node:
        raise AgentError(
            f"the assignment is for node `{assignment.node}` but this agent is `{node}`",
            hint="send it to the right host, or fix `node` in agent.toml.")
    seen_ids: set[str] = set()
    seen_ports: set[tuple[str, int]] = set()
    for inst in assignment.instances:
        if inst.id in seen_ids:
            raise AgentError(f"instance id `{inst.id}` appears twice in the assignment",
                             hint="give every instance its own id.")
        if (inst.host, inst.port) in seen_ports:
            raise AgentError(
                f"port {inst.port} on {inst.host} is given to two instances (`{inst.id}`)",
                hint="give every instance its own port.")
        seen_ids.add(inst.id)
        seen_ports.add((inst.host, inst.port))
    return assignment


def write_assignment(cfg: AgentConfig, assignment: Assignment) -> None:
    """Write the assignment file atomically, mode 0600 (it holds API keys)."""
    procs.write_private(cfg.assignment_file, assignment.model_dump_json(indent=2) + "\n")


def set_node_env(env: dict[str, str], before: dict[str, str | None]) -> dict[str, str | None]:
    """Put the node's environment (the assignment's `env`) into the agent's own, so model
    downloads see HF_TOKEN, HF_ENDPOINT or HTTPS_PROXY; a name the previous assignment set
    and this one does not goes back to what the agent started with. Returns those original
    values (None: unset) for the next call. Values are never logged, only names."""
    original = dict(before)
    for name in set(before) - set(env):
        old = original.pop(name)
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
    for name, value in env.items():
        if name not in original:
            original[name] = os.environ.get(name)
        os.environ[name] = value
    return original


class Reconciler:
    """Owns the runners and the loop that reconciles them."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.runners: dict[str, Runner] = {}
        self.stopping: dict[str, asyncio.Task[None]] = {}
        self.desired: list[Instance] | None = None
        self.assignment_error: str | None = None
        self._assignment_stamp: tuple[int, int] | None = None
        self._node_env: dict[str, str | None] = {}
        self._wake = asyncio.Event()
        self._last_rotate = 0.0
        self._last_status: str | None = None
        self._adopted = False
        self.shared = Shared(cfg, ModelStore(cfg.models_dir, cfg.state_dir), self.wake)

    def wake(self) -> None:
        self._wake.set()

    # ---- desired state ----------------------------------------------------------------
    def _load_assignment(self) -> None:
        path = self.cfg.assignment_file
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._assignment_stamp and self.desired is not None:
            return
        self._assignment_stamp = stamp
        if stamp is None:
            self.desired, self.assignment_error = [], None
            return
        try:
            assignment = parse_assignment(decode_json(path.read_bytes(), str(path)),
                                          self.cfg.node)
        except (OSError, AgentError) as exc:
            text = exc.render() if isinstance(exc, AgentError) else f"{path}: {exc}"
            self.assignment_error = text.replace("\n", " ")
            log.error("node %s: ignoring %s, running instances stay as they are: %s",
                      self.cfg.node, path, self.assignment_error)
            return
        self.desired, self.assignment_error = list(assignment.instances), None
        self._node_env = set_node_env(assignment.environment(), self._node_env)
        log.info("node %s: assignment has %d instance(s)", self.cfg.node, len(self.desired))

    # ---- adoption -------------------------------------------------------------------
    def adopt(self) -> None:
        """Adopt backends a previous agent started; stop recorded ones no longer wanted."""
        self._load_assignment()
        if self.desired is None:
            return  # no valid desired state yet: touch nothing, adopt once there is one
        self._adopted = True
        wanted = {i.id: i for i in self.desired}
        now = time.monotonic()
        for rec in procs.load_records(self.cfg.instances_dir):
            if not procs.matches(rec):
                procs.remove_record(self.cfg.instances_dir, rec.id)
                continue
            inst = wanted.get(rec.id)
            fresh = time.time() - rec.started_at < self.cfg.tuning.startup_timeout_seconds
            if inst is not None and instance_hash(inst) == rec.instance_hash and (
                    procs.port_listening(rec.host, rec.port) or fresh):
                runner = Runner(inst, self.shared)
                runner.adopt(rec, now)
                self.runners[inst.id] = runner
                log.info("node %s: adopted instance %s (pid %d)", self.cfg.node, rec.id, rec.pid)
            else:
                self._stop(rec.id, self._stop_record(rec))

    def _stop(self, rid: str, stopping: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(stopping)
        task.add_done_callback(lambda _t: self.wake())  # its replacement may start now
        self.stopping[rid] = task

    async def _stop_record(self, rec: procs.ProcRecord) -> None:
        log.info("node %s: stopping instance %s left by a previous agent", self.cfg.node, rec.id)
        await procs.stop_group(rec.pgid, self.cfg.tuning.stop_grace_seconds, None)
        procs.remove_record(self.cfg.instances_dir, rec.id)

    # ---- one pass -------------------------------------------------------------------
    def tick(self, now: float) -> float | None:
        """One reconcile pass; returns when the earliest instance next needs one (or None).

        Only deadlines after `now` count: one at or before it was due in this pass, and
        asking for it again would wake the loop at once, over and over.
        """
        self._load_assignment()
        for rid, task in list(self.stopping.items()):
            if task.done():
                del self.stopping[rid]
        if self.desired is None:
            return None
        if not self._adopted:
            self.adopt()
        self._stop_unwanted({i.id: i for i in self.desired})
        deadlines = [at for inst in self.desired
                     if (at := self._step(inst, now)) is not None and at > now]
        if now - self._last_rotate >= ROTATE_EVERY:
            self._last_rotate = now
            for rid in self.runners:
                log_file = self.runners[rid].log_file
                rotate_if_large(log_file, self.cfg.tuning.log_max_bytes,
                                self.cfg.tuning.log_keep)
                mark(log_file, time.time())  # for `stack logs --since`
        self._write_status()
        return min(deadlines, default=None)

    def _stop_unwanted(self, wanted: dict[str, Instance]) -> None:
        for rid, runner in list(self.runners.items()):
            inst = wanted.get(rid)
            if inst is None or instance_hash(inst) != runner.instance_hash:
                reason = "no longer assigned" if inst is None else "changed; replacing"
                del self.runners[rid]
                self._stop(rid, runner.stop(reason))

    def _step(self, inst: Instance, now: float) -> float | None:
        """One instance's step; its requeue time (None: a terminal failure, or only an
        event, needs another look)."""
        if inst.id in self.stopping:
            return None  # the old one is still stopping: its end wakes the loop
        runner = self.runners.get(inst.id) or Runner(inst, self.shared)
        self.runners[inst.id] = runner
        try:
            return runner.step(now).requeue_at
        except Exception as exc:  # one bad instance never stops the agent
            log.exception("node %s: instance %s pass failed", self.cfg.node, inst.id)
            runner._set("failed", f"internal error: {exc}. hint: report this with the log.")
            return None

    def _sleep_time(self, next_at: float | None) -> float:
        """Until the earliest requested look, at most a tick (events may be lost)."""
        tick = self.cfg.tuning.tick_seconds
        if next_at is None:
            return tick
        return min(tick, max(0.0, next_at - time.monotonic()))

    async def run(self, stop: asyncio.Event) -> None:
        """The loop; returns when `stop` is set, leaving the backends running."""
        self.adopt()
        while not stop.is_set():
            next_at = None
            try:
                next_at = self.tick(time.monotonic())
            except Exception:
                log.exception("node %s: reconcile pass failed", self.cfg.node)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sleep_time(next_at))
            self._wake.clear()
        for runner in self.runners.values():
            runner.detach()
        self._write_status(running=False)

    # ---- status ---------------------------------------------------------------------
    def status(self, running: bool = True) -> dict[str, Any]:
        instances = [r.status() for r in self.runners.values()]
        shown = {i["id"] for i in instances}
        instances += [{"id": rid, "state": "stopping"} for rid in self.stopping
                      if rid not in shown]
        return {
            "node": self.cfg.node, "version": VERSION, "running": running,
            "pid": os.getpid(), "started_at": self.started_at,
            "assignment_error": self.assignment_error,
            "instances": sorted(instances, key=lambda i: str(i["id"])),
        }

    def _write_status(self, running: bool = True) -> None:
        body = self.status(running)
        text = json.dumps(body, sort_keys=True)
        if text == self._last_status:
            return
        self._last_status = text
        body["updated_at"] = time.time()
        path: Path = self.cfg.status_file
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
