"""The one pipeline every command runs: load -> observe -> evaluate -> schedule -> assign
-> plan. `stack plan`, `stack apply`, monitoring, the benchmarks and the tests call
`make_plan` (or its stages), so the plan a user reviews is the plan apply carries out.

Each arrow is a value: `StackSpec`, `Observed`, evaluations (with the models whose
metadata is wrong or unknown right now), `Placements`, assignments, `Plan`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from stack.errors import ConfigError, MetadataUnavailable, Problem, StackError
from stack.estimate.types import Evaluation
from stack.gcpause import gc_paused
from stack.plan import Plan
from stack.snapshot import Observed
from stack.spec import StackSpec


def agent_version(spec: StackSpec | None = None) -> str:
    """The agent version every host should run: the bundle apply would install (with the
    extras the stack's models need, `stack.wheelhouse.agent_extras`)."""
    from stack.wheelhouse import agent_extras, bundle_version

    return bundle_version(extras=agent_extras(spec) if spec is not None else ())


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
        with gc_paused():
            return Observed.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"`--facts {path}`: `{where}` {first['msg'].lower()}",
                          hint="the snapshot format is in docs/facts.md; re-write it with "
                          "`stack facts --out FILE`.") from exc


def gather_facts(spec: StackSpec, stack_dir: Path, *, trust_new: bool = False) -> Observed:
    """The fleet's facts over SSH (`trust_new`: learn host keys never seen before)."""
    from stack.observe import gather

    return gather(spec, stack_dir, trust_new=trust_new)


@dataclass(frozen=True)
class Evaluations:
    """Every model's evaluation, or why it has none: `failed` (its source is wrong) or
    `unknown` (its metadata cannot be read right now; running replicas are kept)."""

    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    failed: dict[str, Problem] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)


def evaluate_models(spec: StackSpec, stack_dir: Path) -> Evaluations:
    """Read each model's metadata and size it."""
    from stack.estimate import evaluate, read_metadata
    from stack.estimate.read import with_parts

    out = Evaluations()
    for name in sorted(spec.models):
        model = spec.models[name]
        try:
            meta = with_parts(read_metadata(model.source, stack_dir), name,
                              {str(k): v for k, v in model.components.items()}, stack_dir)
            out.evaluations[name] = evaluate(name, model, meta)
        except MetadataUnavailable as err:
            out.unknown[name] = err.message
        except StackError as err:
            out.failed[name] = err.problem
    return out


def make_plan(spec: StackSpec, stack_bytes: bytes, observed: Observed, stack_dir: Path) -> Plan:
    """Evaluate, schedule, assign and compare: the plan for `spec` on `observed`."""
    from stack.config import check_pins_against

    if spec.stack.inventory:  # inline hosts are checked when stack.toml is loaded
        check_pins_against(spec, list(observed.nodes), stack_bytes.decode("utf-8", "replace"))
    digests = controller_env_digests(spec, stack_bytes, stack_dir, observed)
    with gc_paused():
        evaluated = evaluate_models(spec, stack_dir)
    return plan_evaluated(spec, stack_bytes, observed, evaluated, stack_dir,
                          agent_version(spec), digests)


def controller_env_digests(spec: StackSpec, stack_bytes: bytes, stack_dir: Path,
                           observed: Observed | None = None) -> dict[str, str]:
    """The digests of the `env` values stack.toml takes from the controller's environment
    (`stack.env`), keyed by the stack secret; a located error when one is not set, and
    an error when the fleet runs instances but this controller has no stack secret (a new
    one would make every such replica look replaced)."""
    from stack.env import env_digests, env_problems, references

    if not references(spec):
        return {}
    problems = env_problems(spec, os.environ, stack_bytes.decode("utf-8", "replace"))
    if problems:
        raise problems[0]
    from stack.secrets import SECRET_ENV, SECRET_FILE, stack_secret

    running = observed is not None and any(n.agent.instances
                                               for n in observed.nodes.values())
    if running and not os.environ.get(SECRET_ENV) and not (stack_dir / SECRET_FILE).exists():
        # a new secret would give other digests than apply's: every replica with a
        # `from_env` value would show as replaced, wrongly
        raise ConfigError(
            "stack.toml takes `env` values from the controller's environment "
            f"(`from_env`), and there is no stack secret (`${SECRET_ENV}` or "
            f"`{SECRET_FILE}`) to compare them with what runs without showing them",
            hint=f"set `{SECRET_ENV}` to the stack secret `stack apply` uses (in CI: the same "
            "repository secret as the apply job).")
    return env_digests(spec, os.environ, stack_secret(stack_dir))


def plan_evaluated(spec: StackSpec, stack_bytes: bytes, observed: Observed,
                   evaluated: Evaluations, stack_dir: Path, agent: str,
                   env_digests: Mapping[str, str] | None = None) -> Plan:
    """The pure rest of the pipeline (schedule -> assign -> plan), for evaluations made
    here or given (the plan tests and the plan benchmark pass their own). `env_digests`:
    of the `from_env` values (`controller_env_digests`)."""
    from stack.assign import build_assignments
    from stack.changes import derive_plan
    from stack.neighbours import conflicts, set_aside
    from stack.schedule import schedule

    with gc_paused():
        refused = conflicts(spec, observed)  # hosts where another stack collides with this one
        usable = set_aside(observed, refused)
        placements = schedule(spec, evaluated.evaluations, usable, failed=evaluated.failed,
                              unknown=evaluated.unknown)
        assignments = build_assignments(spec, placements, usable, stack_dir, secret=None,
                                        digests=env_digests)
        return derive_plan(spec, observed, placements, assignments, stack_bytes, agent,
                           refused)


def unschedulable_error(plan: Plan) -> ConfigError:
    """The error for a plan with replicas that cannot be placed (exit 1)."""
    names = [f"`{u.model}` replica {u.replica}" for u in plan.unschedulable]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ConfigError(
        f"{len(names)} replica(s) cannot be placed: {', '.join(names[:3])}{more} (reasons "
        "above)",
        hint="free or add capacity, fix the model, or pass `--allow-unschedulable` to apply "
             "the rest.")


def conflicts_error(plan: Plan) -> ConfigError:
    """The error for a plan with hosts where another stack collides with this one (exit 1)."""
    nodes = sorted({c.node for c in plan.conflicts})
    more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
    return ConfigError(
        f"{len(nodes)} host(s) hold another stack that collides with this one: "
        f"{', '.join(f'`{n}`' for n in nodes[:3])}{more} (reasons above)",
        hint="give this stack its own `agent_port` and `prefix` on those hosts "
             '(`[nodes."PATTERN"]`), or `stack destroy` the other stack first.')
