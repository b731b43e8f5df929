"""What the plan turns into (`Desired`): each node's assignment and the router config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.assignment import Assignment
from router.config import RouterConfig
from stack.apply.hosts import Node
from stack.plan import Plan
from stack.spec import StackSpec


@dataclass(frozen=True)
class Desired:
    """What the plan turns into: per-node assignments and the router config."""

    assignments: dict[str, Assignment]
    router: RouterConfig | None
    router_nodes: list[str]


def desired_state(spec: StackSpec, stack_dir: Path, plan: Plan) -> Desired:
    """The plan's assignments, and the router config made from them, with the secrets
    filled in (API keys; `env` values from the controller's environment, which must still
    match the plan's digests): exactly what the plan shows, nothing rebuilt."""
    import os

    from stack.assign import build_router_config, with_api_keys
    from stack.env import with_env_values
    from stack.secrets import stack_secret

    secret = stack_secret(stack_dir)
    assignments = with_env_values(with_api_keys(dict(plan.assignments), secret), os.environ,
                                  secret)
    router = build_router_config(spec, plan.placements, assignments)
    return Desired(assignments, router, list(plan.placements.routers))


def keep_unknown(desired: Desired, plan: Plan, nodes: list[Node]) -> None:
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
        desired.assignments[node.name] = want.model_copy(update={"instances": instances})
