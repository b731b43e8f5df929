"""`stack apply`: converge the fleet on the plan, host by host, and report every host.

    lock -> facts -> plan (fresh, or a saved one checked for staleness) -> confirm
    -> deploys (one pyinfra run, parallel over hosts; unchanged hosts only no-op)
    -> reboots (only with --allow-reboot, one host at a time)
    -> assignments, rolling: new instances are added beside the old ones and must be
       `ready` before the router is pointed at them and the old ones are removed
       (replacements in place go at most `--max-unavailable` at a time)
    -> router config written and reloaded -> runtime versions nobody uses removed
    -> locks released.

A host that fails is named with the reason; the others converge; the result says so and
the command exits 1. Every step is idempotent, so an interrupted apply is finished by the
next one. Ctrl-C during the deploys and reboots stops apply once the steps in progress are
done on every host (a second Ctrl-C stops it at once): a command left running on a host
after apply exits could race the next apply.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

from agent.assignment import Assignment, Instance
from deploys.drivers import DriverRequest
from deploys.facts import agent_status_body, facts_command
from deploys.runtimes import RuntimeInstall, removal_script, runtime_path, unused_versions
from deploys.services import reload_commands, start_commands
from deploys.state import dumps, host_files_script, parse_host_files
from deploys.steps import HostTarget, ModelUpload, Step, agent_paths, host_steps, sha256_text
from router.config import RouterConfig
from stack import lock as locks
from stack import remote
from stack.errors import ApplyError, StackError
from stack.hostfiles import (
    MANIFEST,
    HostFile,
    agent_listen,
    agent_service,
    manifest_text,
    node_prefix,
    render_agent_toml,
    router_body,
    router_service,
)
from stack.observed import NodeFacts, Observed
from stack.plan import Plan
from stack.spec import StackSpec
from stack.wheelhouse import (
    agent_bundle,
    fetch_sdist,
    prebuilt_bin,
    prebuilt_tarball,
    sha256_file,
)


@dataclass
class HostReport:
    """What apply did on one host."""

    node: str
    changed: list[str] = field(default_factory=list)
    error: str | None = None
    hint: str = ""

    def fail(self, error: str, hint: str = "") -> None:
        if self.error is None:
            self.error, self.hint = error, hint


@dataclass
class ApplyResult:
    """The outcome of one apply: a report per host and the router's."""

    hosts: dict[str, HostReport] = field(default_factory=dict)
    router_changed: bool = False
    lock_id: str = ""

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.hosts.values())

    @property
    def changed(self) -> bool:
        return self.router_changed or any(r.changed for r in self.hosts.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "changed": self.changed, "router_changed": self.router_changed,
                "hosts": {n: {"changed": r.changed, "error": r.error, "hint": r.hint}
                          for n, r in sorted(self.hosts.items())}}


@dataclass(frozen=True)
class ApplyOptions:
    allow_reboot: bool = False
    max_unavailable: int = 1
    ready_timeout: float = 900.0
    poll_interval: float = 0.5
    stop_timeout: float = 60.0  # removed instances: the agent's grace, then SIGKILL


@dataclass(frozen=True)
class Desired:
    """What the plan turns into: per-node assignments and the router config."""

    assignments: dict[str, Assignment]
    router: RouterConfig | None
    router_nodes: list[str]


# -- desired state --------------------------------------------------------------------


def _runtime_of(spec: StackSpec, inst: Instance, prefix: str) -> tuple[str, str] | None:
    """(runtime name, version) from an instance's runtime path under the prefix."""
    base = f"{prefix}/runtimes/"
    if not inst.runtime_path.startswith(base):
        return None
    name, _, version = inst.runtime_path[len(base):].partition("/")
    if name not in spec.runtimes or not version:
        return None
    return name, version


def resolve_local(spec_source: str, stack_dir: Path) -> Path:
    """`local://PATH` -> the controller path (relative to stack.toml, or `local:///abs`)."""
    rest = spec_source[len("local://"):]
    path = Path(rest)
    return path if path.is_absolute() else stack_dir / path


