"""One instance's life on this host: fetch, start, probe, restart with backoff, stop.

`Runner.step(now)` is one level-based pass for one instance: it re-reads reality (is the
process alive? did the last probe answer?), does the one next thing that closes the
gap, and returns what happens next (`StepResult`: when to look again, or that the
failure is terminal). It never raises for a bad instance: problems become `failed` with
a message that says what to do. A failure a retry can fix (a busy port, a model not yet
there, a crash) is looked at again later; a terminal one (a bad command, a missing or
unrunnable binary, an invalid source) waits until the instance's spec changes, which
brings a new `Runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import procs
from agent.assignment import Instance
from agent.commands import Context, Health, Launch, build_launch
from agent.config import AgentConfig
from agent.errors import CommandError
from agent.health import probe
from agent.logs import log_path, tail
from agent.models import ModelStore
from agent.status import InstanceStatus

log = logging.getLogger("agent")

BACKOFF_MAX = 300.0
STARTING_PROBE_SECONDS = 0.25
LOG_LINES_ON_CRASH = 20
# errors of exec'ing the backend's own binary: the runtime is broken, a retry cannot help
EXEC_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR,
                         errno.ELOOP, errno.EISDIR})
# a fixed runtime does not change the spec, so a terminal failure needs one of these
RETRY_HINT = ("restart the agent (`systemctl restart stack-agent`; backends keep running) "
              "or change the instance")


def instance_hash(inst: Instance) -> str:
    """Fingerprint of the whole instance, API key included (a new key needs a restart)."""
    body = json.dumps(inst.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def resolve_binary(name: str, env: dict[str, str]) -> str:
    """The path a backend command's first word runs: itself when it names a path, else the
    first match on the PATH it starts with (a custom `command` may say `python3`)."""
    if "/" in name:
        return name
    return shutil.which(name, path=env.get("PATH")) or name


def backoff_delay(crashes: int) -> float:
    """Seconds to wait before restart number `crashes` in a row: 0, 1, 2, 4, ... 300.

    The first restart after healthy running is immediate (a killed backend is replaced
    at once); further crashes in a row back off from 1 s doubling to 5 min.
    """
    return 0.0 if crashes <= 1 else min(2.0 ** (crashes - 2), BACKOFF_MAX)


@dataclass(frozen=True)
class StepResult:
    """What a reconcile step asks for next, like controller-runtime's `Result`.

    `requeue_at`: the monotonic time this instance next needs a step; None when only an
    event does (a probe finishing or the backend exiting wake the loop themselves).
    `terminal`: it failed in a way no retry fixes, so nothing is tried until its spec
    changes.
    """

    requeue_at: float | None = None
    terminal: bool = False


@dataclass
class Shared:
    """What every runner of this agent uses."""

    cfg: AgentConfig
    store: ModelStore
    wake: Any  # Callable[[], None]; wakes the reconcile loop


class Runner:
    """Reconciles one desired instance."""

    def __init__(self, inst: Instance, shared: Shared) -> None:
        self.inst = inst
        self.shared = shared
        self.spec_hash = inst.spec_hash()
        self.instance_hash = instance_hash(inst)
        self.state = "pending"
        self.message: str | None = None
        self.progress: dict[str, Any] | None = None
        self.launch: Launch | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.pgid: int | None = None
        self.started_wall = 0.0
        self.started_mono = 0.0
        self.ready_since: float | None = None
        self.adopted = False
        self.restarts = 0
        self.crashes = 0
        self.unhealthy_since: float | None = None
        self.next_start = 0.0
        self.terminal = False
        # a terminal failure for a runtime binary that is missing: it is looked for again
        # every tick (a stat), so a runtime that `stack apply` reinstalls is used at once
        self.missing_binary: str | None = None
        self.next_probe = 0.0
        self.probe_failures = 0
        self.last_exit: int | None = None
        self.last_lines: list[str] = []
        self._probe: asyncio.Task[bool] | None = None
        self._pidfd: int | None = None

    # ---- paths and reporting -------------------------------------------------------
    @property
    def log_file(self) -> Path:
        return log_path(self.shared.cfg.logs_dir, self.inst.id)

    def _set(self, state: str, message: str | None = None) -> None:
        if (state, message) != (self.state, self.message):
            line = (f"node {self.shared.cfg.node}: instance {self.inst.id} "
                    f"({self.inst.model}) {state}")
            log.log(logging.WARNING if state in ("failed", "crash-looping", "unhealthy")
                    else logging.INFO, line + (f": {message}" if message else ""))
        self.state, self.message = state, message

    def status(self) -> dict[str, Any]:
        inst = self.inst
        extra: dict[str, Any] = {}
        if inst.layer_split is not None:  # the scheduler keeps a replica's split (sticky)
            extra["layer_split"] = list(inst.layer_split)
        if self.state in ("crash-looping", "failed") and self.last_lines:
            extra["last_log_lines"] = self.last_lines
        return InstanceStatus(
            id=inst.id, model=inst.model, replica=inst.replica, role=inst.role,
            backend=inst.backend, backend_version=inst.backend_version,
            gpus=list(inst.devices.indices), vendor=inst.devices.vendor, host=inst.host,
            port=inst.port, state=self.state, last_error=self.message,
            restarts=self.restarts, pid=self.pid, spec_hash=self.spec_hash,
            progress=self.progress, adopted=self.adopted,
            started_at=self.started_wall or None, last_exit_code=self.last_exit,
            kind=inst.kind, source_sha256=inst.source_sha256, **extra).to_json()

    # ---- the pass ----------------------------------------------------------------
    def step(self, now: float) -> StepResult:
        """One pass: notice an exit, start when due, probe; then say when to look again.

        Whatever is due at `now` is done in this pass (a restart without backoff, the
        first probe of a new backend), so the deadline returned is never `now` again.
        """
        if self.pid is not None and self._exited():
            self._on_exit(now)
        if self.terminal and self.missing_binary and os.access(self.missing_binary, os.X_OK):
            self.terminal, self.missing_binary, self.next_start = False, None, now
        if self.pid is None and not self.terminal and now >= self.next_start:
            self._try_start(now)
        if self.pid is not None:
            self._check_health(now)
        return self._next(now)

    def _next(self, now: float) -> StepResult:
        if self.terminal and self.missing_binary:
            return StepResult(now + self.shared.cfg.tuning.tick_seconds, terminal=True)
        if self.terminal:
            return StepResult(terminal=True)
        if self.pid is None:
            return StepResult(self.next_start)
        if self._probe is not None:
            return StepResult()  # its done callback wakes the loop
        return StepResult(self.next_probe)

    def _exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return self.pid is None or not procs.pid_alive(self.pid)

    def _on_exit(self, now: float) -> None:
        code = self.proc.returncode if self.proc is not None else None
        if self.pgid is not None:  # leftovers of the group (a wrapper's children) go too
            procs.signal_group(self.pgid, signal.SIGKILL)
        self._forget_process()
        self.last_exit = code
        self.last_lines = tail(self.log_file, LOG_LINES_ON_CRASH)
        self.restarts += 1
        self.crashes += 1
        delay = backoff_delay(self.crashes)
        self.next_start = now + delay
        what = f"backend exited (code {code})" if code is not None else "backend exited"
        if self.crashes >= 2:
            self._set("crash-looping",
                      f"{what}, {self.crashes} times in a row; restarting in {delay:g} s. "
                      f"hint: read `stack logs {self.inst.model}` (last lines in status).")
        else:
            self._set("starting", f"{what}; restarting now")

    # ---- starting ---------------------------------------------------------------
    def _fail_terminal(self, message: str) -> None:
        """A failure no retry fixes: nothing is tried again until the spec changes."""
        self.terminal = True
        self._set("failed", message)

    def _look_again(self, now: float, state: str, message: str | None = None) -> None:
        """A pre-start check that may pass later (a busy port, a download): next tick."""
        self.next_start = now + self.shared.cfg.tuning.tick_seconds
        self._set(state, message)

    def _try_start(self, now: float) -> None:
        inst, cfg = self.inst, self.shared.cfg
        model = self.shared.store.resolve(inst)
        self.progress = model.progress
        if model.error:
            if model.terminal:
                self._fail_terminal(model.error)
            else:
                self._look_again(now, "failed", model.error)
            return
        if model.path is None:
            self._look_again(now, "downloading")
            return
        try:
            launch = build_launch(inst, Context(model.path, str(cfg.instances_dir)))
        except CommandError as exc:
            self._fail_terminal(exc.text())
            return
        binary = resolve_binary(launch.argv[0], {**os.environ, **launch.env})
        problem = self._binary_problem(binary)
        if problem:
            self._fail_terminal(problem)
            self.missing_binary = binary
            return
        for peer in inst.peers if inst.role == "main" and inst.backend == "llama.cpp" else []:
            if not procs.port_listening(peer.host, peer.port):
                self._look_again(now, "starting",
                                 f"waiting for worker {peer.node} at {peer.host}:{peer.port}")
                return
        if not procs.port_free(inst.host, inst.port):
            self._look_again(now, "failed", (
                f"port {inst.port} on {inst.host} is already in use by another process. "
                "hint: stop that process, or let `stack apply` pick another port."))
            return
        self._spawn(launch, now)

    def _binary_problem(self, binary: str) -> str | None:
        """Why the runtime binary cannot be run, with what to do; None when it can."""
        if os.access(binary, os.X_OK):
            return None
        inst = self.inst
        what = "is not executable" if os.path.exists(binary) else "is missing"
        version = f" {inst.backend_version}" if inst.backend_version else ""
        if "/" not in binary:  # a custom command's program, looked up on the PATH
            return (f"`{binary}` is not on the agent's PATH. hint: install it on the host or "
                    "name it by its full path in `command`.")
        return (f"runtime binary {binary} {what}. hint: install {inst.backend}{version} "
                f"under {inst.runtime_path} (`stack apply` installs runtimes); the agent "
                "starts the instance once it is there.")

    def _spawn(self, launch: Launch, now: float) -> None:
        cfg = self.shared.cfg
        for path, content in launch.files.items():
            procs.write_private(Path(path), content)
        env = {**os.environ, **launch.env}
        try:
            proc = procs.spawn(launch.argv, env, self.log_file, cfg.instances_dir)
        except OSError as exc:
            self._on_spawn_error(launch.argv[0], exc, now)
            return
        self.launch, self.proc, self.pid, self.pgid = launch, proc, proc.pid, proc.pid
        self.started_wall, self.started_mono = time.time(), now
        self.adopted = False
        self._after_start(now)
        procs.save_record(cfg.instances_dir, procs.ProcRecord(
            id=self.inst.id, pid=proc.pid, pgid=proc.pid, spec_hash=self.spec_hash,
            instance_hash=self.instance_hash, port=self.inst.port, host=self.inst.host,
            cmdline=launch.argv, started_at=self.started_wall, restarts=self.restarts))
        self._set("starting", None)
        log.info("node %s: instance %s started pid %d: %s", cfg.node, self.inst.id, proc.pid,
                 " ".join(launch.argv))

    def _on_spawn_error(self, binary: str, exc: OSError, now: float) -> None:
        """The binary itself cannot be exec'd: terminal; anything else (no memory, too
        many processes) may pass, so it is retried with the crash backoff."""
        cannot = f"cannot start {binary}: {exc.strerror or exc}"
        if exc.filename == binary and exc.errno in EXEC_ERRNOS:
            self._fail_terminal(f"{cannot}. hint: reinstall the runtime, then {RETRY_HINT}.")
            return
        self.crashes += 1
        # never in this same pass, which just failed: at least the next tick
        delay = max(backoff_delay(self.crashes), self.shared.cfg.tuning.tick_seconds)
        self.next_start = now + delay
        self._set("failed", f"{cannot}; retrying in {delay:g} s. hint: check the host's "
                  "free memory and process limits.")

    def _after_start(self, now: float) -> None:
        self.ready_since = None
        self.probe_failures = 0
        self.next_probe = now
        self._watch_exit()

    def adopt(self, rec: procs.ProcRecord, now: float) -> None:
        """Take over a backend a previous agent started (checked by the caller)."""
        model = self.shared.store.resolve(self.inst)
        try:
            ctx = Context(model.path or "", str(self.shared.cfg.instances_dir))
            self.launch = build_launch(self.inst, ctx)
        except CommandError:
            self.launch = Launch(rec.cmdline, {}, Health("tcp"))
        self.pid, self.pgid, self.proc = rec.pid, rec.pgid, None
        self.started_wall = rec.started_at
        self.started_mono = now - max(0.0, time.time() - rec.started_at)
        self.adopted = True
        self.restarts = rec.restarts
        self._after_start(now)
        self._set("starting", "adopted from a previous agent")

    # ---- exits are noticed at once through a pidfd -----------------------------------
    def _watch_exit(self) -> None:
        if self.pid is None or not hasattr(os, "pidfd_open"):
            return
        try:
            fd = os.pidfd_open(self.pid)
            asyncio.get_running_loop().add_reader(fd, self.shared.wake)
        except (OSError, RuntimeError):
            return  # the 1 s tick notices instead
        self._pidfd = fd

    def detach(self) -> None:
        """Stop watching the backend (the agent exits; the backend keeps running)."""
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _forget_process(self) -> None:
        self.detach()
        procs.remove_record(self.shared.cfg.instances_dir, self.inst.id)
        self.proc = self.pid = self.pgid = None
        self.ready_since = None

    # ---- health -----------------------------------------------------------------
    def _check_health(self, now: float) -> None:
        tuning = self.shared.cfg.tuning
        if self._probe is not None:
            if not self._probe.done():
                return
            ok = not self._probe.cancelled() and self._probe.exception() is None \
                and self._probe.result()
            self._probe = None
            self._on_probe(ok, now)
        if self.state == "ready" and self.ready_since is not None \
                and now - self.ready_since >= tuning.stable_after_seconds:
            self.crashes = 0
        if self.state == "unhealthy" and self.unhealthy_since is not None \
                and tuning.restart_unhealthy_after_seconds \
                and now - self.unhealthy_since >= tuning.restart_unhealthy_after_seconds:
            self._kill_hung(now - self.unhealthy_since)
            return
        if now >= self.next_probe and self.launch is not None:
            self._probe = asyncio.ensure_future(
                probe(self.launch.health, self.inst.host, self.inst.port, self.inst.api_key))
            self._probe.add_done_callback(lambda _t: self.shared.wake())

    def _kill_hung(self, for_seconds: float) -> None:
        """A backend that is alive but does not answer is killed; `_on_exit` then restarts
        it with the crash backoff, as if it had crashed."""
        log.warning("node %s: instance %s unhealthy for %.0f s; killing it to restart it",
                    self.shared.cfg.node, self.inst.id, for_seconds)
        self.unhealthy_since = None
        if self.pgid is not None:
            procs.signal_group(self.pgid, signal.SIGKILL)
        elif self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)

    def _on_probe(self, ok: bool, now: float) -> None:
        tuning = self.shared.cfg.tuning
        if ok:
            self.probe_failures = 0
            self.unhealthy_since = None
            self.next_probe = now + tuning.probe_interval_seconds
            if self.state != "ready":
                self.ready_since = now
                self._set("ready", None)
                if not self.adopted:
                    log.info("node %s: instance %s ready %.1f s after start",
                             self.shared.cfg.node, self.inst.id, now - self.started_mono)
            return
        if self.ready_since is None:  # still starting up
            self.next_probe = now + STARTING_PROBE_SECONDS
            limit = tuning.startup_timeout_seconds
            if now - self.started_mono > limit:
                self.next_probe = now + tuning.probe_interval_seconds
                self.unhealthy_since = self.unhealthy_since or now
                self._set("unhealthy", (
                    f"not healthy {limit:g} s after start. hint: read `stack logs "
                    f"{self.inst.model}`; a large model may need a longer "
                    "`tuning.startup_timeout_seconds`."))
            return
        self.probe_failures += 1
        self.next_probe = now + tuning.probe_interval_seconds
        if self.probe_failures >= tuning.unhealthy_after_failures:
            self.unhealthy_since = self.unhealthy_since or now
            self._set("unhealthy", (
                f"health check failed {self.probe_failures} times in a row. "
                f"hint: read `stack logs {self.inst.model}`."))

    # ---- stopping ---------------------------------------------------------------
    async def stop(self, reason: str) -> None:
        """Stop the backend: SIGTERM to its group, a grace period, then SIGKILL."""
        cfg = self.shared.cfg
        self._set("stopping", reason)
        pgid, proc, launch = self.pgid, self.proc, self.launch
        self._forget_process()
        if pgid is not None:
            killed = await procs.stop_group(pgid, cfg.tuning.stop_grace_seconds, proc)
            if proc is not None:
                proc.poll()
            log.info("node %s: instance %s stopped%s", cfg.node, self.inst.id,
                     " (SIGKILL after the grace period)" if killed else "")
        if launch is not None:
            await run_stop_command(launch.stop_argv)
            for path in launch.files:
                Path(path).unlink(missing_ok=True)
        self._set("stopped", reason)


async def run_stop_command(argv: list[str]) -> None:
    """Run a backend's clean-up command (`ray stop`), bounded in time, ignoring failure."""
    if not argv or not os.access(argv[0], os.X_OK):
        return
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.wait_for(proc.wait(), 30)
    except (OSError, TimeoutError):
        log.warning("clean-up command %s did not finish", argv[0])
