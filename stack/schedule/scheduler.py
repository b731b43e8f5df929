"""The placing pass: sticky replicas first, then the rest, with a reason for each that
cannot be placed."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from stack.errors import Problem
from stack.estimate.types import Claim, Evaluation
from stack.observed import Observed
from stack.placement import (
    ClaimedResources,
    Placement,
    Placements,
    PreviousPlacement,
    Unschedulable,
    Worker,
    gib,
    instance_id,
)
from stack.schedule.fleet import (
    CPU_BACKENDS,
    MAX_NODES_PER_REPLICA,
    RAY_BACKENDS,
    TP_SIZES,
    Eligibility,
    Fleet,
    ModelState,
    Need,
    NodeState,
    Part,
    Pool,
    gpu_selected,
)
from stack.schedule.layers import same_split, split_layers
from stack.schedule.runtimes import choose_runtime
from stack.spec import StackSpec


class Scheduler:
    def __init__(self, spec: StackSpec, evaluations: Mapping[str, Evaluation],
                 observed: Observed) -> None:
        self.spec = spec
        self.fleet = Fleet(spec, observed)
        self.models: dict[str, ModelState] = {}
        self.eligible: dict[tuple[str, str, int], Eligibility] = {}
        self.usable: dict[tuple[str, str, int, int], list[int]] = {}
        from stack.selector import parse_selector

        for name in sorted(evaluations):
            if name not in spec.models:
                continue
            mspec, ev = spec.models[name], evaluations[name]
            backends = (mspec.backend,) if mspec.backend else tuple(ev.backends)
            self.models[name] = ModelState(
                name=name, spec=mspec, evaluation=ev,
                policy=mspec.placement or spec.stack.placement, backends=backends,
                runtimes={b: choose_runtime(spec, b, mspec.backend_version) for b in backends},
                selector=parse_selector(mspec.selector),
            )

    # ---- filters per (model, backend, class)

    def eligibility(self, m: ModelState, backend: str, cls: int) -> Eligibility:
        key = (m.name, backend, cls)
        if key not in self.eligible:
            self.eligible[key] = self._eligibility(m, backend,
                                                   self.fleet.nodes[self.fleet.class_members[cls][0]])
        return self.eligible[key]

    def _eligibility(self, m: ModelState, backend: str, node: NodeState) -> Eligibility:
        runtime = m.runtimes[backend]
        if isinstance(runtime, str):
            return Eligibility((), False, runtime)
        if m.spec.selector and not m.selector.matches(node.labels):
            failing = ", ".join(r.describe() for r in m.selector.failing(node.labels))
            return Eligibility((), False, f"labels do not match `{failing}`")
        groups: dict[tuple[str, str, int], list[int]] = {}
        gpu_reasons: list[str] = []
        for index, gpu in sorted(node.gpus.items()):
            why = gpu_selected(m.spec, gpu)
            if why:
                gpu_reasons.append(why)
                continue
            groups.setdefault((gpu.vendor, gpu.name, gpu.memory_bytes), []).append(index)
        pools: list[Pool] = []
        for (vendor, _, memory), indices in sorted(groups.items()):
            why = m.evaluation.refuse(backend, node.facts, [node.gpus[i] for i in indices])
            if why:
                gpu_reasons.append(why)
            else:
                pools.append(Pool(vendor, tuple(indices), memory))
        if backend in CPU_BACKENDS:
            # llama.cpp splits by layers, so unlike GPUs of one vendor work together
            # (an RTX 4090 beside an L40S); tried after the pools of alike GPUs
            for vendor in sorted({p.vendor for p in pools}):
                same = [p for p in pools if p.vendor == vendor]
                if len(same) > 1:
                    pools.append(Pool(vendor, tuple(sorted(i for p in same for i in p.indices)),
                                       max(p.memory for p in same), mixed=True))
        cpu = False
        cpu_reason = ""
        if (m.spec.gpu.vendor and "cpu" not in m.spec.gpu.vendor) or m.spec.gpu.name \
                or m.spec.gpu.min_memory or m.spec.gpu.min_compute_capability:
            cpu_reason = "the GPU selector rules out the CPU"
        elif backend not in CPU_BACKENDS:
            cpu_reason = f"{backend} does not run on the CPU"
        elif not node.settings.cpu_inference:
            cpu_reason = "CPU inference is off (`cpu_inference = false`)"
        else:
            why = m.evaluation.refuse(backend, node.facts, [])
            cpu, cpu_reason = why is None, why or ""
        if pools or cpu:
            return Eligibility(tuple(pools), cpu, None)
        if not node.gpus:
            return Eligibility((), False, f"no GPU; {cpu_reason}" if cpu_reason else "no GPU")
        return Eligibility((), False, "; ".join(dict.fromkeys(gpu_reasons)) or cpu_reason)

    # ---- one node

    def fit_gpus(self, node: NodeState, pool: Pool, need: Need,
                 policy: str) -> tuple[int, ...] | None:
        """`need.gpus` GPUs of `pool` on `node` with enough free memory, or None."""
        ok = [i for i in pool.indices if node.free[i] >= need.vram]
        if len(ok) < need.gpus:
            return None
        # spread: the emptiest GPUs; binpack: the fullest that still fit (best fit)
        ok.sort(key=lambda i: (-node.free[i] if policy == "spread" else node.free[i], i))
        return tuple(sorted(ok[:need.gpus]))

    def fits_host(self, node: NodeState, model: str, need: Need) -> str | None:
        """Why RAM, disk or ports on `node` cannot take this part, or None."""
        if node.ram_free < need.ram:
            return f"needs {gib(need.ram)} RAM, free {gib(node.ram_free)}"
        if model not in node.files_here and node.disk_free < need.disk:
            return f"needs {gib(need.disk)} disk for the model files, free {gib(node.disk_free)}"
        if self.fleet.free_port(node) is None:
            return f"no free port in {self.fleet.port_lo}-{self.fleet.port_hi}"
        return None

    def need(self, m: ModelState, backend: str, gpus: int, memory: int, nodes: int) -> Need | str:
        claim = m.claim(backend, gpus, memory, nodes)
        if isinstance(claim, str):
            return claim
        disk = claim.disk_bytes or m.evaluation.meta.files_bytes
        return Need(gpus, claim.vram_bytes_per_gpu if gpus else 0, claim.ram_bytes, disk)

    def try_node(self, m: ModelState, backend: str, node: NodeState, gpus: int, nodes: int,
                 policy: str) -> tuple[Pool | None, tuple[int, ...], Need] | None:
        """The first pool of `node` that can take one part with `gpus` GPUs, or None."""
        el = self.eligibility(m, backend, node.cls)
        if gpus == 0:
            if not el.cpu:
                return None
            need = self.need(m, backend, 0, 0, nodes)
            if isinstance(need, str) or self.fits_host(node, m.name, need):
                return None
            return None, (), need
        for pool in el.pools:
            if len(pool.indices) < gpus or (pool.mixed and gpus < 2):
                continue
            claim = self.split_claim(m, backend, gpus, pool.memory, nodes) if nodes == 1 \
                else None
            if claim is not None:
                got = self.fit_split(m, claim, node, pool, gpus, policy)
                if got is not None:
                    return got
                continue
            need = self.need(m, backend, gpus, pool.memory, nodes)
            if isinstance(need, str) or self.fits_host(node, m.name, need):
                continue
            chosen = self.fit_gpus(node, pool, need, policy)
            if chosen is not None:
                return pool, chosen, need
        return None

    # ---- split by layers (llama.cpp over several GPUs or nodes)

    def split_claim(self, m: ModelState, backend: str, gpus: int, memory: int,
                    nodes: int) -> Claim | None:
        """The claim when this layout spreads the model over several devices by whole
        layers (llama.cpp), else None (one device, or an even split such as vLLM's)."""
        if max(gpus, 1) * nodes < 2:
            return None
        claim = m.claim(backend, gpus, memory, nodes)
        if isinstance(claim, str) or claim.layers < 1:
            return None
        return claim

    def split_parts(self, m: ModelState, claim: Claim,
                    parts: list[tuple[NodeState, Pool | None, tuple[int, ...], int | None]],
                    previous: tuple[int, ...] = ()) -> list[Part] | None:
        """Each part with its share of the layers and what that share takes, or None.

        The devices are the parts' GPUs in order (a CPU part is one device: its RAM).
        `previous` (the split the replica runs with) is kept while it still fits, so a
        replica that stays is not restarted for a new split.
        """
        free: list[int] = []
        for node, _, gpus, _ in parts:
            free.extend([node.free[i] for i in gpus] if gpus else [node.ram_free])
        n, per_layer, fixed = claim.layers, claim.layer_bytes, claim.device_bytes
        split: tuple[int, ...] | None = None
        if len(previous) == len(free) and sum(previous) == n and all(
                layers >= 1 and layers * per_layer + fixed <= f
                for layers, f in zip(previous, free, strict=True)):
            split = previous
        else:
            split = split_layers(n, per_layer, fixed, free)
        if split is None:
            return None
        disk = claim.disk_bytes or m.evaluation.meta.files_bytes
        out: list[Part] = []
        k = 0
        for node, pool, gpus, port in parts:
            share = split[k:k + max(len(gpus), 1)]
            k += len(share)
            if gpus:
                vram = tuple(layers * per_layer + fixed for layers in share)
                need = Need(len(gpus), max(vram), claim.ram_bytes, disk, vram, share)
            else:
                need = Need(0, 0, share[0] * per_layer + fixed, disk, (), share)
            if self.fits_host(node, m.name, need):
                return None
            out.append((node, pool, gpus, need, port))
        return out

    def split_gpus(self, node: NodeState, pool: Pool, claim: Claim, k: int,
                   policy: str) -> list[tuple[int, ...]]:
        """Sets of `k` GPUs of `pool` to try for a split, each holding a layer or more:
        spread, the emptiest; binpack, the fullest first, then ever emptier ones."""
        least = claim.device_bytes + claim.layer_bytes
        ok = [i for i in pool.indices if node.free[i] >= least]
        if len(ok) < k:
            return []
        if policy == "spread":
            return [tuple(sorted(sorted(ok, key=lambda i: (-node.free[i], i))[:k]))]
        ok.sort(key=lambda i: (node.free[i], i))
        return [tuple(sorted(ok[s:s + k])) for s in range(len(ok) - k + 1)]

    def fit_split(self, m: ModelState, claim: Claim, node: NodeState, pool: Pool, k: int,
                  policy: str) -> tuple[Pool | None, tuple[int, ...], Need] | None:
        """`k` GPUs of `pool` on `node` that hold the model split by layers, or None."""
        for gpus in self.split_gpus(node, pool, claim, k, policy):
            parts = self.split_parts(m, claim, [(node, pool, gpus, None)])
            if parts is not None:
                return pool, gpus, parts[0][3]
        return None

    # ---- placing

    def place(self, m: ModelState, replica: int, backend: str, parts: list[Part]) -> Placement:
        """Take the parts' resources and ports; the main part first."""
        runtime = m.runtimes[backend]
        assert not isinstance(runtime, str)
        split = tuple(n for part in parts for n in part[3].layers) if parts[0][3].layers else ()
        placed: list[Worker] = []
        claims: list[ClaimedResources] = []
        for k, (node, pool, gpus, need, want) in enumerate(parts):
            owner = instance_id(m.name, replica) + (f"-w{k}" if k else "")
            # a distributed vLLM/SGLang main also runs the Ray head on port + 1 (agent)
            span = 2 if k == 0 and len(parts) > 1 and backend in RAY_BACKENDS else 1
            got = self.fleet.free_port(node, owner, want, span)
            if got is None:
                got = self.fleet.free_port(node, owner, None, 1)
            assert got is not None  # fits_host checked a port is free
            self.fleet.take(node, m.name, gpus, need, got)
            if span == 2:
                node.ports_taken.add(got + 1)
            claims.append(ClaimedResources(need.vram, need.ram, need.vram_by_gpu))
            placed.append(Worker(node.name, gpus, got, pool.vendor if pool else "cpu",
                                 claims[-1] if split else None))
        node, pool, gpus = parts[0][:3]
        memory = 0 if pool is None else pool.memory if not pool.mixed else \
            min(node.gpus[i].memory_bytes for i in gpus)
        return Placement(
            model=m.name, replica=replica, node=node.name, gpus=gpus, backend=backend,
            backend_version=runtime[1], port=placed[0].port, claim=claims[0],
            runtime=runtime[0], vendor=placed[0].vendor, gpu_memory_bytes=memory,
            kind=m.evaluation.kind, context=m.evaluation.context, workers=tuple(placed[1:]),
            split=split if len(split) > 1 else (),
        )

    def sticky(self, m: ModelState, prev: PreviousPlacement) -> Placement | None:
        """The replica where it runs now, if it still fits there."""
        if prev.backend not in m.backends or isinstance(m.runtimes[prev.backend], str):
            return None
        if m.spec.pin and (prev.node != m.spec.pin.node or prev.workers or (
                m.spec.pin.gpus and tuple(sorted(m.spec.pin.gpus)) != tuple(sorted(prev.gpus)))):
            return None
        want = m.spec.gpus_per_replica
        if isinstance(want, int) and want != len(prev.gpus):
            return None
        parts = [(prev.node, prev.gpus, prev.port), *((n, g, p) for _, n, g, p in prev.workers)]
        if len(parts) > 1 and not m.spec.distributed:
            return None
        nodes = [self.fleet.nodes.get(n) for n, _, _ in parts]
        if any(n is None for n in nodes) or len({n for n, _, _ in parts}) != len(parts):
            return None
        if prev.backend in CPU_BACKENDS and max(len(prev.gpus), 1) * len(parts) > 1:
            return self._sticky_split(m, prev, [(n, g, p) for n, (_, g, p)
                                                in zip(nodes, parts, strict=True)])
        fitted = self._fit_even(m, prev.backend, [(n, g, p) for n, (_, g, p)
                                                  in zip(nodes, parts, strict=True)])
        return None if fitted is None else self.place(m, prev.replica, prev.backend, fitted)

    def _fit_even(self, m: ModelState, backend: str,
                  parts: list[tuple[NodeState | None, tuple[int, ...], int | None]]
                  ) -> list[Part] | None:
        """The parts each taking the same claim on exactly these GPUs, or None."""
        fitted: list[Part] = []
        need: Need | None = None
        for node, gpus, port in parts:
            assert node is not None
            got = self._fits_exactly(m, backend, node, gpus, len(parts))
            if got is None or (need is not None and got[1] != need):
                return None
            need = got[1]
            fitted.append((node, got[0], gpus, need, port))
        return fitted

    def _sticky_split(self, m: ModelState, prev: PreviousPlacement,
                      parts: list[tuple[NodeState | None, tuple[int, ...], int]]
                      ) -> Placement | None:
        """A llama.cpp replica over several devices where it runs, split by layers (its
        reported split while that still fits), or None."""
        resolved: list[tuple[NodeState, Pool | None, tuple[int, ...], int | None]] = []
        for node, gpus, port in parts:
            assert node is not None
            el = self.eligibility(m, prev.backend, node.cls)
            pool = next((p for p in el.pools if set(gpus) <= set(p.indices)), None)
            if (pool is None) if gpus else not el.cpu:
                return None
            resolved.append((node, pool, gpus, port))
        main_pool = resolved[0][1]
        claim = self.split_claim(m, prev.backend, len(prev.gpus),
                                 main_pool.memory if main_pool else 0, len(parts))
        if claim is None:  # partial offload: the even claim on every part
            fitted = self._fit_even(m, prev.backend, [(n, g, p) for n, _, g, p in resolved])
        else:
            fitted = self.split_parts(m, claim, resolved, prev.split)
        return None if fitted is None else self.place(m, prev.replica, prev.backend, fitted)

    def _fits_exactly(self, m: ModelState, backend: str, node: NodeState, gpus: tuple[int, ...],
                      nodes: int) -> tuple[Pool | None, Need] | None:
        el = self.eligibility(m, backend, node.cls)
        if not gpus:
            if not el.cpu:
                return None
            need = self.need(m, backend, 0, 0, nodes)
            if isinstance(need, str) or self.fits_host(node, m.name, need):
                return None
            return None, need
        pool = next((p for p in el.pools if set(gpus) <= set(p.indices)), None)
        if pool is None:
            return None
        need = self.need(m, backend, len(gpus), pool.memory, nodes)
        if isinstance(need, str) or self.fits_host(node, m.name, need):
            return None
        if any(node.free[i] < need.vram for i in gpus):
            return None
        return pool, need

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

    # ---- reasons

    def reasons(self, m: ModelState) -> tuple[str, ...]:
        """Why the model's next replica fits nowhere, per node (computed once per model)."""
        if m.reasons is not None:
            return m.reasons
        out: list[str] = []
        multi = len(m.backends) > 1
        for name in sorted({*self.fleet.nodes, *self.fleet.excluded}):
            if name in self.fleet.excluded:
                out.append(f"{name}: {self.fleet.excluded[name]}")
                continue
            if m.spec.pin and name != m.spec.pin.node:
                continue
            why = [self._node_reason(m, b, self.fleet.nodes[name]) for b in m.backends]
            text = "; ".join(f"{b}: {w}" if multi else w
                             for b, w in zip(m.backends, why, strict=True))
            out.append(f"{name}: {text}")
        if m.spec.pin and m.spec.pin.node not in self.fleet.nodes \
                and m.spec.pin.node not in self.fleet.excluded:
            out.append(f"{m.spec.pin.node}: the pinned node is not in the fleet")
        if not self.fleet.nodes and not self.fleet.excluded:
            out.append("the fleet has no nodes")
        if m.spec.distributed:
            out.append("no set of nodes can hold it distributed either")
        m.reasons = tuple(out)
        return m.reasons

    def _node_reason(self, m: ModelState, backend: str, node: NodeState) -> str:
        runtime = m.runtimes[backend]
        if isinstance(runtime, str):
            return runtime
        el = self.eligibility(m, backend, node.cls)
        if el.reason:
            return el.reason
        if m.spec.pin and m.spec.pin.gpus:
            pinned = sorted(m.spec.pin.gpus)
            missing = [i for i in pinned if i not in node.gpus]
            if missing:
                return f"has no GPU {', '.join(map(str, missing))}"
            pool = next((p for p in el.pools if set(pinned) <= set(p.indices)), None)
            if pool is None:
                return f"GPUs {', '.join(map(str, pinned))} are not usable together"
            need = self.need(m, backend, len(pinned), pool.memory, 1)
            if isinstance(need, str):
                return need
            least = min(node.free[i] for i in pinned)
            return self.fits_host(node, m.name, need) or (
                f"needs {gib(need.vram)} per GPU on pinned GPUs "
                f"{', '.join(map(str, pinned))}, least free {gib(least)}")
        last = "no layout fits"
        for pool in sorted(el.pools, key=lambda p: -len(p.indices)):
            sizes = [k for k in self.layouts(m) if k <= len(pool.indices)]
            if not sizes:
                return f"needs {self.layouts(m)[0]} GPUs, has {len(pool.indices)}"
            for k in reversed(sizes):  # the most favourable layout first
                claim = self.split_claim(m, backend, k, pool.memory, 1)
                if claim is not None:
                    return self.fits_host(node, m.name, self._split_host_need(m, claim)) or \
                        self._split_reason(claim, node, pool, k)
                need = self.need(m, backend, k, pool.memory, 1)
                if isinstance(need, str):
                    last = need
                    continue
                host = self.fits_host(node, m.name, need)
                if host:
                    return host
                free = sorted((node.free[i] for i in pool.indices), reverse=True)
                if k == 1:
                    return f"needs {gib(need.vram)} per GPU, largest free {gib(free[0])}"
                have = sum(1 for f in free if f >= need.vram)
                return (f"needs {k} GPUs with {gib(need.vram)} free each, {have} have it "
                        f"(largest free {gib(free[0])})")
        if el.cpu:
            need = self.need(m, backend, 0, 0, 1)
            if isinstance(need, str):
                return need
            return self.fits_host(node, m.name, need) or last
        return last

    @staticmethod
    def _split_host_need(m: ModelState, claim: Claim) -> Need:
        return Need(claim.gpus, 0, claim.ram_bytes,
                     claim.disk_bytes or m.evaluation.meta.files_bytes)

    @staticmethod
    def _split_reason(claim: Claim, node: NodeState, pool: Pool, k: int) -> str:
        free = sorted((node.free[i] for i in pool.indices), reverse=True)[:k]
        room = sum(max(0, f - claim.device_bytes) // claim.layer_bytes if claim.layer_bytes
                   else claim.layers for f in free)
        return (f"needs {claim.layers} layers of {gib(claim.layer_bytes)} + "
                f"{gib(claim.device_bytes)} per GPU over {k} GPUs, the {k} with the most free "
                f"memory hold {min(room, claim.layers)} (largest free {gib(free[0])})")

    # ---- the whole pass

    def keep(self, prev: PreviousPlacement, kind: str) -> Placement:
        """A replica of a model whose metadata is unknown, where it runs: its GPUs and
        ports stay taken (what it needs is unknown, so no other replica goes there)."""
        parts = [(prev.node, prev.gpus, prev.port),
                 *((n, g, port) for _, n, g, port in prev.workers)]
        vendors: list[str] = []
        for name, gpus, port in parts:
            node = self.fleet.nodes.get(name)
            vendors.append(node.gpus[gpus[0]].vendor if node and gpus and gpus[0] in node.gpus
                           else "cpu")
            if node is None:
                continue
            held = [g for g in gpus if g in node.free]
            self.fleet.take(node, prev.model, held,
                            Need(len(held), 0, 0, 0, tuple(node.free[g] for g in held)), port)
        runtime = choose_runtime(self.spec, prev.backend, prev.backend_version)
        return Placement(
            model=prev.model, replica=prev.replica, node=prev.node, gpus=prev.gpus,
            backend=prev.backend, backend_version=prev.backend_version, port=prev.port,
            claim=ClaimedResources(0, 0), runtime="" if isinstance(runtime, str) else runtime[0],
            vendor=vendors[0], kind=kind,
            workers=tuple(Worker(n, g, port, vendors[k])
                          for k, (n, g, port) in enumerate(parts[1:], start=1)),
            split=prev.split)

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
            got = self.sticky(m, previous[key])
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
        names = sorted({*self.fleet.nodes, *self.fleet.excluded})
        globs = self.spec.router.hosts
        if not globs:
            return tuple(names)
        return tuple(n for n in names if any(fnmatchcase(n, g) for g in globs))