def _runtime_install(
    spec: StackSpec, stack_dir: Path, name: str, version: str, prefix: str, facts: NodeFacts,
) -> tuple[RuntimeInstall, Path | None]:
    """A runtime version to install on one host, and the controller file it needs."""
    rt = spec.runtimes[name]
    expected = rt.sha256.get(version)
    url = (rt.url or "").replace("{version}", version)
    local: Path | None = None
    if rt.source in ("archive", "build") and not rt.url and rt.package:
        local = fetch_sdist(rt.package.replace("{version}", version),
                            what=f"runtimes.{name}.package")
    elif rt.source in ("archive", "build") and (url.startswith("local://") or url.startswith("/")):
        local = resolve_local(url, stack_dir) if url.startswith("local://") else Path(url)
        if not local.exists():
            raise ApplyError(f"`runtimes.{name}.url` names `{local}`, which does not exist",
                             hint="put the archive there or fix the URL.")
    upload = f"{prefix}/runtimes/.uploads/{name}-{version}"
    if rt.source == "build" and local is not None:
        digest = sha256_file(local)
        if expected and digest != expected:
            raise ApplyError(
                f"`runtimes.{name}.sha256.\"{version}\"` does not match `{local}` "
                f"(its sha256 is {digest})",
                hint="fix the sha256 in stack.toml or replace the archive.",
            )
        target_platform = f"{facts.os}-{facts.arch}"
        prebuilt = prebuilt_bin(local, digest, rt.cmake_args, rt.targets, rt.subdir,
                                target_platform)
        if prebuilt is not None:
            install = RuntimeInstall(name, version, rt, prefix, upload=upload, prebuilt=True)
            return install, prebuilt_tarball(prebuilt)
        return RuntimeInstall(name, version, rt, prefix, upload=upload, sha256=digest), local
    if rt.source == "build" and expected:
        # a URL source with a pinned sha256: a controller build of that archive counts too
        target_platform = f"{facts.os}-{facts.arch}"
        prebuilt = prebuilt_bin(Path(url.rsplit("/", 1)[-1]), expected, rt.cmake_args,
                                rt.targets, rt.subdir, target_platform)
        if prebuilt is not None:
            install = RuntimeInstall(name, version, rt, prefix, upload=upload, prebuilt=True)
            return install, prebuilt_tarball(prebuilt)
    if local is not None:
        return RuntimeInstall(name, version, rt, prefix, upload=upload,
                              sha256=expected or sha256_file(local)), local
    return RuntimeInstall(name, version, rt, prefix, sha256=expected), None


def _model_uploads(assignment: Assignment, stack_dir: Path) -> list[ModelUpload]:
    uploads: dict[str, ModelUpload] = {}
    for inst in assignment.instances:
        if not inst.source.startswith("local://") or not inst.model_path:
            continue
        source = resolve_local(inst.source, stack_dir)
        files = ([source] if source.is_file()
                 else sorted(p for p in source.rglob("*") if p.is_file()))
        for path in files:
            dest = inst.model_path if source.is_file() else (
                f"{inst.model_path}/{path.relative_to(source).as_posix()}")
            uploads[dest] = ModelUpload(path, dest, sha256_file(path))
    return list(uploads.values())


# -- the run ------------------------------------------------------------------------------


@dataclass
class _Node:
    """One reachable host during apply."""

    name: str
    host: Any  # pyinfra Host
    prefix: str
    facts: NodeFacts
    files: dict[str, Any] = field(default_factory=dict)
    current: Assignment | None = None
    manager: str = "supervise"
    # what this apply knows is in place on the host (state/managed records only that):
    # the files it wrote or found up to date (path -> sha256), and whether its deploy
    # steps (agent files, units, uploads) all succeeded
    written: dict[str, str] = field(default_factory=dict)
    deployed: bool = False


def _host_probe(node: _Node, lock: locks.LockInfo, extra_files: list[str],
                sidecars: list[str]) -> None:
    """Take the host lock and read what apply wrote last time (one round trip)."""
    paths = agent_paths(node.prefix)
    services = [f"{node.prefix}/run/{name}.supervisor.pid" for name in ("agent", "router")]
    files = [paths["agent_toml"], paths["agent_token"], paths["router_json"],
             paths["assignment"], *extra_files]
    script = (locks.host_acquire_script(node.prefix, lock) + "\n"
              + host_files_script(node.prefix, files, [paths["bundle"], *sidecars], services)
              + f"\necho assignment-json; cat {shlex.quote(paths['assignment'])} 2>/dev/null "
              "| tr -d '\\n'; echo")
    ok, out, err = remote.run(node.host, script)
    if not ok:
        raise ApplyError(f"`{node.name}`: could not read the host's state: {err.strip()[:300]}",
                         hint="check the prefix's permissions and free disk space.")
    lines = out.splitlines()
    locks.check_host_lock(out, node.name)
    node.files = parse_host_files(lines)
    node.manager = node.files["manager"]
    if "assignment-json" in lines:
        text = lines[lines.index("assignment-json") + 1:]
        try:
            node.current = Assignment.model_validate_json(text[0]) if text and text[0] else None
        except ValueError:
            node.current = None


def _release_host_locks(nodes: list[_Node], lock_id: str) -> None:
    def one(node: _Node) -> None:
        try:
            remote.run(node.host, locks.host_release_script(node.prefix, lock_id))
        except Exception:  # a host that died mid-apply keeps its lock: force-unlock
            return

    jobs = [gevent.spawn(one, n) for n in nodes]
    gevent.joinall(jobs, timeout=30)


