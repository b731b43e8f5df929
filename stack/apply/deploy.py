"""The deploys: one pyinfra run of the same steps on every host, in parallel."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from deploys.steps import HostTarget, Step, agent_paths, host_steps, sha256_text
from stack.apply.hosts import Node
from stack.apply.interrupt import Interrupt
from stack.apply.report import HostReport

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State


def run_deploys(
    state: State, nodes: list[Node], targets: dict[str, HostTarget], runtime_keys: list[str],
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
            state.fail_hosts({by_name[n].host for n in skipped})  # type: ignore[no-untyped-call]
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
        _report(state, by_name[name], steps, targets[name], reports[name])
    return plans


def _report(state: State, node: Node, steps: list[Step], target: HostTarget,
            report: HostReport) -> None:
    """What the run did on one host: the steps that changed it, or why it failed."""
    if node.host in state.failed_hosts:
        blocked = next((s.blocked for s in steps if s.blocked), None)
        if blocked:
            report.fail(blocked.reason, blocked.hint)
        else:
            report.fail(f"`{node.name}`: a deploy step failed: {_last_error(state, node.host)}",
                        "fix the cause shown above and run `stack apply` again; "
                        "finished steps are not repeated.")
        return
    report.changed += [s.key for s in steps if s.changes]
    node.deployed = True
    node.written.update(_deployed_files(target))


def _last_error(state: State, host: Host) -> str:
    """The stderr of the operation that failed on `host`, for the report."""
    for op_hash in reversed(state.get_op_order()):  # type: ignore[no-untyped-call]
        meta = state.ops[host].get(op_hash)
        if meta is None:
            continue
        result = meta.operation_meta
        if result.is_complete() and result.did_error():
            lines = (result.stderr or "").strip().splitlines()
            return lines[-1][:300] if lines else "the command failed without output"
    return "see the output above"


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


def stop_between_operations(state: State, interrupt: Interrupt) -> None:
    """Make pyinfra check `interrupt` before each operation (after the previous one has
    finished on every host)."""
    from pyinfra.api.state import BaseStateCallback

    class Check(BaseStateCallback):
        def operation_start(self, state: State, op_hash: str) -> None:  # type: ignore[override]
            interrupt.check()

    state.add_callback_handler(Check())  # type: ignore[no-untyped-call]
