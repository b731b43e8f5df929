"""Placing replicas on the fleet: `schedule(spec, evaluations, observed) -> Placements`.

Pure and deterministic: no clock, no randomness, every iteration sorted. Sticky: the
instances the agents report (`observed.nodes[*].agent.instances`) are the previous
placements, and a replica that still fits where it runs keeps its node, GPUs and port.
Only then are the remaining replicas placed, so adding a model moves nothing else.

Why the data structures look the way they do (a 1,000-node fleet plans in well under a
second, see docs/benchmarks/plan.md):
- nodes that look alike to a model (labels, OS, arch, GPU models, node settings) form a
  *class*; selectors, GPU selectors and backend compatibility are decided once per
  (model, backend, class), never per node;
- each class keeps two lazy heaps of its nodes, ordered for `spread` (least loaded first)
  and `binpack` (most loaded first); a placement touches one node and pushes one entry;
- claims are asked of the evaluation once per (model, backend, GPUs, GPU memory, nodes),
  and a layout that failed for one replica is not retried for the next replica of the
  same model (free memory only shrinks while placing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from stack.errors import Problem
from stack.estimate.types import Evaluation
from stack.nodes import node_settings
from stack.placement import (
    ClaimedResources,
    Placement,
    Placements,
    PreviousPlacement,
    Unschedulable,
    Worker,
    gib,
    instance_id,
    previous_placements,
    with_instances,
)
from stack.schedule.runtimes import choose_runtime, version_key
from stack.schedule.scheduler import Scheduler

if TYPE_CHECKING:
    from stack.snapshot import Observed
    from stack.spec import StackSpec

__all__ = [
    "ClaimedResources", "Placement", "Placements", "PreviousPlacement", "Unschedulable",
    "Worker", "choose_runtime", "gib", "instance_id", "node_settings", "previous_placements",
    "schedule", "version_key", "with_instances",
]


def schedule(spec: StackSpec, evaluations: Mapping[str, Evaluation], observed: Observed,
             previous: Mapping[tuple[str, int], PreviousPlacement] | None = None,
             failed: Mapping[str, Problem] | None = None,
             unknown: Mapping[str, str] | None = None) -> Placements:
    """Place every replica of every model in `spec` on the nodes of `observed`.

    `previous` defaults to what the agents report in `observed`. `failed` gives, per model
    without an evaluation, the reason (its source is wrong): its replicas are reported
    unschedulable with that reason instead of failing the whole plan. `unknown` gives, per
    model, why its metadata cannot be read right now (hub unreachable, gated, timeout): its
    running replicas are kept where they are (`Placements.kept`), new ones are
    unschedulable.
    """
    prev = previous_placements(observed) if previous is None else previous
    kinds = {(i.model, i.replica): i.kind for facts in observed.nodes.values()
             for i in facts.agent.instances if i.kind and i.role != "worker"}
    return Scheduler(spec, evaluations, observed).run(prev, failed or {}, unknown or {},
                                                       kinds)