def _targets(
    spec: StackSpec, stack_dir: Path, nodes: list[_Node], desired: Desired,
    reports: dict[str, HostReport],
) -> tuple[dict[str, HostTarget], list[str], list[str]]:
    """Per-host targets and the fleet-wide step keys (runtimes, models)."""
    from stack.secrets import derive_key, stack_secret

    bundle = agent_bundle()
    secret = stack_secret(stack_dir)
    targets: dict[str, HostTarget] = {}
    runtime_keys: set[str] = set()
    model_keys: set[str] = set()
    for node in nodes:
        try:
            assignment = desired.assignments.get(node.name, Assignment(node=node.name))
            installs: list[RuntimeInstall] = []
            uploads: dict[str, Path] = {}
            seen: set[tuple[str, str]] = set()
            for inst in assignment.instances:
                key = _runtime_of(spec, inst, node.prefix)
                if key is None or key in seen:
                    continue
                seen.add(key)
                install, local = _runtime_install(spec, stack_dir, *key, node.prefix, node.facts)
                installs.append(install)
                if local is not None:
                    uploads[install.path] = local
            models = _model_uploads(assignment, stack_dir)
            drivers = _driver_requests(spec, node)
            router = (router_service(spec, node.prefix, node.manager)
                      if node.name in desired.router_nodes else None)
            targets[node.name] = HostTarget(
                node=node.name, prefix=node.prefix, facts=node.facts, files=node.files,
                drivers=drivers, runtimes=installs, runtime_uploads=uploads,
                bundle=bundle.tarball, bundle_version=bundle.version,
                wheel_name=bundle.wheel_name,
                agent_toml=render_agent_toml(spec, node.name,
                                             agent_listen(spec, node.name, node.facts),
                                             node.prefix),
                agent_token=derive_key(secret, f"agent:{node.name}") + "\n",
                agent_service=agent_service(spec, node.prefix, node.manager),
                router_service=router, models=models,
            )
            check_disk(node.name, node.prefix, node.facts, targets[node.name])
            runtime_keys |= {f"runtime {i.name} {i.version}" for i in installs}
            model_keys |= {f"model {m.dest}" for m in models}
        except StackError as err:
            targets.pop(node.name, None)
            reports[node.name].fail(err.message, err.hint)
    return targets, sorted(runtime_keys), sorted(model_keys)


def upload_bytes(target: HostTarget) -> int:
    """Bytes this host still has to receive (what is already there is not counted)."""
    total = 0
    if target.files.get("sidecars", {}).get(agent_paths(target.prefix)["bundle"]) \
            != target.bundle_version:
        total += 3 * target.bundle.stat().st_size  # the tarball, its wheels, the venv
    for install in target.runtimes:
        if install.version in target.facts.runtimes.get(install.name, []):
            continue
        local = target.runtime_uploads.get(install.path)
        size = local.stat().st_size if local is not None else 0
        total += (3 if install.prebuilt else 20) * size  # archive + extracted (+ build)
    for model in target.models:
        if target.files.get("sidecars", {}).get(model.dest + ".sha256") != model.sha256:
            total += model.source.stat().st_size
    return total


def check_disk(node: str, prefix: str, facts: NodeFacts, target: HostTarget) -> None:
    """Refuse a host whose disk cannot hold what apply would put there."""
    needed = upload_bytes(target)
    free = target.files.get("free") or facts.disk_free_bytes
    if needed and free and free < needed:
        raise ApplyError(
            f"`{node}` has {free / 1024**3:.1f} GiB free at `{prefix}` but this apply "
            f"needs about {needed / 1024**3:.1f} GiB there",
            hint="free space on that disk or set `[nodes.\"...\"] prefix` to a larger one.")


def run_deploys(
    state: Any, nodes: list[_Node], targets: dict[str, HostTarget], runtime_keys: list[str],
    model_keys: list[str], reports: dict[str, HostReport],
) -> dict[str, list[Step]]:
    """One pyinfra run: the same operation sequence on every host, in parallel."""
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.operation import add_op
    from pyinfra.api.operations import run_ops

    from deploys.ops import step as step_op

    plans = {n: host_steps(t, runtime_keys, model_keys) for n, t in targets.items()}
    by_name = {n.name: n for n in nodes}
    for name in plans:  # pyinfra runs operations only on "active" hosts
        state.activate_host(by_name[name].host)
    skipped = {n.name for n in nodes if n.name not in plans}
    if skipped:
        try:
            state.fail_hosts({by_name[n].host for n in skipped})
        except PyinfraError:
            return {}  # no host left to deploy to; each is reported already
    width = 1 + len(runtime_keys) + 6 + len(model_keys)
    for index in range(width):
        for name, steps in plans.items():
            add_op(state, step_op, steps[index], name=f"{steps[index].key}",
                   host=by_name[name].host)
    with contextlib.suppress(PyinfraError):  # every host failed: each is reported below
        run_ops(state)
    for name, steps in plans.items():
        host = by_name[name].host
        report = reports[name]
        if host in state.failed_hosts:
            blocked = next((s.blocked for s in steps if s.blocked), None)
            if blocked:
                report.fail(blocked.reason, blocked.hint)
            else:
                report.fail(f"`{name}`: a deploy step failed: {_last_error(state, host)}",
                            "fix the cause shown above and run `stack apply` again; "
                            "finished steps are not repeated.")
            continue
        report.changed += [s.key for s in steps if s.changes]
        by_name[name].deployed = True
        by_name[name].written.update(_deployed_files(targets[name]))
    return plans


