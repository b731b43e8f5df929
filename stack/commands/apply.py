"""Converge the fleet on stack.toml: install what is missing, run the placed instances,
point the router at them. With a saved PLAN (`stack plan --out PLAN`), apply exactly that
plan, refusing it when stack.toml or the fleet changed since it was made.

On a terminal the plan is shown and apply asks for `yes`; elsewhere (CI) it needs
`--auto-approve` or a saved PLAN. Hosts that fail are named with the reason, the others
converge, and the exit code is 1. Running it again finishes an interrupted apply.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from stack import hostkeys
from stack.apply import ApplyOptions, ApplyResult, Desired, apply_fleet
from stack.errors import ConfigError
from stack.pipeline import make_plan, unschedulable_error
from stack.plan import Plan
from stack.secrets import warn_tracked_secret
from stack.snapshot import Observed

HELP = "converge the fleet on stack.toml (or on a saved plan)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", nargs="?", metavar="PLAN",
                        help="a plan saved by `stack plan --out PLAN`")
    parser.add_argument("--auto-approve", action="store_true",
                        help="apply without asking (needed without a terminal)")
    parser.add_argument("--allow-reboot", action="store_true",
                        help="reboot hosts whose new driver needs it, one at a time")
    parser.add_argument("--max-unavailable", type=int, default=1, metavar="N",
                        help="replicas replaced at the same time (default 1)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="how long new instances may take to become ready (default 900)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--allow-unschedulable", action="store_true",
                        help="exit 0 although some replicas cannot be placed")
    hostkeys.add_trust_flag(parser)


def load_saved_plan(path: Path) -> Plan:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"the plan file `{path}` does not exist",
                          hint="make one with `stack plan --out PLAN`.") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the plan file `{path}` is not JSON: {exc}",
                          hint="make it again with `stack plan --out PLAN`.") from exc
    return Plan.from_json(data, where=str(path))


def check_not_stale(saved: Plan, stack_bytes: bytes, observed: Observed, path: Path) -> None:
    """Refuse a saved plan made from another stack.toml or another state of the fleet."""
    from stack.plan import facts_sha256, sha256_bytes

    if saved.stack_sha256 != sha256_bytes(stack_bytes):
        raise ConfigError(f"the plan `{path}` was made from another version of stack.toml",
                          hint="make a new plan: `stack plan --out PLAN`, then apply it.")
    if saved.facts_sha256 != facts_sha256(observed):
        raise ConfigError(f"the fleet changed since the plan `{path}` was made",
                          hint="make a new plan: `stack plan --out PLAN`, then apply it.")


def render_changes(plan: Plan) -> str:
    """The plan as `stack plan` prints it."""
    import io

    from stack.render import print_plan

    out = io.StringIO()
    print_plan(plan, out)
    return out.getvalue().rstrip("\n")


def print_result(console: Console, result: ApplyResult) -> None:
    for name, report in sorted(result.hosts.items()):
        if report.error:
            console.print(f"[red]✗[/red] {name}: {report.error}", highlight=False)
            if report.hint:
                console.print(f"  hint: {report.hint}", highlight=False)
        elif report.changed:
            console.print(f"[green]✓[/green] {name}: {', '.join(report.changed)}",
                          highlight=False)
        else:
            console.print(f"[green]✓[/green] {name}: no changes", highlight=False)
    if result.router_changed:
        console.print("router: config written and reloaded")
    failed = sum(1 for r in result.hosts.values() if r.error)
    if failed:
        console.print(f"Apply failed on {failed} of {len(result.hosts)} hosts.")
    elif result.changed:
        console.print(f"Apply complete: {len(result.hosts)} hosts converged.")
    else:
        console.print("No changes. The fleet matches stack.toml.")


def run(args: argparse.Namespace) -> int:
    from stack.config import load

    path = Path(args.file)
    spec = load(path)
    stack_dir = path.resolve().parent
    stack_bytes = path.read_bytes()
    console = Console(stderr=args.json)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    plan_path = Path(args.plan) if args.plan else None
    if plan_path is None and not args.auto_approve and not interactive:
        raise ConfigError("`stack apply` asks for confirmation, but there is no terminal",
                          hint="pass `--auto-approve`, or apply a saved plan: "
                               "`stack plan --out PLAN` then `stack apply PLAN`.")
    if args.max_unavailable < 1:
        raise ConfigError(f"`--max-unavailable` must be at least 1, got {args.max_unavailable}",
                          hint="use `--max-unavailable 1` to replace one replica at a time.")
    saved = load_saved_plan(plan_path) if plan_path else None
    warn_tracked_secret(stack_dir)
    shown: dict[str, Plan] = {}

    def plan_for(observed: Observed) -> Plan:
        if saved is not None and plan_path is not None:
            check_not_stale(saved, stack_bytes, observed, plan_path)
            shown["plan"] = saved
        else:
            shown["plan"] = make_plan(spec, stack_bytes, observed, stack_dir)
        return shown["plan"]

    def confirm(observed: Observed, desired: Desired) -> bool:
        plan = shown["plan"]
        if not args.json:
            console.print(render_changes(plan), highlight=False)
        if saved is not None or args.auto_approve or not plan.changes:
            return True
        answer = console.input("Apply these changes? Only `yes` is accepted: ")
        return answer.strip() == "yes"

    options = ApplyOptions(allow_reboot=args.allow_reboot, max_unavailable=args.max_unavailable,
                           ready_timeout=args.ready_timeout,
                           trust_new_hosts=hostkeys.trust_new(args, os.environ))
    result = apply_fleet(spec, stack_dir, plan_for, options, confirm,
                         lambda line: console.print(line, style="dim", highlight=False))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_result(console, result)
    plan = shown.get("plan")
    if plan is not None and plan.unschedulable and not args.allow_unschedulable:
        console.print(unschedulable_error(plan).render(), highlight=False)
        return 1
    return 0 if result.ok else 1
