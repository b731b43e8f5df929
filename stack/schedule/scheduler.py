"""The placing pass: sticky replicas first, then the rest, with a reason for each that
cannot be placed. The scheduler is layered: `base` <- `sticky` <- `fresh` <- `reasons`
<- this module's `Scheduler` (the pass itself)."""

from __future__ import annotations

from collections.abc import Mapping

from stack.errors import Problem
from stack.nodes import router_nodes
from stack.placement import (
    Placement,
    Placements,
    PreviousPlacement,
    Unschedulable,
)
from stack.schedule.reasons import ReasonsScheduler


class Scheduler(ReasonsScheduler):
    """Places every replica of a stack on a fleet (`stack.schedule.schedule`)."""

    def run(self, previous: Mapping[tuple[str, int], PreviousPlacement],
            failed: Mapping[str, Problem], unknown: Mapping[str, str],
            kinds: Mapping[tuple[str, int], str]) -> Placements:
        placed: dict[tuple[str, int], Placement] = {}
        kept: dict[tuple[str, int], Placement] = {}
        for key in sorted(previous):  # first: their resources are not known, only held
            spec = self.spec.models.get(key[0])
            if key[0] in unknown and spec is not None and key[1] < spec.replicas:
                kept[key] = self.keep(previous[key], kinds.get(key, spec.kind or "llm"))
        for key in sorted(previous):
            m = self.models.get(key[0])
            if m is None or key[1] >= m.spec.replicas:
                continue
            self.shorter = m.spec.context is None  # it may run with a shortened context
            got = self.sticky(m, previous[key])
            self.shorter = False
            if got:
                placed[key] = got
        unschedulable: list[Unschedulable] = []
        for name in self._fresh_order():
            m = self.models[name]
            for replica in range(m.spec.replicas):
                if (name, replica) in placed:
                    continue
                got = None if m.reasons is not None else self.place_fresh(m, replica)
                if got:
                    placed[(name, replica)] = got
                else:
                    unschedulable.append(Unschedulable(name, replica, self.reasons(m)))
        for name in sorted(self.spec.models):
            if name in self.models:
                continue
            why = (Problem(f"metadata unknown: {unknown[name]}") if name in unknown
                   else failed.get(name, Problem("the model was not evaluated")))
            unschedulable.extend(Unschedulable(name, r, (why.message,), why.hint)
                                 for r in range(self.spec.models[name].replicas)
                                 if (name, r) not in kept)
        unschedulable.sort(key=lambda u: (u.model, u.replica))
        return Placements(tuple(placed[k] for k in sorted(placed)), tuple(unschedulable),
                          self._routers(), tuple(kept[k] for k in sorted(kept)),
                          tuple(sorted(unknown.items())))

    def _fresh_order(self) -> list[str]:
        """Pinned models first, then the largest, then by name: big pieces before small."""
        return sorted(self.models, key=lambda n: (self.models[n].spec.pin is None,
                                                  -self.models[n].evaluation.meta.weights_bytes,
                                                  n))

    def _routers(self) -> tuple[str, ...]:
        return tuple(router_nodes(self.spec, self.observed))
