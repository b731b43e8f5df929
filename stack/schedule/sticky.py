"""Sticky placement: a replica stays where it runs while it still fits there; a replica of
a model whose metadata is unknown is kept where it runs."""

from __future__ import annotations

from stack.estimate.compat import multi_node_reason
from stack.placement import (
    ClaimedResources,
    Placement,
    PreviousPlacement,
    Worker,
)
from stack.schedule.base import SchedulerBase
from stack.schedule.fleet import (
    CPU_BACKENDS,
    RAY_BACKENDS,
    ModelState,
    Need,
    NodeState,
    Part,
    Pool,
)
from stack.schedule.runtimes import choose_runtime


class StickyScheduler(SchedulerBase):
    """Keeps replicas where they run."""

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
        if prev.backend in CPU_BACKENDS and (max(len(prev.gpus), 1) * len(parts) > 1
                                             or prev.split):
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
        if backend in RAY_BACKENDS and len({p[1].vendor for p in fitted if p[1]}) > 1:
            return None  # a vLLM/SGLang replica over CUDA and ROCm nodes cannot run
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
        fitted = None
        if claim is not None:
            fitted = self.split_parts(m, claim, resolved, prev.split)
        elif len(resolved) == 1 and not prev.gpus:
            fitted = self._fit_even(m, prev.backend, [(n, g, p) for n, _, g, p in resolved])
        if fitted is None and prev.gpus:
            fitted = self._sticky_partial(m, prev, resolved)
        return None if fitted is None else self.place(m, prev.replica, prev.backend, fitted)

    def _sticky_partial(self, m: ModelState, prev: PreviousPlacement,
                        resolved: list[tuple[NodeState, Pool | None, tuple[int, ...], int | None]]
                        ) -> list[Part] | None:
        """A partial offload on exactly these GPUs: the layers it runs with while they
        still fit, else as many as the GPUs hold now."""
        claim = self.partial_claim(m, prev.backend, len(resolved))
        if claim is None:
            return None
        low, high = claim.offload_range()
        if prev.split and low <= sum(prev.split) <= high:
            fitted = self.split_parts(m, claim, resolved, prev.split, sum(prev.split))
            if fitted is not None:
                return fitted
        return self.split_parts(m, claim, resolved, partial=True)


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
        if pool is None or (nodes > 1 and any(multi_node_reason(backend, node.gpus[i])
                                              for i in gpus)):
            return None
        need = self.need(m, backend, len(gpus), pool.memory, nodes)
        if isinstance(need, str) or self.fits_host(node, m.name, need):
            return None
        if any(node.free[i] < need.vram for i in gpus):
            return None
        return pool, need

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