def _last_error(state: Any, host: Any) -> str:
    """The stderr of the operation that failed on `host`, for the report."""
    for op_hash in reversed(state.get_op_order()):
        meta = state.ops[host].get(op_hash)
        if meta is None:
            continue
        result = meta.operation_meta
        if result.is_complete() and result.did_error():
            lines = (result.stderr or "").strip().splitlines()
            return lines[-1][:300] if lines else "the command failed without output"
    return "see the output above"


# -- rollout --------------------------------------------------------------------------------


def _agent_status(node: _Node) -> dict[str, Any]:
    """The agent's status on the host ({} when it cannot be read now): its status file
    while it runs, else `stack-agent status --json` (deploys/facts.sh, agent part only)."""
    ok, out, _ = remote.run(node.host, facts_command(node.prefix, agent_only=True))
    try:
        raw = json.loads(out) if ok else {}
    except json.JSONDecodeError:
        raw = {}
    return (agent_status_body(raw) if isinstance(raw, dict) else None) or {}


def _surge(current: Assignment | None, desired: Assignment, hold: set[str]) -> Assignment:
    """The desired instances plus the old ones not yet replaced: nothing goes away before
    its replacement is ready. `hold`: ids whose old version stays for now."""
    old = {i.id: i for i in (current.instances if current else [])}
    chosen: dict[str, Instance] = {}
    for inst in desired.instances:
        chosen[inst.id] = old[inst.id] if inst.id in hold and inst.id in old else inst
    ports = {i.port for i in chosen.values()}
    for iid, inst in old.items():
        if iid not in chosen and inst.port not in ports:
            chosen[iid] = inst
            ports.add(inst.port)
    return Assignment(node=desired.node, instances=sorted(chosen.values(), key=lambda i: i.id))


def _write_assignment(node: _Node, assignment: Assignment) -> bool:
    """Write assignment.json if it differs; the agent picks the change up itself."""
    body = dumps(assignment.model_dump(mode="json")).encode()
    path = agent_paths(node.prefix)["assignment"]
    if node.files.get("files", {}).get(path) == sha256_text(body):
        return False
    remote.write(node.host, path, body, "600")
    node.files.setdefault("files", {})[path] = sha256_text(body)
    node.current = assignment
    return True


def _wait_ready(nodes: list[_Node], wanted: dict[str, dict[str, str]],
                reports: dict[str, HostReport], options: ApplyOptions,
                progress: Callable[[str], None]) -> None:
    """Poll the agents until every wanted instance (id -> spec hash) is `ready`."""
    deadline = time.monotonic() + options.ready_timeout
    pending = {n.name: dict(wanted.get(n.name, {})) for n in nodes if wanted.get(n.name)}
    by_name = {n.name: n for n in nodes}
    last: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        def poll(name: str) -> None:
            body = _agent_status(by_name[name])
            states = {str(i.get("id")): i for i in body.get("instances") or []}
            for iid, spec_hash in list(pending[name].items()):
                item = states.get(iid, {})
                state = str(item.get("state", "missing"))
                if state == "ready" and item.get("spec_hash") not in (None, spec_hash):
                    state = "still the old version"
                if state == "ready" and item.get("spec_hash") in (None, spec_hash):
                    del pending[name][iid]
                    progress(f"{name}: {iid} is ready")
                elif state == "failed":
                    reports[name].fail(
                        f"`{name}`: instance `{iid}` failed: {item.get('last_error') or state}",
                        f"read `stack logs {item.get('model', iid)}` for the backend's output.")
                    del pending[name][iid]
                elif last.get(iid) != state:
                    last[iid] = state
                    progress(f"{name}: {iid} is {state}")
            if body.get("assignment_error"):
                reports[name].fail(f"`{name}`: the agent rejected its assignment: "
                                   f"{body['assignment_error']}",
                                   "this is a bug in stack apply; please report it.")
                pending[name].clear()
            if not pending[name]:
                del pending[name]

        jobs = [gevent.spawn(poll, name) for name in list(pending)]
        gevent.joinall(jobs)
        if pending:
            gevent.sleep(options.poll_interval)
    for name, ids in pending.items():
        states = ", ".join(f"{i} ({last.get(i, 'unknown')})" for i in sorted(ids))
        reports[name].fail(
            f"`{name}`: not ready after {int(options.ready_timeout)} s: {states}",
            "read `stack logs MODEL` and `stack status`; the next apply picks up from here.")


