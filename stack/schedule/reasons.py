"""Why a replica cannot be placed: one line per node, the most favourable layout it could
offer."""

from __future__ import annotations

from stack.estimate.compat import MULTI_NODE_HINT, multi_node_reason
from stack.placement import (
    gib,
)
from stack.schedule.fleet import (
    ModelState,
    NodeState,
)
from stack.schedule.fresh import FreshScheduler


class ReasonsScheduler(FreshScheduler):
    """Says why a replica fits nowhere."""

    def reasons(self, m: ModelState) -> tuple[str, ...]:
        """Why the model's next replica fits nowhere, per node (computed once per model)."""
        if m.reasons is not None:
            return m.reasons
        self.shorter = m.spec.context is None  # the most a layout could do
        try:
            m.reasons = self._reasons(m)
        finally:
            self.shorter = False
        return m.reasons

    def _reasons(self, m: ModelState) -> tuple[str, ...]:
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
            out.append("no set of nodes can hold it distributed either"
                       + self._multi_node_lacks(m))
        return tuple(out)

    def _multi_node_lacks(self, m: ModelState) -> str:
        """What keeps nodes' GPUs out of a replica over several nodes (MindIE: an NPU
        without a device IP) with what to do, or ''."""
        lacks: list[str] = []
        for name, node in sorted(self.fleet.nodes.items()):
            for backend in m.backends:
                if isinstance(m.runtimes[backend], str):
                    continue
                why = next((w for p in self.eligibility(m, backend, node.cls).pools
                            for i in p.indices if (w := multi_node_reason(backend, node.gpus[i]))),
                           None)
                if why:
                    lacks.append(f"{name}: {why}")
                    break
        if not lacks:
            return ""
        return f" ({'; '.join(lacks)}; hint: {MULTI_NODE_HINT})"

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
                    if isinstance(self.need(m, backend, k, 0, 1), str):
                        last = need  # no such layout (TP does not divide the heads, ...)
                        continue
                    return need  # the most favourable layout there is says what it lacks
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
