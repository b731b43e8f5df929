"""Placing a replica that runs nowhere yet: layouts tried in order, one node, several
nodes, split by layers."""

from __future__ import annotations

from collections.abc import Callable

from stack.estimate.types import Claim
from stack.placement import (
    Placement,
)
from stack.schedule.fleet import (
    CPU_BACKENDS,
    CPU_SINGLE_BACKENDS,
    MAX_NODES_PER_REPLICA,
    RAY_BACKENDS,
    TP_SIZES,
    Eligibility,
    ModelState,
    Need,
    NodeState,
    Part,
    Pool,
)
from stack.schedule.layers import offload_devices, same_split, split_layers
from stack.schedule.sticky import StickyScheduler

# binpack compares this many nodes that fit (in its order, most loaded first)
BINPACK_LOOK = 8
# one placement tier: (model, replica, backend, usable node classes) -> a placement or None
Tier = Callable[["ModelState", int, str, list[int]], "Placement | None"]


def _opened(parts: list[Part]) -> int:
    """GPUs the parts would take that hold nothing yet."""
    return sum(1 for node, _, gpus, _, _ in parts for i in gpus if node.free[i] == node.free0[i])


def _left(parts: list[Part]) -> int:
    """Free memory left on the GPUs the parts take."""
    return sum(node.free[i] - (need.vram_by_gpu[k] if need.vram_by_gpu else need.vram)
               for node, _, gpus, need, _ in parts for k, i in enumerate(gpus))