def rollout(nodes: list[_Node], desired: Desired, reports: dict[str, HostReport],
            options: ApplyOptions, progress: Callable[[str], None]) -> None:
    """Assignments in waves: new beside old, replacements `max_unavailable` at a time."""
    live = [n for n in nodes if reports[n.name].error is None]
    changed: dict[str, dict[str, str]] = {}
    replaced: list[tuple[str, str]] = []
    for node in live:
        want = desired.assignments.get(node.name, Assignment(node=node.name))
        old = {i.id: i.spec_hash() for i in (node.current.instances if node.current else [])}
        running = {i.id: i.spec_hash for i in node.facts.agent.instances if i.state == "ready"}
        for inst in want.instances:
            fresh = old.get(inst.id) != inst.spec_hash()
            if fresh or running.get(inst.id) not in (inst.spec_hash(), None) \
                    or inst.id not in running:
                # not yet ready as desired: wait for it (written earlier, or now)
                changed.setdefault(node.name, {})[inst.id] = inst.spec_hash()
            if fresh and inst.id in old:
                replaced.append((node.name, inst.id))
    step = max(1, options.max_unavailable)
    waves = [replaced[k:k + step] for k in range(0, len(replaced), step)] or [[]]
    for wave_index, _wave in enumerate(waves):
        done = {r for w in waves[:wave_index + 1] for r in w}
        hold_all = {r for r in replaced if r not in done}
        for node in live:
            if reports[node.name].error is not None:
                continue
            want = desired.assignments.get(node.name, Assignment(node=node.name))
            hold = {iid for (n, iid) in hold_all if n == node.name}
            try:
                if _write_assignment(node, _surge(node.current, want, hold)):
                    reports[node.name].changed.append("assignment")
            except StackError as err:
                reports[node.name].fail(err.message, err.hint)
        wanted = {n: {iid: h for iid, h in ids.items()
                      if (n, iid) not in hold_all}
                  for n, ids in changed.items() if reports[n].error is None}
        _wait_ready(live, wanted, reports, options, progress)


def finish_assignments(nodes: list[_Node], desired: Desired, reports: dict[str, HostReport],
                       options: ApplyOptions | None = None,
                       progress: Callable[[str], None] = lambda line: None) -> None:
    """Remove the old instances (their replacements are ready and routed) and wait until
    their agents have stopped them, so a plan right after apply finds nothing to do."""
    gone: dict[str, set[str]] = {}
    for node in nodes:
        if reports[node.name].error is not None:
            continue
        want = desired.assignments.get(node.name, Assignment(node=node.name))
        before = {i.id for i in (node.current.instances if node.current else [])}
        try:
            if _write_assignment(node, want) and "assignment" not in reports[node.name].changed:
                reports[node.name].changed.append("assignment")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
            continue
        removed = before - {i.id for i in want.instances}
        if removed:
            gone[node.name] = removed
    _wait_gone(nodes, gone, reports, options or ApplyOptions(), progress)


def _wait_gone(nodes: list[_Node], gone: dict[str, set[str]], reports: dict[str, HostReport],
               options: ApplyOptions, progress: Callable[[str], None],
               status: Callable[[_Node], dict[str, Any]] | None = None) -> None:
    """Poll the agents until none reports an instance of `gone` (node -> ids) any more."""
    read = status or _agent_status
    by_name = {n.name: n for n in nodes}
    pending = {name: set(ids) for name, ids in gone.items() if ids}
    deadline = time.monotonic() + options.stop_timeout
    while pending and time.monotonic() < deadline:
        def poll(name: str) -> None:
            body = read(by_name[name])
            if "instances" not in body:
                return  # not readable now: ask again
            listed = {str(i.get("id")) for i in body["instances"] or []}
            for iid in sorted(pending[name] - listed):
                progress(f"{name}: {iid} is stopped")
            pending[name] &= listed
            if not pending[name]:
                del pending[name]

        gevent.joinall([gevent.spawn(poll, name) for name in list(pending)])
        if pending:
            gevent.sleep(options.poll_interval)
    for name, ids in sorted(pending.items()):
        reports[name].fail(
            f"`{name}`: {', '.join(sorted(ids))} still running {options.stop_timeout:g} s "
            "after it was removed from the assignment",
            "the agent keeps stopping it; see `stack status` and `stack logs MODEL`.")


def update_routers(spec: StackSpec, nodes: list[_Node], desired: Desired,
                   reports: dict[str, HostReport]) -> bool:
    """Write router.json where it differs and start or reload the router (SIGHUP)."""
    if desired.router is None:
        return False
    body = router_body(desired.router)
    changed = False
    for node in nodes:
        if node.name not in desired.router_nodes or reports[node.name].error is not None:
            continue
        service = router_service(spec, node.prefix, node.manager)
        path = agent_paths(node.prefix)["router_json"]
        alive = bool(node.files.get("alive", {}).get(service.supervisor_pid_file))
        if service.manager != "supervise":
            alive = True
        fresh = node.files.get("files", {}).get(path) != sha256_text(body)
        unit_changed = "router-unit" in reports[node.name].changed
        agent_changed = "agent-install" in reports[node.name].changed
        try:
            if fresh:
                remote.write(node.host, path, body, "600")
            commands = start_commands(service, running=alive, restart=unit_changed or agent_changed)
            if alive and fresh and not commands:
                commands = reload_commands(service)
            for command in commands:
                ok, _, err = remote.run(node.host, command)
                if not ok:
                    raise ApplyError(f"`{node.name}`: the router did not start: {err.strip()}",
                                     hint=f"read {service.log} on the host.")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
            continue
        node.written[path] = sha256_text(body)
        if fresh or commands:
            reports[node.name].changed.append("router")
            changed = True
    return changed


