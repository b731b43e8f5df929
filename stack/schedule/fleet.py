"""The fleet while placing: nodes grouped into classes, lazy heaps, free memory and ports."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from stack.bundle_target import agent_problem
from stack.estimate.types import Claim, Evaluation
from stack.nodes import node_settings
from stack.placement import RAY_BACKENDS as RAY_BACKENDS  # the schedulers import it here
from stack.placement import gib, port_span

if TYPE_CHECKING:
    from stack.selector import Selector
    from stack.snapshot import GpuFacts, NodeFacts, Observed
    from stack.spec import ModelSpec, NodeSpec, StackSpec

GiB = 1024**3
TP_SIZES = (1, 2, 4, 8)
MAX_NODES_PER_REPLICA = 16
# a heap entry: (load, or -load for binpack; the node's rank in name order; the node's
# version when pushed): flat numbers, which compare faster than names
Entry = tuple[float, int, int]
# backends that may run on the CPU only (cpu_inference) and over RPC workers
CPU_BACKENDS = ("llama.cpp",)
# backends that may also run a replica on one node's CPU alone (no layer split, no RPC)
CPU_SINGLE_BACKENDS = ("stable-diffusion.cpp", "vox-box")


def gpu_wired_limit(ram_bytes: int) -> int:
    """What macOS lets the GPU of an Apple silicon Mac wire of its unified memory by
    default (Metal's `recommendedMaxWorkingSetSize`, which llama.cpp logs): two thirds of
    the RAM up to 32 GiB, three quarters above (16 GiB: 10.7 GiB; 192 GiB: 144 GiB).
    `sudo sysctl iogpu.wired_limit_mb=N` raises it; set `reserved_vram` to say less."""
    return ram_bytes * 2 // 3 if ram_bytes <= 32 * GiB else ram_bytes * 3 // 4


def free_bucket(free: int) -> int:
    """The binpack bucket of a node whose largest free GPU has `free` bytes: the largest
    value of its bucket (buckets hold values alike in their 4 leading bits, 1/8 to 1/16
    apart), so a node of a bucket below what a part needs per GPU cannot take it."""
    if free <= 0:
        return 0
    shift = max(free.bit_length() - 4, 0)
    return (((free >> shift) + 1) << shift) - 1


def cc_key(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(p) for p in value.split("."))
    except ValueError:
        return None


def gpu_selected(model: ModelSpec, gpu: GpuFacts) -> str | None:
    """Why `gpu` does not match the model's GPU selector, or None when it does."""
    sel = model.gpu
    if sel.vendor and gpu.vendor not in sel.vendor:
        return f"vendor {gpu.vendor} is not one of {', '.join(sel.vendor)}"
    if sel.name and not fnmatchcase(gpu.name.lower(), sel.name.lower()):
        return f"{gpu.name or 'GPU'} does not match `{sel.name}`"
    if sel.min_memory is not None and gpu.memory_bytes < sel.min_memory:
        return f"{gpu.name or 'GPU'} has {gib(gpu.memory_bytes)}, needs {gib(sel.min_memory)}"
    if sel.min_compute_capability is not None:
        have, want = cc_key(gpu.compute_capability), cc_key(sel.min_compute_capability)
        if have is None or (want is not None and have < want):
            return (f"{gpu.name or 'GPU'} has compute capability "
                    f"{gpu.compute_capability or 'unknown'}, needs {sel.min_compute_capability}")
    return None


@dataclass
class NodeState:
    """One reachable node while placing: what is still free on it."""

    name: str
    facts: NodeFacts
    settings: NodeSpec
    labels: dict[str, str]
    gpus: dict[int, GpuFacts]
    free: dict[int, int]  # GPU index -> free bytes
    total_vram: int
    ram_free: int
    ram_total: int
    disk_free: int
    ports_taken: set[int]  # given to our replicas in this pass
    ports_reported: dict[int, str]  # in use on the node per its facts -> instance id
    port_cursor: int = 0  # no free port below this one
    models: dict[str, int] = field(default_factory=dict)  # model -> parts placed here
    files_here: set[str] = field(default_factory=set)  # models whose files are present
    cls: int = 0
    rank: int = 0  # index in the fleet's nodes, which are in name order
    version: int = 0
    unified: bool = False  # the GPU's memory is the RAM (Apple): one pool, taken by both
    free0: dict[int, int] = field(default_factory=dict)  # `free` before this pass placed any

    def __post_init__(self) -> None:
        self.free0 = dict(self.free)

    def load(self) -> float:
        """Fraction of the node taken (VRAM on GPU nodes, RAM otherwise)."""
        if self.total_vram:
            return 1.0 - sum(self.free.values()) / self.total_vram
        return 1.0 - self.ram_free / self.ram_total if self.ram_total else 1.0


@dataclass(frozen=True)
class Pool:
    """GPUs of one node class that a (model, backend) may use together."""

    vendor: str
    indices: tuple[int, ...]
    memory: int  # total memory of one GPU (of the largest, when mixed)
    mixed: bool = False  # unlike GPUs of one vendor, only for a split by layers


@dataclass(frozen=True)
class Eligibility:
    """What a (model, backend) may use on a node class, or why nothing."""

    pools: tuple[Pool, ...]
    cpu: bool
    reason: str | None


@dataclass(frozen=True)
class Need:
    """One part of a replica to place on one node: k GPUs of a pool (or CPU)."""

    gpus: int
    vram: int  # per GPU (the most any takes, when split by layers)
    ram: int
    disk: int
    vram_by_gpu: tuple[int, ...] = ()  # split by layers: per GPU, in the part's GPU order
    layers: tuple[int, ...] = ()  # split by layers: per GPU, or one entry for the CPU
    cpu_layers: int = 0  # partial offload: layers the main keeps on its CPU (in `ram`)
    context: int = 0  # when the claim is for less than the model's default context


# one part of a replica as placed: node, GPU pool (None: CPU), GPUs, what it takes, port
Part = tuple[NodeState, Pool | None, tuple[int, ...], Need, int | None]


@dataclass
class ModelState:
    """A model while placing: its spec, evaluation and caches."""

    name: str
    spec: ModelSpec
    evaluation: Evaluation
    policy: str
    backends: tuple[str, ...]
    runtimes: dict[str, tuple[str, str | None] | str]
    selector: Selector
    claims: dict[tuple[str, int, int, int], Claim | str] = field(default_factory=dict)
    # layouts that found no nodes, per search mode (spread apart, shorter context)
    failed: dict[tuple[bool, bool], set[tuple[str, int, int, int]]] = field(
        default_factory=dict)
    nodes_used: set[str] = field(default_factory=set)  # nodes running a replica of it
    reasons: tuple[str, ...] | None = None

    def claim(self, backend: str, gpus: int, memory: int, nodes: int) -> Claim | str:
        """The claim of a layout. llama.cpp's is asked without the GPU's memory: it is the
        claim of every layer on the GPUs, and the scheduler decides how many fit."""
        if backend in CPU_BACKENDS:
            memory = 0
        key = (backend, gpus, memory, nodes)
        if key not in self.claims:
            self.claims[key] = self.evaluation.claim(
                backend, gpus, memory if memory else None, nodes)
        return self.claims[key]


class Fleet:
    """The nodes while placing, grouped into classes, with per-class lazy heaps."""

    def __init__(self, spec: StackSpec, observed: Observed) -> None:
        self.spec = spec
        self.port_lo, self.port_hi = spec.stack.port_range
        self.nodes: dict[str, NodeState] = {}
        self.ranked: list[NodeState] = []  # the nodes in name order: heap entries' ranks
        self.excluded: dict[str, str] = {}  # node -> why no model goes there
        self.class_members: list[list[str]] = []
        # per class: one heap for spread; for binpack one heap per bucket of the nodes'
        # largest free GPU (`free_bucket`), so a search skips the nodes too full to take a
        # part (binpack's most loaded first would otherwise meet them on every search)
        self.spread: list[list[Entry]] = []
        self.binpack: list[dict[int, list[Entry]]] = []
        self.max_gpus = max((len(f.gpus) for f in observed.nodes.values()), default=0)
        class_index: dict[tuple[Any, ...], int] = {}
        for name in sorted(observed.nodes):
            facts = observed.nodes[name]
            if not facts.reachable:
                self.excluded[name] = (
                    f"unreachable: {facts.error or 'the node did not answer'}")
                continue
            if facts.os not in ("linux", "darwin"):
                # pyinfra 3 manages POSIX hosts only; say so instead of "too little RAM"
                self.excluded[name] = (
                    f"runs {facts.os}, which pyinfra 3 cannot manage (no model is placed "
                    "there)")
                continue
            problem = agent_problem(facts)
            if problem is not None:
                self.excluded[name] = f"no agent can be installed: {problem}"
                continue
            node = self._node(name, facts)
            key = self._class_key(node)
            if key not in class_index:
                class_index[key] = len(self.class_members)
                self.class_members.append([])
                self.spread.append([])
                self.binpack.append({})
            node.cls = class_index[key]
            self.class_members[node.cls].append(name)
            self.nodes[name] = node
            node.rank = len(self.ranked)
            self.ranked.append(node)
        for node in self.nodes.values():
            self._push(node)

    def _node(self, name: str, facts: NodeFacts) -> NodeState:
        settings = node_settings(self.spec, name)
        host = self.spec.hosts.get(name)
        labels = {**facts.labels, **(host.labels if host else {}), **settings.labels}
        ours_on_gpu: set[int] = set()
        ports: dict[int, str] = {}
        files: set[str] = set()
        for inst in facts.agent.instances:
            ours_on_gpu.update(inst.gpus)
            # the ports after its own that it listens on are its too, so it keeps them
            for port in range(inst.port, inst.port + port_span(inst.backend, inst.role)):
                ports[port] = inst.id
            files.add(inst.model)
        for port in facts.ports_in_use:
            ports.setdefault(port, "")
        gpus = {g.index: g for g in facts.gpus}
        unified = any(g.unified_memory for g in facts.gpus)
        ram = max(0, facts.memory_bytes - settings.reserved_ram)
        free: dict[int, int] = {}
        for g in facts.gpus:
            # memory in use on a GPU none of our instances runs on belongs to someone else;
            # on our GPUs our own claims stand for the usage (stable from plan to plan)
            external = 0 if g.index in ours_on_gpu else g.memory_used_bytes
            usable = min(g.memory_bytes, gpu_wired_limit(g.memory_bytes)) if unified \
                else g.memory_bytes
            free[g.index] = max(0, usable - settings.reserved_vram - external)
            if unified:
                free[g.index] = min(free[g.index], ram)
        return NodeState(name=name, facts=facts, settings=settings, labels=labels, gpus=gpus,
                     free=free, total_vram=sum(free.values()) if unified else
                     sum(g.memory_bytes for g in facts.gpus),
                     ram_free=ram, ram_total=ram, disk_free=facts.disk_free_bytes,
                     ports_taken=set(), ports_reported=ports, files_here=files, unified=unified)

    @staticmethod
    def _class_key(node: NodeState) -> tuple[Any, ...]:
        gpus = tuple((g.vendor, g.name, g.memory_bytes, g.compute_capability)
                     for _, g in sorted(node.gpus.items()))
        s = node.settings
        return (tuple(sorted(node.labels.items())), node.facts.os, node.facts.arch, gpus,
                s.cpu_inference, s.reserved_vram, s.reserved_ram)

    def _push(self, node: NodeState) -> None:
        load = round(node.load(), 9)
        heapq.heappush(self.spread[node.cls], (load, node.rank, node.version))
        bucket = free_bucket(max(node.free.values(), default=0))
        heapq.heappush(self.binpack[node.cls].setdefault(bucket, []),
                       (-load, node.rank, node.version))

    def take(self, node: NodeState, model: str, gpus: Iterable[int], need: Need, port: int) -> None:
        """Claim resources on `node` for one part of a replica."""
        taken = 0
        for k, i in enumerate(gpus):
            vram = need.vram_by_gpu[k] if need.vram_by_gpu else need.vram
            node.free[i] -= vram
            taken += vram
        node.ram_free -= need.ram
        if node.unified:  # one pool: what the GPU takes is RAM, and RAM taken is the GPU's
            node.ram_free -= taken
            for i in node.free:
                node.free[i] = min(node.free[i], max(node.ram_free, 0))
        if model not in node.files_here:
            node.disk_free -= need.disk
            node.files_here.add(model)
        node.ports_taken.add(port)
        node.models[model] = node.models.get(model, 0) + 1
        node.version += 1
        self._push(node)

    def free_port(self, node: NodeState, owner: str = "", wanted: int | None = None,
                  span: int = 1) -> int | None:
        """`wanted` when it is free or already `owner`'s, else the lowest free port.

        Ports reported in use by any instance (ours to be removed, or not ours) stay
        untouched, so a replacement can start before the old instance stops.
        """
        def free(port: int, mine: bool) -> bool:
            return all(self.port_lo <= q <= self.port_hi and q not in node.ports_taken
                       and node.ports_reported.get(q, owner if mine else None) in
                       ((owner,) if mine else (None,))
                       for q in range(port, port + span))

        if wanted is not None and free(wanted, True):
            return wanted
        # ports are only ever taken while placing, so the lowest free one only moves up
        start = max(self.port_lo, node.port_cursor)
        for port in range(start, self.port_hi - span + 2):
            if free(port, False):
                if span == 1:
                    node.port_cursor = port
                return port
        return None

    def candidates(self, classes: Iterable[int], policy: str,
                   accept: Callable[[NodeState], bool],
                   least: Mapping[int, int] | None = None) -> list[NodeState]:
        """Nodes of `classes` in policy order, stopping at the first one `accept` takes.

        `least` (binpack): per class, free bytes a node's largest free GPU needs for
        `accept` to take it at all; the buckets of nodes with less are not looked at (the
        order of the others is the same). Returns the nodes looked at, in order (the
        accepted one last, if any). Popped heap entries are pushed back, so the heaps stay
        intact.
        """
        if policy == "spread":
            heaps = [self.spread[c] for c in classes]
        else:
            heaps = [h for c in classes for bucket, h in self.binpack[c].items()
                     if h and (least is None or bucket >= least.get(c, 0))]
        frontier = [(h[0], i) for i, h in enumerate(heaps) if h]
        heapq.heapify(frontier)
        seen: list[NodeState] = []
        popped: list[tuple[int, Entry]] = []
        try:
            while frontier:
                _, i = heapq.heappop(frontier)
                entry = heapq.heappop(heaps[i])
                if heaps[i]:
                    heapq.heappush(frontier, (heaps[i][0], i))
                node = self.ranked[entry[1]]
                if entry[2] != node.version:
                    continue  # stale: the node changed since this entry was pushed
                popped.append((i, entry))
                seen.append(node)
                if accept(node):
                    break
        finally:
            for i, entry in popped:
                heapq.heappush(heaps[i], entry)
        return seen