class FreshScheduler(StickyScheduler):
    """Places replicas that run nowhere yet.

    The layouts of a backend are tried best first, so the first that fits is the best
    (docs/placement.md): every layer on accelerators (one node with 1, 2, ... GPUs, then
    several nodes), then a partial offload (layers the GPUs cannot hold on the main
    node's CPU; one node, then several), then the CPU alone (one node, then RPC workers).
    Within a layout the policy picks the nodes.
    """

    def layouts(self, m: ModelState, backend: str = "") -> list[int]:
        """GPUs per node to try, fewest first: llama.cpp splits by layers, so any count
        up to the largest node's; tensor parallelism powers of two."""
        want = m.spec.gpus_per_replica
        if m.spec.pin and m.spec.pin.gpus:
            return [len(m.spec.pin.gpus)]
        if isinstance(want, int):
            return [want]
        if backend in CPU_BACKENDS:
            return list(range(1, max(self.fleet.max_gpus, 1) + 1))
        return list(TP_SIZES)

    def place_fresh(self, m: ModelState, replica: int) -> Placement | None:
        """Place a replica that has no (valid) previous placement. The tiers come first:
        every layer on accelerators, then a partial offload, then the CPU. Within a tier,
        `spread` first looks for a layout on nodes that run no replica of the model yet (so
        one node failing does not take the model down), only then shares a node with one;
        a model without `context` gets a shorter one only when no layout holds its
        default context."""
        aparts = (True, False) if (m.policy == "spread" and m.nodes_used
                                   and not m.spec.pin) else (False,)
        shorters = (False, True) if m.spec.context is None else (False,)
        tiers = (self._place_on_accelerators, self._place_partial, self._place_on_cpu)
        try:
            for self.shorter in shorters:
                for tier in tiers:
                    for self.apart in aparts:
                        placed = self._search(m, replica, tier)
                        if placed:
                            return placed
        finally:
            self.apart = self.shorter = False
        return None

    def _search(self, m: ModelState, replica: int, tier: Tier) -> Placement | None:
        for backend in m.backends:
            if isinstance(m.runtimes[backend], str):
                continue
            classes = self.searched.get((m.name, backend))
            if classes is None:  # the same for every replica, tier and search mode
                classes = self.searched[(m.name, backend)] = [
                    c for c in range(len(self.fleet.class_members))
                    if self._class_usable(m, backend, c)]
            if classes:
                placed = tier(m, replica, backend, classes)
                if placed:
                    return placed
        return None

    def _place_on_accelerators(self, m: ModelState, replica: int, backend: str,
                               classes: list[int]) -> Placement | None:
        for gpus in self.layouts(m, backend):
            placed = self._place_single(m, replica, backend, classes, gpus)
            if placed:
                return placed
        return self._place_distributed(m, replica, backend, classes, self.layouts(m))

    def _place_partial(self, m: ModelState, replica: int, backend: str,
                       classes: list[int]) -> Placement | None:
        """Some layers on the GPUs of one node (then of several), the rest on the main
        node's CPU: the fewest nodes, then the most layers on GPUs, then the fewest GPUs."""
        if backend not in CPU_BACKENDS or self.partial_claim(m, backend, 1) is None:
            return None
        gpu_classes = [c for c in classes if self.eligibility(m, backend, c).pools]

        def attempt(node: NodeState) -> list[Part] | None:
            got = self._offload_part(m, backend, node)
            if got is None:
                return None
            claim, pool, gpus = got
            return self.split_parts(m, claim, [(node, pool, gpus, None)],
                                    partial=True)

        placed = self._place_one_node(m, replica, backend, gpu_classes,
                                      (backend, 0, 1, 1), attempt)
        if placed or not m.spec.distributed or m.spec.pin:
            return placed
        for nodes in range(2, min(MAX_NODES_PER_REPLICA, len(self.fleet.nodes)) + 1):
            placed = self._place_partial_split(m, replica, backend, gpu_classes, nodes)
            if placed:
                return placed
        return None

    def _offload_part(self, m: ModelState, backend: str, node: NodeState
                      ) -> tuple[Claim, Pool, tuple[int, ...]] | None:
        """The GPUs of `node` a partial offload takes: the pinned ones, else the fewest of
        the emptiest that hold as many layers as any could (alike GPUs first)."""
        pin = m.spec.pin
        claim = self.partial_claim(m, backend, 1)
        if claim is None:
            return None
        for pool in self.eligibility(m, backend, node.cls).pools:
            if pin and pin.gpus:
                if not set(pin.gpus) <= set(pool.indices):
                    continue
                return claim, pool, tuple(sorted(pin.gpus))
            least = claim.device_bytes + claim.layer_bytes
            ok = sorted((i for i in pool.indices if node.free[i] >= least),
                        key=lambda i: (-node.free[i], i))
            if not ok or (pool.mixed and len(ok) < 2):
                continue
            k = offload_devices([node.free[i] for i in ok], claim)
            return claim, pool, tuple(sorted(ok[:k]))
        return None

    def _place_partial_split(self, m: ModelState, replica: int, backend: str,
                             classes: list[int], nodes: int) -> Placement | None:
        """A partial offload over the GPUs of `nodes` nodes (the main and RPC workers), the
        first in policy order; the layers they cannot hold stay on the main's CPU."""
        layout = (backend, 0, nodes, 1)
        if layout in self.failed(m):
            return None
        chosen: list[tuple[NodeState, Pool | None, tuple[int, ...], int | None]] = []

        def accept(node: NodeState) -> bool:
            got = self._offload_part(m, backend, node)
            if got is not None:
                chosen.append((node, got[1], got[2], None))
            return len(chosen) == nodes

        self.candidates(m, classes, accept)
        claim = self.partial_claim(m, backend, nodes)
        parts = None if len(chosen) < nodes or claim is None else \
            self.split_parts(m, claim, chosen, partial=True)
        if parts is None:
            self.failed(m).add(layout)
            return None
        return self.place(m, replica, backend, parts)

    def _place_on_cpu(self, m: ModelState, replica: int, backend: str,
                      classes: list[int]) -> Placement | None:
        if backend in CPU_SINGLE_BACKENDS:
            return self._place_single(m, replica, backend, classes, 0)
        if backend not in CPU_BACKENDS:
            return None
        return self._place_single(m, replica, backend, classes, 0) or \
            self._place_distributed(m, replica, backend, classes, [0])

    def _class_usable(self, m: ModelState, backend: str, cls: int) -> bool:
        if m.spec.pin and self.fleet.nodes.get(m.spec.pin.node) is None:
            return False
        if m.spec.pin and self.fleet.nodes[m.spec.pin.node].cls != cls:
            return False
        el = self.eligibility(m, backend, cls)
        return bool(el.pools or el.cpu)

    def _place_single(self, m: ModelState, replica: int, backend: str, classes: list[int],
                      gpus: int) -> Placement | None:
        pin = m.spec.pin

        def attempt(node: NodeState) -> list[Part] | None:
            got = self._try_pinned(m, backend, node) if pin and pin.gpus else \
                self.try_node(m, backend, node, gpus, 1, m.policy)
            return None if got is None else [(node, got[0], got[1], got[2], None)]

        return self._place_one_node(m, replica, backend, classes, (backend, gpus, 1, 0),
                                    attempt)

    def _place_one_node(self, m: ModelState, replica: int, backend: str, classes: list[int],
                        layout: tuple[str, int, int, int],
                        attempt: Callable[[NodeState], list[Part] | None]) -> Placement | None:
        """The first node in policy order where `attempt` fits the replica (spread: one
        without this model first; binpack: of the first BINPACK_LOOK that fit, the one
        opening the fewest empty GPUs, then into used GPUs the tightest fit, into empty ones
        the largest)."""
        if layout in self.failed(m):
            return None
        policy = m.policy
        pin = m.spec.pin
        gpus = layout[1]
        found: list[tuple[NodeState, list[Part]]] = []

        def accept(node: NodeState) -> bool:
            if pin and node.name != pin.node:
                return False
            got = attempt(node)
            if got is None:
                return False
            found.append((node, got))
            if policy == "binpack":
                return len(found) >= BINPACK_LOOK or not _opened(got)
            # spread: a node without this model wins; one with it is only a fallback
            return pin is not None or not node.models.get(m.name)

        if pin:
            node = self.fleet.nodes.get(pin.node)
            if node is not None:
                accept(node)
        elif layout[3]:  # partial offload: the caller chose the classes
            self.candidates(m, classes, accept)
        else:
            key = (m.name, backend, gpus, 2 if self.shorter else 1)
            if key not in self.usable:
                self.usable[key] = [c for c in classes
                                    if self._layout_possible(m, backend, c, gpus)]
            least = None
            if policy == "binpack" and gpus:
                if key not in self.least:
                    self.least[key] = {c: self._least_free(m, backend, c, gpus)
                                       for c in self.usable[key]}
                least = self.least[key]
            self.candidates(m, self.usable[key], accept, least)
        if not found:
            self.failed(m).add(layout)
            return None
        if policy == "spread":
            # fewest replicas of this model first; ties keep policy order
            found.sort(key=lambda f: f[0].models.get(m.name, 0))
        else:  # best fit in used GPUs; a new GPU: the largest, room for what comes next
            found.sort(key=lambda f: (_opened(f[1]), _left(f[1]) * (-1 if _opened(f[1]) else 1)))
        return self.place(m, replica, backend, found[0][1])

    def _least_free(self, m: ModelState, backend: str, cls: int, gpus: int) -> int:
        """The fewest free bytes a GPU of a node of class `cls` needs for `try_node` to
        fit a part with `gpus` GPUs on it (per pool: the claim's per-GPU memory, or one
        layer and the per-device overhead when split by layers; no pool: more than any)."""
        least: int | None = None
        for pool in self.eligibility(m, backend, cls).pools:
            if len(pool.indices) < gpus or (pool.mixed and gpus < 2):
                continue
            claim = self.split_claim(m, backend, gpus, pool.memory, 1)
            if claim is not None:
                want = claim.device_bytes + claim.layer_bytes
            else:
                need = self.need(m, backend, gpus, pool.memory, 1)
                if isinstance(need, str):
                    continue
                want = need.vram
            least = want if least is None else min(least, want)
        return (1 << 80) if least is None else least

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
                           classes: list[int], sizes: list[int]) -> Placement | None:
        if not m.spec.distributed or m.spec.pin:
            return None
        for nodes in range(2, min(MAX_NODES_PER_REPLICA, len(self.fleet.nodes)) + 1):
            for gpus in sizes:
                layout = (backend, gpus, nodes, 0)
                if layout in self.failed(m):
                    continue
                if not self._split_unknown(m, backend, classes, gpus, nodes):
                    split = self._place_split(m, replica, backend, classes, gpus, nodes)
                    if split is None:
                        self.failed(m).add(layout)
                        continue
                    return split
                placed = self._place_even(m, replica, backend, classes, gpus, nodes)
                if placed is None:
                    self.failed(m).add(layout)
                    continue
                return placed
        return None

    def _place_even(self, m: ModelState, replica: int, backend: str, classes: list[int],
                    gpus: int, nodes: int) -> Placement | None:
        """`nodes` nodes in policy order, each taking the same part with `gpus` GPUs; for
        vLLM and SGLang all of one GPU vendor (a Ray cluster's stages cannot mix CUDA and
        ROCm; llama.cpp's RPC can)."""
        groups: dict[tuple[str, Need], list[Part]] = {}
        done: list[list[Part]] = []

        def accept(node: NodeState) -> bool:
            got = self.try_node(m, backend, node, gpus, nodes, m.policy)
            if got is None:
                return False
            vendor = got[0].vendor if got[0] and backend in RAY_BACKENDS else ""
            group = groups.setdefault((vendor, got[2]), [])
            group.append((node, got[0], got[1], got[2], None))
            if len(group) == nodes:
                done.append(group)
            return bool(done)

        self.candidates(m, classes, accept)
        return self.place(m, replica, backend, done[0]) if done else None

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

        self.candidates(m, classes, accept)
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