def remove_unused_runtimes(spec: StackSpec, nodes: list[_Node], desired: Desired,
                           reports: dict[str, HostReport]) -> None:
    """Remove the runtime versions stack.toml no longer lists (`unused_versions`), last and
    only on hosts that converged: their instances run as desired by now. A version that
    the desired or the last written assignment still names is kept (the agent runs it)."""
    listed = {name: rt.versions for name, rt in spec.runtimes.items()}
    for node in nodes:
        if reports[node.name].error is not None:
            continue  # its instances may still run on a version stack.toml dropped
        told = [*desired.assignments.get(node.name, Assignment(node=node.name)).instances,
                *(node.current.instances if node.current else [])]
        paths = {i.runtime_path for i in told}
        in_use = {(name, v) for name, versions in node.facts.runtimes.items()
                  for v in versions if runtime_path(node.prefix, name, v) in paths}
        for name, stale in unused_versions(node.facts.runtimes, listed, in_use).items():
            ok, _, err = remote.run(node.host, removal_script(node.prefix, name, stale))
            if not ok:
                reports[node.name].fail(
                    f"`{node.name}`: could not remove {name} {', '.join(stale)}: "
                    f"{err.strip()[:300]}",
                    "check the permissions of the prefix; the next `stack apply` tries again.")
                break
            reports[node.name].changed.append(f"removed {name} {', '.join(stale)}")


# -- the whole apply -----------------------------------------------------------------------


def _desired(spec: StackSpec, stack_dir: Path, plan: Plan) -> Desired:
    """The plan's assignments, and the router config made from them, with the secrets
    filled in: exactly what the plan shows, nothing rebuilt."""
    from stack.assign import build_router_config, with_api_keys
    from stack.secrets import stack_secret

    assignments = with_api_keys(dict(plan.assignments), stack_secret(stack_dir))
    router = build_router_config(spec, plan.placements, assignments)
    return Desired(assignments, router, list(plan.placements.routers))


def keep_unknown(desired: Desired, plan: Plan, nodes: list[_Node]) -> None:
    """Replicas kept because their model's metadata is unknown run exactly as they do now:
    their instances come from the host's current assignment, never rebuilt (and are left
    out where the host's assignment cannot be read)."""
    kept = {p.id for p in plan.placements.kept} | {
        p.worker_id(k) for p in plan.placements.kept for k in range(1, len(p.workers) + 1)}
    if not kept:
        return
    for node in nodes:
        want = desired.assignments.get(node.name)
        if want is None:
            continue
        current = {i.id: i for i in (node.current.instances if node.current else [])}
        instances = [current[i.id] if i.id in kept else i for i in want.instances
                     if i.id not in kept or i.id in current]
        desired.assignments[node.name] = Assignment(node=node.name, instances=instances)


def _deployed_files(target: HostTarget) -> dict[str, str]:
    """The files the deploy steps keep on a host (path -> sha256 of their content)."""
    from deploys.services import unit_file

    paths = agent_paths(target.prefix)
    out = {paths["agent_toml"]: sha256_text(target.agent_toml.encode()),
           paths["agent_token"]: sha256_text(target.agent_token.encode())}
    for service in (target.agent_service, target.router_service):
        if service is not None:
            out[service.unit_path] = sha256_text(unit_file(service).encode())
    return out


def write_manifests(plan: Plan, nodes: list[_Node], reports: dict[str, HostReport]) -> None:
    """Record on each host what this apply put in place (`state/managed`): the plan's
    fingerprint and the sha256 of the bytes written, for each file it wrote or found up to
    date; a file it did not get to (the host failed first) keeps its old line, or gets
    none, so the next plan shows it again."""
    for node in nodes:
        managed = node.facts.managed or {}
        lines: list[HostFile] = []
        written: dict[str, str] = {}
        for f in plan.files.get(node.name, ()):
            if f.path in node.written or (f.kind == "upload" and node.deployed):
                lines.append(f)
                written[f.path] = node.written.get(f.path, f.fingerprint)
            elif f.path in managed:
                old = managed[f.path]
                lines.append(HostFile(f.address, f.path, old.fingerprint, old.kind))
                written[f.path] = old.written
        text = manifest_text(lines, written)
        path = f"{node.prefix}/{MANIFEST}"
        if node.files.get("files", {}).get(path) == sha256_text(text.encode()):
            continue
        try:
            remote.write(node.host, path, text.encode(), "600")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)


REBOOT_COMMAND = "(sleep 2; reboot) >/dev/null 2>&1 &"  # returns before the host goes down
REBOOT_DOWN_TIMEOUT = 300.0  # a shutdown may wait for slow services this long
REBOOT_POLL = 2.0


def back_after_reboot(before: NodeFacts, after: NodeFacts,
                      requests: list[DriverRequest]) -> bool:
    """Whether a rebooted host is back: it answers, no reboot is pending any more, every
    GPU it had is seen again and every driver is in its desired state."""
    from deploys.drivers import driver_commands

    if not after.reachable or after.error or after.reboot_required:
        return False
    if len(after.gpus) < len(before.gpus):
        return False
    return all(driver_commands(after, request) == [] for request in requests)


