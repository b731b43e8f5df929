"""The scheduler's core: filters per (model, backend, class), fitting one node, splits by
layers, and taking a placement's resources."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from stack.catalog import default_version
from stack.estimate.compat import multi_node_reason
from stack.estimate.types import Claim, Evaluation
from stack.placement import (
    ClaimedResources,
    Placement,
    Worker,
    gib,
    instance_id,
    port_span,
)
from stack.schedule.fleet import (
    CPU_BACKENDS,
    CPU_SINGLE_BACKENDS,
    Eligibility,
    Fleet,
    ModelState,
    Need,
    NodeState,
    Part,
    Pool,
    gpu_selected,
)
from stack.schedule.layers import offload_layers, split_layers
from stack.schedule.runtimes import choose_runtime, runtime_refusal

if TYPE_CHECKING:
    from stack.snapshot import Observed
    from stack.spec import StackSpec


class SchedulerBase:
    """What every way of placing builds on."""

    def __init__(self, spec: StackSpec, evaluations: Mapping[str, Evaluation],
                 observed: Observed) -> None:
        self.spec = spec
        self.observed = observed
        self.fleet = Fleet(spec, observed)
        self.models: dict[str, ModelState] = {}
        self.eligible: dict[tuple[str, str, int], Eligibility] = {}
        self.usable: dict[tuple[str, str, int, int], list[int]] = {}
        self.least: dict[tuple[str, str, int, int], dict[int, int]] = {}  # binpack: per class
        self.searched: dict[tuple[str, str], list[int]] = {}  # (model, backend) -> classes
        self.apart = False  # while set, nodes that run the model already are not candidates
        self.shorter = False  # while set, claims may shorten the context to fit (vLLM, ...)
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
            why = m.evaluation.refuse(backend, node.facts, [node.gpus[i] for i in indices]) \
                or runtime_refusal(self.spec, runtime, vendor)
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
        elif backend not in CPU_BACKENDS and backend not in CPU_SINGLE_BACKENDS:
            cpu_reason = f"{backend} does not run on the CPU"
        elif not node.settings.cpu_inference:
            cpu_reason = "CPU inference is off (`cpu_inference = false`)"
        else:
            why = m.evaluation.refuse(backend, node.facts, []) \
                or runtime_refusal(self.spec, runtime, "cpu")
            cpu, cpu_reason = why is None, why or ""
        if pools or cpu:
            return Eligibility(tuple(pools), cpu, None)
        if not node.gpus:
            return Eligibility((), False, f"no GPU; {cpu_reason}" if cpu_reason else "no GPU")
        return Eligibility((), False, "; ".join(dict.fromkeys(gpu_reasons)) or cpu_reason)

    # ---- candidates

    def candidates(self, m: ModelState, classes: list[int],
                   accept: Callable[[NodeState], bool],
                   least: Mapping[int, int] | None = None) -> None:
        """The fleet's nodes of `classes` in the model's policy order until `accept` takes
        one; while `apart`, without the nodes that run a replica of the model. `least`:
        see `Fleet.candidates`."""
        if not self.apart:
            self.fleet.candidates(classes, m.policy, accept, least)
            return
        self.fleet.candidates(classes, m.policy,
                              lambda node: node.name not in m.nodes_used and accept(node),
                              least)

    def failed(self, m: ModelState) -> set[tuple[str, int, int, int]]:
        """Layouts that found no nodes for this model (free memory only shrinks)."""
        return m.failed.setdefault((self.apart, self.shorter), set())

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
        ram = need.ram + (sum(need.vram_by_gpu) or need.vram * need.gpus if node.unified else 0)
        if node.ram_free < ram:
            return f"needs {gib(ram)} RAM" + (" with its GPU share" if ram > need.ram else "") \
                + f", free {gib(node.ram_free)}"
        if model not in node.files_here and node.disk_free < need.disk:
            return f"needs {gib(need.disk)} disk for the model files, free {gib(node.disk_free)}"
        if self.fleet.free_port(node) is None:
            return f"no free port in {self.fleet.port_lo}-{self.fleet.port_hi}"
        return None

    def need(self, m: ModelState, backend: str, gpus: int, memory: int, nodes: int) -> Need | str:
        """What one part of the layout takes with every layer on its devices, or why not."""
        claim = m.claim(backend, gpus, memory, nodes)
        if isinstance(claim, str):
            return claim
        if claim.context and not self.shorter:
            return f"needs a context below {m.evaluation.context} to fit"
        if gpus and claim.offload_range()[1] < claim.layers:
            return f"`-ngl` in `args` keeps {claim.layers - claim.offload_range()[1]} layers " \
                   "on the CPU"
        disk = claim.disk_bytes or m.evaluation.meta.files_bytes
        return Need(gpus, claim.vram_bytes_per_gpu if gpus else 0, claim.ram_bytes, disk,
                    context=claim.context)

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
            if nodes > 1:  # only GPUs that can join a group over nodes (MindIE: device IPs)
                pool = replace(pool, indices=tuple(
                    i for i in pool.indices if not multi_node_reason(backend, node.gpus[i])))
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
        if isinstance(claim, str) or claim.layers < 1 or (
                gpus and claim.offload_range()[1] < claim.layers):
            return None
        return claim

    def partial_claim(self, m: ModelState, backend: str, nodes: int) -> Claim | None:
        """The layout claim when layers may stay on the main's CPU, else None."""
        claim = m.claim(backend, 1, 0, nodes)
        if isinstance(claim, str) or claim.layers < 1 or \
                claim.offload_range()[0] >= claim.layers:
            return None
        return claim

    def split_parts(self, m: ModelState, claim: Claim,
                    parts: list[tuple[NodeState, Pool | None, tuple[int, ...], int | None]],
                    previous: tuple[int, ...] = (), gpu_layers: int | None = None,
                    partial: bool = False) -> list[Part] | None:
        """Each part with its share of the layers and what that share takes, or None.

        The devices are the parts' GPUs in order (a CPU part is one device: its RAM).
        `previous` (the split the replica runs with) is kept while it still fits, so a
        replica that stays is not restarted for a new split. With `gpu_layers` below the
        model's layers (partial offload), the devices share those and the main node keeps
        the rest in its RAM; `partial`: as many as the devices hold (`offload_layers`).
        """
        free: list[int] = []
        for node, _, gpus, _ in parts:
            free.extend([node.free[i] for i in gpus] if gpus else [node.ram_free])
        extra = self._device_extra(claim, parts, len(free))
        free = [f - e for f, e in zip(free, extra, strict=True)]
        n = offload_layers(claim, free) if partial else \
            claim.layers if gpu_layers is None else gpu_layers
        per_layer, fixed = claim.layer_bytes, claim.device_bytes
        on_cpu = claim.layers - n
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
            more = extra[k:k + len(share)]
            k += len(share)
            if gpus:
                vram = tuple(layers * per_layer + fixed + e
                             for layers, e in zip(share, more, strict=True))
                cpu = on_cpu if not out else 0
                ram = claim.ram_bytes + (cpu * per_layer + claim.cpu_bytes if cpu else 0)
                need = Need(len(gpus), max(vram), ram, disk, vram, share, cpu)
            else:
                need = Need(0, 0, share[0] * per_layer + fixed + more[0], disk, (), share)
            if self.fits_host(node, m.name, need):
                return None
            out.append((node, pool, gpus, need, port))
        return out

    @staticmethod
    def _device_extra(claim: Claim, parts: list[tuple[NodeState, Pool | None, tuple[int, ...],
                                                      int | None]], devices: int) -> list[int]:
        """Bytes beyond its layers each device takes: the output head on the last device in
        llama.cpp's order (RPC workers first, then the main's GPUs: the main's last GPU, or
        the last worker's last device when the main runs on its CPU); the token embedding
        on a CPU main."""
        extra = [0] * devices
        main_gpus = parts[0][2]
        extra[len(main_gpus) - 1 if main_gpus else devices - 1] += claim.output_bytes
        if not main_gpus:
            extra[0] += claim.main_bytes
        return extra

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
        cpu_layers = parts[0][3].cpu_layers
        placed: list[Worker] = []
        claims: list[ClaimedResources] = []
        for k, (node, pool, gpus, need, want) in enumerate(parts):
            m.nodes_used.add(node.name)
            owner = instance_id(m.name, replica) + (f"-w{k}" if k else "")
            span = port_span(backend, "single" if len(parts) == 1 else
                             "main" if k == 0 else "worker")
            got = self.fleet.free_port(node, owner, want, span)
            if got is None:
                got = self.fleet.free_port(node, owner, None, 1)
            assert got is not None  # fits_host checked a port is free
            self.fleet.take(node, m.name, gpus, need, got)
            node.ports_taken.update(range(got + 1, got + span))
            claims.append(ClaimedResources(need.vram, need.ram, need.vram_by_gpu))
            placed.append(Worker(node.name, gpus, got, pool.vendor if pool else "cpu",
                                 claims[-1] if split else None))
        node, pool, gpus = parts[0][:3]
        memory = 0 if pool is None else pool.memory if not pool.mixed else \
            min(node.gpus[i].memory_bytes for i in gpus)
        version = runtime[1]
        if version is not None and m.spec.backend_version is None \
                and runtime[0] not in self.spec.runtimes:
            version = default_version(runtime[0], placed[0].vendor) or version
        return Placement(
            model=m.name, replica=replica, node=node.name, gpus=gpus, backend=backend,
            backend_version=version, port=placed[0].port, claim=claims[0],
            runtime=runtime[0], vendor=placed[0].vendor, gpu_memory_bytes=memory,
            kind=m.evaluation.kind, context=parts[0][3].context or m.evaluation.context,
            workers=tuple(placed[1:]),
            split=split if len(split) > 1 or cpu_layers else (), cpu_layers=cpu_layers,
            shortened_from=m.evaluation.context if parts[0][3].context else 0,
        )

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
