"""Showing a plan the way Terraform does: one block per change, then the summary line.

`render_plan(plan)` is plain text (what CI logs and the golden tests see);
`print_plan(plan, file)` adds colour through rich when `file` is a terminal.
"""

from __future__ import annotations

import sys
from typing import TextIO

from stack.plan import Action, Change, HostProblem, Plan

NO_CHANGES = "No changes. The fleet matches stack.toml."
# how many per-node reasons an unschedulable replica shows before "... and N more"
MAX_REASONS = 10
VERBS = {
    Action.CREATE: "will be created",
    Action.UPDATE: "will be updated in place",
    Action.REPLACE: "must be replaced",
    Action.DELETE: "will be destroyed",
}
STYLES = {Action.CREATE: "green", Action.UPDATE: "yellow", Action.REPLACE: "magenta",
          Action.DELETE: "red"}


def _block(change: Change) -> list[str]:
    lines = [f"  # {change.address} {VERBS[change.action]}"]
    if change.reason:
        lines[0] += f" ({change.reason})"
    if change.disruption != "none":
        lines[0] += f" [{change.disruption}]"
    lines.append(f"{change.action.symbol:>3} {change.address}")
    width = max((len(label) for label, _ in change.details), default=0)
    lines.extend(f"      {label + ':':<{width + 1}} {value}" for label, value in change.details)
    if change.hint:
        lines.append(f"      hint: {change.hint}")
    return lines


def _unschedulable(plan: Plan) -> list[str]:
    if not plan.unschedulable:
        return []
    lines = ["", f"{len(plan.unschedulable)} replica(s) cannot be placed:", ""]
    for u in plan.unschedulable:
        lines.append(f"  ! model.{u.model}.replica[{u.replica}]")
        shown = u.reasons[:MAX_REASONS]
        lines.extend(f"      {reason}" for reason in shown)
        if len(u.reasons) > len(shown):
            lines.append(f"      ... and {len(u.reasons) - len(shown)} more")
        if u.hint:
            lines.append(f"      hint: {u.hint}")
    return lines


def _warnings(plan: Plan) -> list[str]:
    if not plan.warnings:
        return []
    return ["", *(f"  ! warning: {w}" for w in plan.warnings)]


def _left_as_is(problems: tuple[HostProblem, ...], why: str) -> list[str]:
    """The hosts apply leaves as they are (`why` they are), each with its reason."""
    if not problems:
        return []
    n = len({p.node for p in problems})
    lines = ["", f"{n} host(s) {why}; apply leaves {'it' if n == 1 else 'them'} "
             "as is and exits 1:", ""]
    for u in problems:
        # facts errors name their host already (`host `gpu-02` (10.0.0.12:22) is ...`)
        lines.append(f"  ! {u.error}" if f"`{u.node}`" in u.error else f"  ! {u.node}: {u.error}")
        if u.hint:
            lines.append(f"      hint: {u.hint}")
    return lines


def summary_line(plan: Plan) -> str:
    s = plan.summary
    return f"Plan: {s.add} to add, {s.change} to change, {s.destroy} to destroy."


def render_lines(plan: Plan) -> list[tuple[str, Action | None]]:
    """The plan's lines, each with the action that colours it (None: plain)."""
    out: list[tuple[str, Action | None]] = []
    if plan.changes:
        out.append(("stack will perform the following actions:", None))
        for change in plan.changes:
            out.append(("", None))
            out.extend((line, change.action) for line in _block(change))
    out.extend((line, None) for line in _unschedulable(plan))
    out.extend((line, None) for line in _warnings(plan))
    out.extend((line, None) for line in _left_as_is(plan.unreachable, "cannot be reached"))
    out.extend((line, None) for line in _left_as_is(
        plan.conflicts, "hold another stack that collides with this one"))
    if plan.changes:
        out += [("", None), (summary_line(plan), None)]
    elif plan.unschedulable:
        out += [("", None), ("No changes to make, but some replicas cannot be placed.", None)]
    elif plan.unreachable:
        out += [("", None), ("No changes on the reachable hosts, but some hosts cannot be "
                             "reached.", None)]
    elif plan.conflicts:
        out += [("", None), ("No changes on the other hosts, but this stack collides with "
                             "another on some.", None)]
    else:
        out.append((NO_CHANGES, None))
    return out


def render_plan(plan: Plan) -> str:
    """The plan as plain text, ending with the summary line (or the no-changes line)."""
    return "\n".join(line for line, _ in render_lines(plan)) + "\n"


def print_plan(plan: Plan, file: TextIO | None = None) -> None:
    """Print the plan: coloured on a terminal, plain otherwise."""
    out = file or sys.stdout
    if not out.isatty():
        out.write(render_plan(plan))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=out, highlight=False, soft_wrap=True)
    for line, action in render_lines(plan):
        if action is not None and line.lstrip().startswith(action.symbol):
            console.print(Text(line, style=STYLES[action]))
        elif line.startswith("  !"):
            console.print(Text(line, style="bold red"))
        elif line.startswith("Plan:") or line == NO_CHANGES:
            console.print(Text(line, style="bold"))
        else:
            console.print(Text(line))