def _wait_down(host: remote.Host, limit: float) -> bool:
    """Whether the host's SSH connection dropped (it is going down) within `limit` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with gevent.Timeout(10):
                ok, _, _ = remote.run(host, "true")
        except (Exception, gevent.Timeout):
            return True
        if not ok:
            return True
        gevent.sleep(0.5)
    return False


def _reconnect(host: Any) -> None:
    """A new SSH connection for a pyinfra host whose old one died with a reboot."""
    from pyinfra.context import ctx_host, ctx_state

    client = getattr(host.connector, "client", None)
    with contextlib.suppress(Exception):
        host.disconnect()  # drops the SFTP client bound to the dead connection
        if client is not None:
            client.close()
    host.connected = False
    with ctx_state.use(host.state), ctx_host.use(host):
        host.connect(show_errors=False, raise_exceptions=True)


def _reboot(node: _Node, spec: StackSpec, stack_dir: Path, report: HostReport,
            requests: list[DriverRequest], progress: Callable[[str], None],
            timeout: float = 900) -> bool:
    """Reboot one host, wait until it went down and came back (SSH answers, no reboot
    pending, the driver working), reconnect it and keep its fresh facts. False: failed."""
    from stack.observe import read_node

    progress(f"{node.name}: rebooting")
    try:
        remote.run(node.host, REBOOT_COMMAND)
    except Exception as exc:  # the connection died already: it is going down
        progress(f"{node.name}: {exc}")
    if not _wait_down(node.host, min(timeout, REBOOT_DOWN_TIMEOUT)):
        report.fail(f"`{node.name}` was still up {int(min(timeout, REBOOT_DOWN_TIMEOUT))} s "
                    "after `reboot`",
                    "check that the SSH user may run `reboot` (or set `sudo = true` under "
                    "`[nodes.\"...\"]`), then run `stack apply --allow-reboot` again.")
        return False
    progress(f"{node.name}: down, waiting for it to come back")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gevent.sleep(REBOOT_POLL)
        with remote.session(spec, stack_dir, hosts=[node.name]) as connected:
            if node.name in connected.errors:
                continue
            facts = read_node(spec, connected, node.name)
        if back_after_reboot(node.facts, facts, requests):
            try:
                _reconnect(node.host)
            except Exception as exc:
                report.fail(f"`{node.name}` came back from its reboot but apply could not "
                            f"reconnect: {exc}", "run `stack apply` again.")
                return False
            node.facts = facts
            report.changed.append("rebooted")
            progress(f"{node.name}: back after the reboot")
            return True
    report.fail(f"`{node.name}` did not come back with a working driver within "
                f"{int(timeout)} s after the reboot",
                "check the host's console; `stack apply` continues from here once it is up.")
    return False


def _restart_agent(spec: StackSpec, node: _Node, report: HostReport) -> None:
    """Start the agent again after a reboot where no service manager does it (the
    supervised background process); systemd and launchd start it at boot."""
    service = agent_service(spec, node.prefix, node.manager)
    if service.manager != "supervise":
        return
    alive = bool(node.files.get("alive", {}).get(service.supervisor_pid_file))
    for command in start_commands(service, running=alive, restart=False):
        ok, _, err = remote.run(node.host, command)
        if not ok:
            report.fail(f"`{node.name}`: the agent did not start after the reboot: "
                        f"{err.strip()}", f"read {service.log} on the host.")
            return


def _reboots(spec: StackSpec, stack_dir: Path, live: list[_Node], plans: dict[str, list[Step]],
             result: ApplyResult, options: ApplyOptions, probe: Callable[[_Node], None],
             progress: Callable[[str], None],
             check: Callable[[], None] = lambda: None) -> None:
    """Reboot the hosts that need it, one at a time, each back before the next goes down;
    without `--allow-reboot` (or once one did not come back) they are reported instead."""
    stopped_by = ""
    for node in live:
        steps = plans.get(node.name, [])
        report = result.hosts[node.name]
        if report.error is not None or not any(s.reboot for s in steps):
            continue
        check()  # an interrupt stops apply between reboots, never during one
        driver = any(s.key == "driver" and s.commands for s in steps)
        why = " to load its new driver" if driver else ": the host reports that one is pending"
        if not options.allow_reboot:
            report.fail(f"`{node.name}` needs a reboot{why}",
                        "run `stack apply --allow-reboot` (hosts reboot one at a time).")
        elif stopped_by:
            report.fail(f"`{node.name}` needs a reboot{why}, which was not started because "
                        f"`{stopped_by}` did not come back from its own",
                        f"bring `{stopped_by}` back, then run `stack apply --allow-reboot`.")
        elif _reboot(node, spec, stack_dir, report, _driver_requests(spec, node), progress):
            probe(node)  # what is running now (the reboot stopped what apply started)
            if report.error is None:
                _restart_agent(spec, node, report)
        else:
            stopped_by = node.name


def _driver_requests(spec: StackSpec, node: _Node) -> list[DriverRequest]:
    from stack.config import node_settings

    user = node.facts.user or None
    return [DriverRequest(node.name, vendor, d.mode, d.version, user)
            for vendor, d in sorted(node_settings(spec, node.name).drivers.items())]


class Interrupt:
    """Ctrl-C while apply changes hosts: the first stops apply once the steps in progress
    are done on every host (no step is left half done, no command keeps running on a host
    after apply exits), the second stops it at once. `check()` raises KeyboardInterrupt
    once one was asked for; apply calls it between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one: at once
        os.write(2, b"interrupted: stopping once the steps in progress are done "
                    b"(Ctrl-C again stops at once)\n")

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def _stop_between_operations(state: Any, interrupt: Interrupt) -> None:
    """Make pyinfra check `interrupt` before each operation (after the previous one has
    finished on every host)."""
    from pyinfra.api.state import BaseStateCallback

    class Check(BaseStateCallback):
        def operation_start(self, state: Any, op_hash: Any) -> None:  # type: ignore[override]
            interrupt.check()

    state.add_callback_handler(Check())


