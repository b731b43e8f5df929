"""Placing a replica that runs nowhere yet: layouts tried in order, one node, several
nodes, split by layers."""

from __future__ import annotations

from typing import Any

from stack.estimate.types import Claim
from stack.placement import (
    Placement,
)
from stack.schedule.fleet import (
    CPU_BACKENDS,
    MAX_NODES_PER_REPLICA,
    TP_SIZES,
    Eligibility,
    ModelState,
    Need,
    NodeState,
    Pool,
)
from stack.schedule.layers import same_split, split_layers
from stack.schedule.sticky import StickyScheduler


class FreshScheduler(StickyScheduler):
    """Places replicas that run nowhere yet."""

    def layouts(self, m: ModelState) -> list[int]:
        want = m.spec.gpus_per_replica
        if m.spec.pin and m.spec.pin.gpus:
            return [len(m.spec.pin.gpus)]
        return [want] if isinstance(want, int) else list(TP_SIZES)

    def place_fresh(self, m: ModelState, replica: int) -> Placement | None:
        """Place a replica that has no (valid) previous placement."""
        for backend in m.backends:
            if isinstance(m.runtimes[backend], str):
                continue
            classes = [c for c in range(len(self.fleet.class_members))
                       if self._class_usable(m, backend, c)]
            if not classes:
                continue
            for gpus in [*self.layouts(m), 0]:
                placed = self._place_single(m, replica, backend, classes, gpus)
                if placed:
                    return placed
            if m.spec.distributed and not m.spec.pin:
                placed = self._place_distributed(m, replica, backend, classes)
                if placed:
                    return placed
        return None

    def _class_usable(self, m: ModelState, backend: str, cls: int) -> bool:
        if m.spec.pin and self.fleet.nodes.get(m.spec.pin.node) is None:
            return False
        if m.spec.pin and self.fleet.nodes[m.spec.pin.node].cls != cls:
            return False
        el = self.eligibility(m, backend, cls)
        return bool(el.pools or el.cpu)

    def _place_single(self, m: ModelState, replica: int, backend: str, classes: list[int],
                      gpus: int) -> Placement | None:
        layout = (backend, gpus, 1, 0)
        if layout in m.failed_layouts:
            return None
        policy = m.policy
        pin = m.spec.pin
        found: list[tuple[NodeState, tuple[Pool | None, tuple[int, ...], Need]]] = []

        def accept(node: NodeState) -> bool:
            if pin and node.name != pin.node:
                return False
            got = self._try_pinned(m, backend, node) if pin and pin.gpus else \
                self.try_node(m, backend, node, gpus, 1, policy)
            if got is None:
                return False
            found.append((node, got))
            # spread: a node without this model wins; one with it is only a fallback
            return policy != "spread" or pin is not None or not node.models.get(m.name)

        if pin:
            node = self.fleet.nodes.get(pin.node)
            if node is not None:
                accept(node)
        else:
            key = (m.name, backend, gpus, 1)
            if key not in self.usable:
                self.usable[key] = [c for c in classes
                                    if self._layout_possible(m, backend, c, gpus)]
            self.fleet.candidates(self.usable[key], policy, accept)
        if not found:
            m.failed_layouts.add(layout)
            return None
        if policy == "spread":
            # fewest replicas of this model first; ties keep policy order
            found.sort(key=lambda f: f[0].models.get(m.name, 0))
        node, (pool, chosen, need) = found[0]
        return self.place(m, replica, backend, [(node, pool, chosen, need, None)])

    def _layout_possible(self, m: ModelState, backend: str, cls: int, gpus: int) -> bool:
        """Whether an empty node of class `cls` could hold `gpus` GPUs' worth of the model."""
        el = self.eligibility(m, backend, cls)
        if gpus == 0:
            return el.cpu
        node = self.fleet.nodes[self.fleet.class_members[cls][0]]
        reserved = node.settings.reserved_vram
        for pool in el.pools:
            if len(pool.indices) < gpus or (pool.mixed and gpus < 2):
                continue
            claim = self.split_claim(m, backend, gpus, pool.memory, 1)
            if claim is not None:
                empty = sorted((node.gpus[i].memory_bytes - reserved for i in pool.indices),
                               reverse=True)[:gpus]
                if split_layers(claim.layers, claim.layer_bytes, claim.device_bytes, empty):
                    return True
                continue
            need = self.need(m, backend, gpus, pool.memory, 1)
            if not isinstance(need, str) and need.vram <= pool.memory - reserved:
                return True
        return False

    def _try_pinned(self, m: ModelState, backend: str,
                    node: NodeState) -> tuple[Pool | None, tuple[int, ...], Need] | None:
        assert m.spec.pin is not None
        gpus = tuple(sorted(m.spec.pin.gpus))
        pool = next((p for p in self.eligibility(m, backend, node.cls).pools
                     if set(gpus) <= set(p.indices)), None)
        claim = None if pool is None else self.split_claim(m, backend, len(gpus), pool.memory, 1)
        if claim is not None:
            parts = self.split_parts(m, claim, [(node, pool, gpus, None)])
            return None if parts is None else (pool, gpus, parts[0][3])
        got = self._fits_exactly(m, backend, node, gpus, 1)
        return None if got is None else (got[0], gpus, got[1])

    def _place_distributed(self, m: ModelState, replica: int, backend: str,
                           classes: list[int]) -> Placement | None:
        sizes = self.layouts(m) + ([0] if backend in CPU_BACKENDS else [])
        for nodes in range(2, min(MAX_NODES_PER_REPLICA, len(self.fleet.nodes)) + 1):
            for gpus in sizes:
                layout = (backend, gpus, nodes, 0)
                if layout in m.failed_layouts:
                    continue
                if not self._split_unknown(m, backend, classes, gpus, nodes):
                    split = self._place_split(m, replica, backend, classes, gpus, nodes)
                    if split is None:
                        m.failed_layouts.add(layout)
                        continue
                    return split
                chosen: list[tuple[NodeState, tuple[Pool | None, tuple[int, ...], Need]]] = []

                def accept(node: NodeState, gpus: int = gpus, nodes: int = nodes,
                           chosen: list[Any] = chosen) -> bool:
                    got = self.try_node(m, backend, node, gpus, nodes, m.policy)
                    if got is not None and (not chosen or got[2] == chosen[0][1][2]):
                        chosen.append((node, got))
                    return len(chosen) == nodes

                self.fleet.candidates(classes, m.policy, accept)
                if len(chosen) < nodes:
                    m.failed_layouts.add(layout)
                    continue
                return self.place(m, replica, backend,
                                  [(n, p, g, need, None) for n, (p, g, need) in chosen])
        return None

    def _place_split(self, m: ModelState, replica: int, backend: str, classes: list[int],
                     gpus: int, nodes: int) -> Placement | None:
        """A replica over `nodes` nodes split by layers (llama.cpp: the main and its RPC
        workers): the first nodes in policy order whose devices hold a layer or more each,
        sharing the layers by free memory; None when no such set holds it."""
        probe: list[Claim] = []
        chosen: list[tuple[NodeState, Pool | None, tuple[int, ...], int | None]] = []

        def accept(node: NodeState) -> bool:
            el = self.eligibility(m, backend, node.cls)
            got = self._split_part(m, backend, node, el, gpus, nodes)
            if got is not None and (not probe or same_split(got[0], probe[0])):
                probe.append(got[0])
                chosen.append((node, got[1], got[2], None))
            return len(chosen) == nodes

        self.fleet.candidates(classes, m.policy, accept)
        if len(chosen) < nodes:
            return None
        parts = self.split_parts(m, probe[0], chosen)
        return None if parts is None else self.place(m, replica, backend, parts)

    def _split_part(self, m: ModelState, backend: str, node: NodeState, el: Eligibility, gpus: int,
                    nodes: int) -> tuple[Claim, Pool | None, tuple[int, ...]] | None:
        """The claim, pool and GPUs one node would add to a split replica, or None."""
        if gpus == 0:
            claim = self.split_claim(m, backend, 0, 0, nodes) if el.cpu else None
            if claim is None or node.ram_free < claim.device_bytes + claim.layer_bytes:
                return None
            return claim, None, ()
        for pool in el.pools:
            if len(pool.indices) < gpus or (pool.mixed and gpus < 2):
                continue
            claim = self.split_claim(m, backend, gpus, pool.memory, nodes)
            sets = self.split_gpus(node, pool, claim, gpus, "spread") if claim else []
            if claim is not None and sets:
                return claim, pool, sets[0]
        return None

    def _split_unknown(self, m: ModelState, backend: str, classes: list[int], gpus: int,
                       nodes: int) -> bool:
        """Whether this layout is not split by layers on any class (so the even way
        decides), as opposed to split but with no node able to take a part."""
        for cls in classes:
            el = self.eligibility(m, backend, cls)
            if gpus == 0 and el.cpu and self.split_claim(m, backend, 0, 0, nodes):
                return False
            if gpus and any(self.split_claim(m, backend, gpus, p.memory, nodes)
                            for p in el.pools if len(p.indices) >= gpus):
                return False
        return True
