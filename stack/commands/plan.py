"""Show what `stack apply` would change: placements of every replica, host changes
(drivers, the agent, runtimes), replicas to create, replace or delete, and the router.

Facts come from the hosts over SSH, or from a snapshot with `--facts FILE` (then the
fleet is the snapshot's nodes and stack.toml need not list hosts: CI can plan without
SSH). `--out PLAN` saves the plan for `stack apply PLAN`, which refuses it once stack.toml
or the facts have changed. Examples:

  stack plan
  stack plan --facts facts.json --out plan.json --detailed-exitcode
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from stack import hostkeys
from stack.errors import ConfigError
from stack.pipeline import (
    conflicts_error,
    gather_facts,
    make_plan,
    read_facts,
    unschedulable_error,
)
from stack.secrets import warn_tracked_secret

HELP = "show what apply would change (exit 2 with --detailed-exitcode when it would)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `stack plan`."""
    parser.add_argument("--facts", metavar="F", help="plan against this facts snapshot "
                        "(`stack facts --out F`) instead of reading the hosts over SSH")
    parser.add_argument("--out", metavar="PLAN", help="save the plan as JSON for `stack apply`")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--detailed-exitcode", action="store_true",
                        help="exit 0 when nothing changes, 2 when something does (1: error)")
    parser.add_argument("--allow-unschedulable", action="store_true",
                        help="a replica that cannot be placed is a warning, not exit 1")
    hostkeys.add_trust_flag(parser)


def plan_json(data: dict[str, Any]) -> bytes:
    """The plan as indented JSON: orjson, as `json.dumps(indent=2)` encodes in Python
    (several seconds for a 10,000-node plan) and orjson in C."""
    import orjson

    return orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        path.write_bytes(plan_json(data))
    except OSError as exc:
        raise ConfigError(f"`--out {path}` cannot be written: {exc}",
                          hint="check that its folder exists and is writable.") from exc


def run(args: argparse.Namespace) -> int:
    from stack.config import load
    from stack.render import print_plan

    path = Path(args.file)
    spec = load(path)
    stack_bytes = path.read_bytes()
    stack_dir = path.resolve().parent
    observed = read_facts(Path(args.facts)) if args.facts else gather_facts(
        spec, stack_dir, trust_new=hostkeys.trust_new(args, os.environ))
    result = make_plan(spec, stack_bytes, observed, stack_dir)
    warn_tracked_secret(stack_dir)
    if args.out:
        _write(Path(args.out), result.to_json())
    if args.json:
        print(plan_json(result.to_json()).decode(), end="")
    else:
        print_plan(result, sys.stdout)
        if args.out:
            print(f"\nSaved the plan to {args.out}; `stack apply {args.out}` carries it out.")
    if result.conflicts:
        print(conflicts_error(result).render(), file=sys.stderr)
    if result.unschedulable and not args.allow_unschedulable:
        print(unschedulable_error(result).render(), file=sys.stderr)
        return 1
    if result.conflicts:
        return 1
    if args.detailed_exitcode and result.has_changes():
        return 2
    return 0