def unmanageable(name: str, facts: NodeFacts) -> tuple[str, str] | None:
    """(reason, hint) when apply cannot work on this host: unreachable, or not POSIX."""
    if facts.os == "windows":
        return (f"`{name}` runs Windows, which pyinfra 3 cannot manage",
                "remove it from the stack, or serve from a Linux VM (or WSL with an SSH "
                "server) on it.")
    if not facts.reachable or facts.error:
        return facts.error or f"`{name}` is unreachable", facts.hint or ""
    if facts.os not in ("linux", "darwin"):
        return (f"`{name}` runs {facts.os}, which modelstack does not manage",
                "use a Linux or macOS host.")
    return None


def apply_fleet(
    spec: StackSpec, stack_dir: Path, plan_for: Callable[[Observed], Plan],
    options: ApplyOptions, confirm: Callable[[Observed, Desired], bool],
    progress: Callable[[str], None],
) -> ApplyResult:
    """Lock, read the fleet, converge it, unlock. `plan_for(observed)` gives the plan to
    apply (a fresh one, or a saved one checked against the facts)."""
    from stack.observe import connect, disconnect, read_node

    info = locks.new_lock()
    locks.acquire_local(stack_dir, info)
    result = ApplyResult(lock_id=info.id)
    nodes: list[_Node] = []
    connected = None
    try:
        connected = connect(spec, stack_dir)
        facts: dict[str, NodeFacts] = {}

        def read(name: str) -> None:
            assert connected is not None
            facts[name] = read_node(spec, connected, name)

        gevent.joinall([gevent.spawn(read, n) for n in connected.nodes])
        observed = Observed(nodes={n: facts[n] for n in connected.nodes})
        for name, node_facts in observed.nodes.items():
            report = result.hosts.setdefault(name, HostReport(name))
            problem = unmanageable(name, node_facts)
            if problem is not None:
                report.fail(*problem)
                continue
            nodes.append(_Node(name, connected.nodes[name], node_prefix(spec, name), node_facts))
        plan = plan_for(observed)
        desired = _desired(spec, stack_dir, plan)
        if not confirm(observed, desired):
            raise ApplyError("apply cancelled; nothing was changed", hint="")

        def probe(node: _Node) -> None:
            try:
                extra = [make(spec, node.prefix, manager).unit_path
                         for make in (agent_service, router_service)
                         for manager in ("supervise", "systemd", "launchd")]
                # one sidecar per uploaded file (a folder model has one per file in it)
                want = desired.assignments.get(node.name, Assignment(node=node.name))
                models = [f"{m.dest}.sha256" for m in _model_uploads(want, stack_dir)]
                _host_probe(node, info, [*extra, f"{node.prefix}/{MANIFEST}"], models)
            except StackError as err:
                result.hosts[node.name].fail(err.message, err.hint)

        gevent.joinall([gevent.spawn(probe, n) for n in nodes])
        keep_unknown(desired, plan, nodes)
        live = probed = [n for n in nodes if result.hosts[n.name].error is None]
        targets, runtime_keys, model_keys = _targets(spec, stack_dir, live, desired,
                                                      result.hosts)
        with Interrupt() as interrupt:
            _stop_between_operations(connected.state, interrupt)
            plans = run_deploys(connected.state, live, targets, runtime_keys, model_keys,
                                result.hosts)
            interrupt.check()
            _reboots(spec, stack_dir, live, plans, result, options, probe, progress,
                     interrupt.check)
        live = [n for n in live if result.hosts[n.name].error is None]
        rollout(live, desired, result.hosts, options, progress)
        result.router_changed = update_routers(spec, live, desired, result.hosts)
        finish_assignments(live, desired, result.hosts, options, progress)
        remove_unused_runtimes(spec, live, desired, result.hosts)
        write_manifests(plan, probed, result.hosts)
        return result
    finally:
        if nodes:
            _release_host_locks(nodes, info.id)
        if connected is not None:
            disconnect(connected)
        locks.release_local(stack_dir, info.id)
