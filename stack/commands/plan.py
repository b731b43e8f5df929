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
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stack.config import check_pins_against
from stack.errors import ConfigError, StackError
from stack.estimate.types import Evaluation
from stack.observed import Observed
from stack.plan import Plan
from stack.spec import StackSpec

HELP = "show what apply would change (exit 2 with --detailed-exitcode when it would)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `stack plan`."""
    parser.add_argument("--facts", metavar="F", help="plan against this facts snapshot "
                        "(`stack facts --out F`) instead of reading the hosts over SSH")
    parser.add_argument("--out", metavar="PLAN", help="save the plan as JSON for `stack apply`")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--detailed-exitcode", action="store_true",
                        help="exit 0 when nothing changes, 2 when something does (1: error)")


def agent_version() -> str:
    """The agent version every host should run: the bundle apply would install."""
    from stack.wheelhouse import bundle_version

    return bundle_version()


def read_facts(path: Path) -> Observed:
    """A facts snapshot file; ConfigError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"`--facts {path}` does not exist",
                          hint="write one with `stack facts --out FILE`.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"`--facts {path}` is not a JSON facts snapshot: {exc}",
                          hint="write one with `stack facts --out FILE`.") from exc
    try:
        return Observed.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"`--facts {path}`: `{where}` {first['msg'].lower()}",
                          hint="the snapshot format is in DESIGN.md; re-write it with "
                          "`stack facts --out FILE`.") from exc


def gather_facts(spec: StackSpec, stack_dir: Path) -> Observed:
    """The fleet's facts over SSH (the provisioning module)."""
    try:
        from stack.observe import gather
    except ImportError as exc:
        raise StackError("gathering facts over SSH is not available yet",
                         hint="pass a snapshot with `stack plan --facts FILE`.") from exc
    return gather(spec, stack_dir)


def evaluate_models(spec: StackSpec,
                    stack_dir: Path) -> tuple[dict[str, Evaluation], dict[str, str]]:
    """Each model's evaluation, or the reason it has none (it becomes unschedulable)."""
    from stack.estimate import evaluate, read_metadata

    evaluations: dict[str, Evaluation] = {}
    failed: dict[str, str] = {}
    for name in sorted(spec.models):
        model = spec.models[name]
        try:
            meta = read_metadata(model.source, stack_dir)
            # ModelEvaluation is frozen; the protocol declares plain attributes
            evaluations[name] = evaluate(name, model, meta)
        except StackError as err:
            failed[name] = err.message + (f" (hint: {err.hint})" if err.hint else "")
    return evaluations, failed


def make_plan(spec: StackSpec, stack_bytes: bytes, observed: Observed, stack_dir: Path) -> Plan:
    """Evaluate, schedule and compare: the plan for `spec` on `observed`."""
    from stack.assign import build_assignments
    from stack.plan import plan
    from stack.schedule import schedule

    if spec.stack.inventory:  # inline hosts are checked when stack.toml is loaded
        check_pins_against(spec, list(observed.nodes))
    evaluations, failed = evaluate_models(spec, stack_dir)
    placements = schedule(spec, evaluations, observed, failed=failed)
    assignments = build_assignments(spec, placements, observed, stack_dir, secret=None)
    return plan(spec, observed, placements, assignments, stack_bytes, agent_version())


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
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
    observed = read_facts(Path(args.facts)) if args.facts else gather_facts(spec, stack_dir)
    result = make_plan(spec, stack_bytes, observed, stack_dir)
    if args.out:
        _write(Path(args.out), result.to_json())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, sys.stdout)
        if args.out:
            print(f"\nSaved the plan to {args.out}; `stack apply {args.out}` carries it out.")
    if args.detailed_exitcode and result.has_changes():
        return 2
    return 0
