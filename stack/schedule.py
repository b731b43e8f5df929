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

import heapq
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from stack.errors import Problem
from stack.estimate.types import Claim, Evaluation
from stack.observed import AgentFacts, GpuFacts, InstanceFacts, NodeFacts, Observed
from stack.spec import ModelSpec, NodeSpec, StackSpec

GiB = 1024**3
TP_SIZES = (1, 2, 4, 8)
MAX_NODES_PER_REPLICA = 16
# backends that may run on the CPU only (cpu_inference) and over RPC workers
CPU_BACKENDS = ("llama.cpp",)
# backends whose multi-node mains start a Ray head on the port after their own
RAY_BACKENDS = ("vllm", "sglang")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ClaimedResources:
    """What one part of a replica takes on its node."""

    vram_bytes_per_gpu: int  # the most any of its GPUs takes
    ram_bytes: int
    vram_bytes_by_gpu: tuple[int, ...] = ()  # per GPU (in `gpus` order) when split by layers

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"vram_bytes_per_gpu": self.vram_bytes_per_gpu,
                                "ram_bytes": self.ram_bytes}
        if self.vram_bytes_by_gpu:
            data["vram_bytes_by_gpu"] = list(self.vram_bytes_by_gpu)
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ClaimedResources:
        return ClaimedResources(int(data["vram_bytes_per_gpu"]), int(data["ram_bytes"]),
                                tuple(int(v) for v in data.get("vram_bytes_by_gpu", ())))


@dataclass(frozen=True)
class Worker:
    """A further node of a distributed replica (RPC worker or Ray/pipeline stage)."""

    node: str
    gpus: tuple[int, ...]
    port: int
    vendor: str = "cpu"
    claim: ClaimedResources | None = None  # set when it differs from the main's (layer split)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"node": self.node, "gpus": list(self.gpus), "port": self.port,
                                "vendor": self.vendor}
        if self.claim is not None:
            data["claim"] = self.claim.to_json()
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Worker:
        claim = data.get("claim")
        return Worker(data["node"], tuple(int(g) for g in data["gpus"]), int(data["port"]),
                      data.get("vendor", "cpu"),
                      ClaimedResources.from_json(claim) if claim else None)


@dataclass(frozen=True)
class Placement:
    """One replica placed: where it runs, with what, and what it takes."""

    model: str
    replica: int
    node: str
    gpus: tuple[int, ...]
    backend: str
    backend_version: str | None
    port: int
    claim: ClaimedResources
    runtime: str = ""
    vendor: str = "cpu"
    gpu_memory_bytes: int = 0  # memory of the smallest GPU used (0 on CPU)
    kind: str = "llm"
    context: int | None = None
    workers: tuple[Worker, ...] = ()
    # llama.cpp split by layers: layers per device, the main's GPUs (in `gpus` order, or
    # one entry for its CPU) first, then each worker's the same way; empty: one device
    split: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        """The instance id of the main part: `{model}-{replica}`."""
        return instance_id(self.model, self.replica)

    def worker_id(self, k: int) -> str:
        """The instance id of worker `k` (1-based): `{model}-{replica}-w{k}`."""
        return f"{self.id}-w{k}"

    def nodes(self) -> tuple[str, ...]:
        """Every node this replica runs on, the main one first."""
        return (self.node, *(w.node for w in self.workers))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model, "replica": self.replica, "node": self.node,
            "gpus": list(self.gpus), "backend": self.backend,
            "backend_version": self.backend_version, "port": self.port,
            "claim": self.claim.to_json(),
            "runtime": self.runtime, "vendor": self.vendor,
            "gpu_memory_bytes": self.gpu_memory_bytes, "kind": self.kind,
            "context": self.context,
            "workers": [w.to_json() for w in self.workers],
        }
        if self.split:
            data["split"] = list(self.split)
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Placement:
        return Placement(
            model=data["model"], replica=int(data["replica"]), node=data["node"],
            gpus=tuple(int(g) for g in data["gpus"]), backend=data["backend"],
            backend_version=data.get("backend_version"), port=int(data["port"]),
            claim=ClaimedResources.from_json(data["claim"]),
            runtime=data.get("runtime", ""), vendor=data.get("vendor", "cpu"),
            gpu_memory_bytes=int(data.get("gpu_memory_bytes", 0)),
            kind=data.get("kind", "llm"), context=data.get("context"),
            workers=tuple(Worker.from_json(w) for w in data.get("workers", [])),
            split=tuple(int(n) for n in data.get("split", ())),
        )


@dataclass(frozen=True)
class Unschedulable:
    """A replica that fits nowhere, with the reason per node."""

    model: str
    replica: int
    reasons: tuple[str, ...]
    hint: str = ""  # what to do, when one thing is wrong everywhere (the model's source)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, "replica": self.replica,
                                "reasons": list(self.reasons)}
        if self.hint:
            data["hint"] = self.hint
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Unschedulable:
        return Unschedulable(data["model"], int(data["replica"]),
                             tuple(str(r) for r in data.get("reasons", [])),
                             str(data.get("hint", "")))


@dataclass(frozen=True)
class Placements:
    """The scheduler's answer: every replica placed or reported, and the router hosts."""

    placements: tuple[Placement, ...]
    unschedulable: tuple[Unschedulable, ...] = ()
    routers: tuple[str, ...] = ()
    # replicas that run where they are because their model's metadata cannot be read now
    # (unknown is not gone): apply leaves their instances as they are
    kept: tuple[Placement, ...] = ()
    unknown: tuple[tuple[str, str], ...] = ()  # (model, why its metadata is unknown)

    def get(self, model: str, replica: int) -> Placement | None:
        for p in self.placements:
            if p.model == model and p.replica == replica:
                return p
        return None


def instance_id(model: str, replica: int) -> str:
    """The instance id of a replica's main part."""
    return f"{model}-{replica}"


# --------------------------------------------------------------------------- helpers


def gib(value: int) -> str:
    """Bytes as `38.2 GiB`."""
    return f"{value / GiB:.1f} GiB"


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for versions such as `0.11.0`, `b6700`, `0.3.36` (numbers compare as numbers)."""
    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def choose_runtime(spec: StackSpec, backend: str,
                   version: str | None) -> tuple[str, str | None] | str:
    """(runtime name, version) serving `backend`, or the reason there is none.

    The runtime's name is the backend unless `RuntimeSpec.backend` says otherwise; the
    version is the one asked for, else the newest listed in `[runtimes]`.
    """
    serving = [(name, rt) for name, rt in sorted(spec.runtimes.items())
               if (rt.backend or name) == backend]
    if version is not None:
        for name, rt in serving:
            if version in rt.versions:
                return name, version
        if backend == "custom":
            return "custom", version
        return f"no `[runtimes]` entry for backend `{backend}` lists version `{version}`"
    best: tuple[tuple[tuple[int, int | str], ...], str, str] | None = None
    for name, rt in serving:
        for v in rt.versions:
            key = (version_key(v), name, v)
            if best is None or key[:1] > best[:1]:
                best = key
    if best is None:
        if backend == "custom":
            return "custom", None
        return f"no `[runtimes]` entry serves backend `{backend}`"
    return best[1], best[2]


_SETTINGS: dict[int, tuple[StackSpec, dict[tuple[Any, ...], NodeSpec]]] = {}


def node_settings(spec: StackSpec, node: str) -> NodeSpec:
    """The `[nodes."PATTERN"]` settings of a node (merged by `stack.config`), computed once
    per set of matching patterns: a fleet of thousands of nodes has a handful of them."""
    from stack.config import node_settings as merged

    entry = _SETTINGS.get(id(spec))
    if entry is None or entry[0] is not spec:
        if len(_SETTINGS) > 8:
            _SETTINGS.clear()
        entry = _SETTINGS[id(spec)] = (spec, {})
    key = (tuple(p for p in spec.nodes if fnmatchcase(node, p)),
           node if node in spec.hosts else None)
    cache = entry[1]
    if key not in cache:
        cache[key] = merged(spec, node)
    return cache[key]


def _cc_key(value: str | None) -> tuple[int, ...] | None:
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
        have, want = _cc_key(gpu.compute_capability), _cc_key(sel.min_compute_capability)
        if have is None or (want is not None and have < want):
            return (f"{gpu.name or 'GPU'} has compute capability "
                    f"{gpu.compute_capability or 'unknown'}, needs {sel.min_compute_capability}")
    return None


def split_layers(layers: int, layer_bytes: int, fixed: int,
                 free: list[int]) -> tuple[int, ...] | None:
    """Whole layers per device, in proportion to each device's free memory, none beyond
    what it can hold; None when the devices cannot hold all `layers` with one each.

    A device holding `l` layers needs `l * layer_bytes + fixed`. The proportional share
    (llama.cpp's own rule, by free memory) ignores the fixed part, so a small device can
    be given more than it holds: it is capped, and the layers it cannot take go, one at
    a time, to the device with the most room left. Integer arithmetic, ties by position:
    the same inputs give the same split.
    """
    if layers < len(free) or not free:
        return None
    room = [f - fixed for f in free]
    caps = [0 if r < 0 else layers if layer_bytes <= 0 else r // layer_bytes for r in room]
    if min(caps) < 1 or sum(caps) < layers:
        return None
    total = sum(free)
    if total <= 0:
        return None
    share = [min(layers * f // total, cap) for f, cap in zip(free, caps, strict=True)]
    # the rounded-down shares leave a few layers: largest remainders first (Hamilton)
    order = sorted(range(len(free)), key=lambda i: (-(layers * free[i] % total), i))
    left = layers - sum(share)
    for i in order:
        if left and share[i] < caps[i]:
            share[i] += 1
            left -= 1
    while left:  # what capped devices could not take: the most room left first
        i = max(range(len(free)), key=lambda j: (room[j] - share[j] * layer_bytes
                                                 if share[j] < caps[j] else -1, -j))
        share[i] += 1
        left -= 1
    for i in range(len(share)):  # every device chosen holds at least one layer
        if share[i] == 0:
            j = max(range(len(share)), key=lambda k: (share[k], -k))
            share[j] -= 1
            share[i] = 1
    return tuple(share)


# --------------------------------------------------------------------------- fleet state


@dataclass(frozen=True)
class PreviousPlacement:
    """Where a replica ran, from the agents' reports."""

    model: str
    replica: int
    node: str
    gpus: tuple[int, ...]
    port: int
    backend: str
    backend_version: str | None
    workers: tuple[tuple[int, str, tuple[int, ...], int], ...] = ()  # (k, node, gpus, port)
    split: tuple[int, ...] = ()  # layers per device, as the main reports (`layer_split`)


def previous_placements(observed: Observed) -> dict[tuple[str, int], PreviousPlacement]:
    """The placements the agents report, by (model, replica); workers folded in."""
    mains: dict[tuple[str, int], tuple[str, InstanceFacts]] = {}
    workers: dict[tuple[str, int], list[tuple[int, str, tuple[int, ...], int]]] = {}
    for node_name in sorted(observed.nodes):
        for inst in observed.nodes[node_name].agent.instances:
            key = (inst.model, inst.replica)
            base = instance_id(inst.model, inst.replica)
            if inst.id == base:
                mains.setdefault(key, (node_name, inst))
            elif inst.id.startswith(base + "-w") and inst.id[len(base) + 2:].isdigit():
                k = int(inst.id[len(base) + 2:])
                workers.setdefault(key, []).append((k, node_name, tuple(inst.gpus), inst.port))
    out: dict[tuple[str, int], PreviousPlacement] = {}
    for key, (node_name, inst) in sorted(mains.items()):
        out[key] = PreviousPlacement(
            inst.model, inst.replica, node_name, tuple(inst.gpus), inst.port, inst.backend,
            inst.backend_version, tuple(sorted(workers.get(key, []))),
            tuple(inst.layer_split or ()))
    return out


@dataclass
class _Node:
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
    version: int = 0

    def load(self) -> float:
        """Fraction of the node taken (VRAM on GPU nodes, RAM otherwise)."""
        if self.total_vram:
            return 1.0 - sum(self.free.values()) / self.total_vram
        return 1.0 - self.ram_free / self.ram_total if self.ram_total else 1.0


@dataclass(frozen=True)
class _Pool:
    """GPUs of one node class that a (model, backend) may use together."""

    vendor: str
    indices: tuple[int, ...]
    memory: int  # total memory of one GPU (of the largest, when mixed)
    mixed: bool = False  # unlike GPUs of one vendor, only for a split by layers


@dataclass(frozen=True)
class _Eligibility:
    """What a (model, backend) may use on a node class, or why nothing."""

    pools: tuple[_Pool, ...]
    cpu: bool
    reason: str | None


@dataclass(frozen=True)
class _Need:
    """One part of a replica to place on one node: k GPUs of a pool (or CPU)."""

    gpus: int
    vram: int  # per GPU (the most any takes, when split by layers)
    ram: int
    disk: int
    vram_by_gpu: tuple[int, ...] = ()  # split by layers: per GPU, in the part's GPU order
    layers: tuple[int, ...] = ()  # split by layers: per GPU, or one entry for the CPU


# one part of a replica as placed: node, GPU pool (None: CPU), GPUs, what it takes, port
_Part = tuple[_Node, _Pool | None, tuple[int, ...], _Need, int | None]


@dataclass
class _Model:
    """A model while placing: its spec, evaluation and caches."""

    name: str
    spec: ModelSpec
    evaluation: Evaluation
    policy: str
    backends: tuple[str, ...]
    runtimes: dict[str, tuple[str, str | None] | str]
    selector: Any
    claims: dict[tuple[str, int, int, int], Claim | str] = field(default_factory=dict)
    failed_layouts: set[tuple[str, int, int, int]] = field(default_factory=set)
    reasons: tuple[str, ...] | None = None

    def claim(self, backend: str, gpus: int, memory: int, nodes: int) -> Claim | str:
        key = (backend, gpus, memory, nodes)
        if key not in self.claims:
            self.claims[key] = self.evaluation.claim(
                backend, gpus, memory if gpus else None, nodes)
        return self.claims[key]


class _Fleet:
    """The nodes while placing, grouped into classes, with per-class lazy heaps."""

    def __init__(self, spec: StackSpec, observed: Observed) -> None:
        self.spec = spec
        self.port_lo, self.port_hi = spec.stack.port_range
        self.nodes: dict[str, _Node] = {}
        self.excluded: dict[str, str] = {}  # node -> why no model goes there
        self.class_members: list[list[str]] = []
        self.heaps: list[dict[str, list[tuple[tuple[float, str], int, str]]]] = []
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
            node = self._node(name, facts)
            key = self._class_key(node)
            if key not in class_index:
                class_index[key] = len(self.class_members)
                self.class_members.append([])
                self.heaps.append({"spread": [], "binpack": []})
            node.cls = class_index[key]
            self.class_members[node.cls].append(name)
            self.nodes[name] = node
        for node in self.nodes.values():
            self._push(node)

    def _node(self, name: str, facts: NodeFacts) -> _Node:
        settings = node_settings(self.spec, name)
        host = self.spec.hosts.get(name)
        labels = {**facts.labels, **(host.labels if host else {}), **settings.labels}
        ours_on_gpu: set[int] = set()
        ports: dict[int, str] = {}
        files: set[str] = set()
        for inst in facts.agent.instances:
            ours_on_gpu.update(inst.gpus)
            ports[inst.port] = inst.id
            files.add(inst.model)
        for port in facts.ports_in_use:
            ports.setdefault(port, "")
        gpus = {g.index: g for g in facts.gpus}
        free: dict[int, int] = {}
        for g in facts.gpus:
            # memory in use on a GPU none of our instances runs on belongs to someone else;
            # on our GPUs our own claims stand for the usage (stable from plan to plan)
            external = 0 if g.index in ours_on_gpu else g.memory_used_bytes
            free[g.index] = max(0, g.memory_bytes - settings.reserved_vram - external)
        ram = max(0, facts.memory_bytes - settings.reserved_ram)
        return _Node(name=name, facts=facts, settings=settings, labels=labels, gpus=gpus,
                     free=free, total_vram=sum(g.memory_bytes for g in facts.gpus),
                     ram_free=ram, ram_total=ram, disk_free=facts.disk_free_bytes,
                     ports_taken=set(), ports_reported=ports, files_here=files)

    @staticmethod
    def _class_key(node: _Node) -> tuple[Any, ...]:
        gpus = tuple((g.vendor, g.name, g.memory_bytes, g.compute_capability)
                     for _, g in sorted(node.gpus.items()))
        s = node.settings
        return (tuple(sorted(node.labels.items())), node.facts.os, node.facts.arch, gpus,
                s.cpu_inference, s.reserved_vram, s.reserved_ram)

    def _push(self, node: _Node) -> None:
        load = round(node.load(), 9)
        heaps = self.heaps[node.cls]
        heapq.heappush(heaps["spread"], ((load, node.name), node.version, node.name))
        heapq.heappush(heaps["binpack"], ((-load, node.name), node.version, node.name))

    def take(self, node: _Node, model: str, gpus: Iterable[int], need: _Need, port: int) -> None:
        """Claim resources on `node` for one part of a replica."""
        for k, i in enumerate(gpus):
            node.free[i] -= need.vram_by_gpu[k] if need.vram_by_gpu else need.vram
        node.ram_free -= need.ram
        if model not in node.files_here:
            node.disk_free -= need.disk
            node.files_here.add(model)
        node.ports_taken.add(port)
        node.models[model] = node.models.get(model, 0) + 1
        node.version += 1
        self._push(node)

    def free_port(self, node: _Node, owner: str = "", wanted: int | None = None,
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
                   accept: Callable[[_Node], bool]) -> list[_Node]:
        """Nodes of `classes` in policy order, stopping at the first one `accept` takes.

        Returns the nodes looked at, in order (the accepted one last, if any). Popped heap
        entries are pushed back, so the heaps stay intact.
        """
        heaps = [self.heaps[c][policy] for c in classes]
        frontier = [(h[0][0], i) for i, h in enumerate(heaps) if h]
        heapq.heapify(frontier)
        seen: list[_Node] = []
        popped: list[tuple[int, tuple[tuple[float, str], int, str]]] = []
        try:
            while frontier:
                _, i = heapq.heappop(frontier)
                entry = heapq.heappop(heaps[i])
                if heaps[i]:
                    heapq.heappush(frontier, (heaps[i][0][0], i))
                node = self.nodes[entry[2]]
                if entry[1] != node.version:
                    continue  # stale: the node changed since this entry was pushed
                popped.append((i, entry))
                seen.append(node)
                if accept(node):
                    break
        finally:
            for i, entry in popped:
                heapq.heappush(heaps[i], entry)
        return seen


# --------------------------------------------------------------------------- scheduling


def _same_split(a: Claim, b: Claim) -> bool:
    """Whether two nodes' claims split the same layers the same way (one split over all)."""
    return (a.layers, a.layer_bytes, a.device_bytes) == (b.layers, b.layer_bytes, b.device_bytes)


class _Scheduler:
    def __init__(self, spec: StackSpec, evaluations: Mapping[str, Evaluation],
                 observed: Observed) -> None:
        self.spec = spec
        self.fleet = _Fleet(spec, observed)
        self.models: dict[str, _Model] = {}
        self.eligible: dict[tuple[str, str, int], _Eligibility] = {}
        self.usable: dict[tuple[str, str, int, int], list[int]] = {}
        from stack.selector import parse_selector

        for name in sorted(evaluations):
            if name not in spec.models:
                continue
            mspec, ev = spec.models[name], evaluations[name]
            backends = (mspec.backend,) if mspec.backend else tuple(ev.backends)
            self.models[name] = _Model(
                name=name, spec=mspec, evaluation=ev,
                policy=mspec.placement or spec.stack.placement, backends=backends,
                runtimes={b: choose_runtime(spec, b, mspec.backend_version) for b in backends},
                selector=parse_selector(mspec.selector),
            )

    # ---- filters per (model, backend, class)

    def eligibility(self, m: _Model, backend: str, cls: int) -> _Eligibility:
        key = (m.name, backend, cls)
        if key not in self.eligible:
            self.eligible[key] = self._eligibility(m, backend,
                                                   self.fleet.nodes[self.fleet.class_members[cls][0]])
        return self.eligible[key]

    def _eligibility(self, m: _Model, backend: str, node: _Node) -> _Eligibility:
        runtime = m.runtimes[backend]
        if isinstance(runtime, str):
            return _Eligibility((), False, runtime)
        if m.spec.selector and not m.selector.matches(node.labels):
            failing = ", ".join(r.describe() for r in m.selector.failing(node.labels))
            return _Eligibility((), False, f"labels do not match `{failing}`")
        groups: dict[tuple[str, str, int], list[int]] = {}
        gpu_reasons: list[str] = []
        for index, gpu in sorted(node.gpus.items()):
            why = gpu_selected(m.spec, gpu)
            if why:
                gpu_reasons.append(why)
                continue
            groups.setdefault((gpu.vendor, gpu.name, gpu.memory_bytes), []).append(index)
        pools: list[_Pool] = []
        for (vendor, _, memory), indices in sorted(groups.items()):
            why = m.evaluation.refuse(backend, node.facts, [node.gpus[i] for i in indices])
            if why:
                gpu_reasons.append(why)
            else:
                pools.append(_Pool(vendor, tuple(indices), memory))
        if backend in CPU_BACKENDS:
            # llama.cpp splits by layers, so unlike GPUs of one vendor work together
            # (an RTX 4090 beside an L40S); tried after the pools of alike GPUs
            for vendor in sorted({p.vendor for p in pools}):
                same = [p for p in pools if p.vendor == vendor]
                if len(same) > 1:
                    pools.append(_Pool(vendor, tuple(sorted(i for p in same for i in p.indices)),
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
            return _Eligibility(tuple(pools), cpu, None)
        if not node.gpus:
            return _Eligibility((), False, f"no GPU; {cpu_reason}" if cpu_reason else "no GPU")
        return _Eligibility((), False, "; ".join(dict.fromkeys(gpu_reasons)) or cpu_reason)

    # ---- one node

    def fit_gpus(self, node: _Node, pool: _Pool, need: _Need,
                 policy: str) -> tuple[int, ...] | None:
        """`need.gpus` GPUs of `pool` on `node` with enough free memory, or None."""
        ok = [i for i in pool.indices if node.free[i] >= need.vram]
        if len(ok) < need.gpus:
            return None
        # spread: the emptiest GPUs; binpack: the fullest that still fit (best fit)
        ok.sort(key=lambda i: (-node.free[i] if policy == "spread" else node.free[i], i))
        return tuple(sorted(ok[:need.gpus]))

    def fits_host(self, node: _Node, model: str, need: _Need) -> str | None:
        """Why RAM, disk or ports on `node` cannot take this part, or None."""
        if node.ram_free < need.ram:
            return f"needs {gib(need.ram)} RAM, free {gib(node.ram_free)}"
        if model not in node.files_here and node.disk_free < need.disk:
            return f"needs {gib(need.disk)} disk for the model files, free {gib(node.disk_free)}"
        if self.fleet.free_port(node) is None:
            return f"no free port in {self.fleet.port_lo}-{self.fleet.port_hi}"
        return None

    def need(self, m: _Model, backend: str, gpus: int, memory: int, nodes: int) -> _Need | str:
        claim = m.claim(backend, gpus, memory, nodes)
        if isinstance(claim, str):
            return claim
        disk = claim.disk_bytes or m.evaluation.meta.files_bytes
        return _Need(gpus, claim.vram_bytes_per_gpu if gpus else 0, claim.ram_bytes, disk)

    def try_node(self, m: _Model, backend: str, node: _Node, gpus: int, nodes: int,
                 policy: str) -> tuple[_Pool | None, tuple[int, ...], _Need] | None:
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

    def split_claim(self, m: _Model, backend: str, gpus: int, memory: int,
                    nodes: int) -> Claim | None:
        """The claim when this layout spreads the model over several devices by whole
        layers (llama.cpp), else None (one device, or an even split such as vLLM's)."""
        if max(gpus, 1) * nodes < 2:
            return None
        claim = m.claim(backend, gpus, memory, nodes)
        if isinstance(claim, str) or claim.layers < 1:
            return None
        return claim

    def split_parts(self, m: _Model, claim: Claim,
                    parts: list[tuple[_Node, _Pool | None, tuple[int, ...], int | None]],
                    previous: tuple[int, ...] = ()) -> list[_Part] | None:
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
        out: list[_Part] = []
        k = 0
        for node, pool, gpus, port in parts:
            share = split[k:k + max(len(gpus), 1)]
            k += len(share)
            if gpus:
                vram = tuple(layers * per_layer + fixed for layers in share)
                need = _Need(len(gpus), max(vram), claim.ram_bytes, disk, vram, share)
            else:
                need = _Need(0, 0, share[0] * per_layer + fixed, disk, (), share)
            if self.fits_host(node, m.name, need):
                return None
            out.append((node, pool, gpus, need, port))
        return out

    def split_gpus(self, node: _Node, pool: _Pool, claim: Claim, k: int,
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

    def fit_split(self, m: _Model, claim: Claim, node: _Node, pool: _Pool, k: int,
                  policy: str) -> tuple[_Pool | None, tuple[int, ...], _Need] | None:
        """`k` GPUs of `pool` on `node` that hold the model split by layers, or None."""
        for gpus in self.split_gpus(node, pool, claim, k, policy):
            parts = self.split_parts(m, claim, [(node, pool, gpus, None)])
            if parts is not None:
                return pool, gpus, parts[0][3]
        return None

    # ---- placing

    def place(self, m: _Model, replica: int, backend: str, parts: list[_Part]) -> Placement:
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

    def sticky(self, m: _Model, prev: PreviousPlacement) -> Placement | None:
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

    def _fit_even(self, m: _Model, backend: str,
                  parts: list[tuple[_Node | None, tuple[int, ...], int | None]]
                  ) -> list[_Part] | None:
        """The parts each taking the same claim on exactly these GPUs, or None."""
        fitted: list[_Part] = []
        need: _Need | None = None
        for node, gpus, port in parts:
            assert node is not None
            got = self._fits_exactly(m, backend, node, gpus, len(parts))
            if got is None or (need is not None and got[1] != need):
                return None
            need = got[1]
            fitted.append((node, got[0], gpus, need, port))
        return fitted

    def _sticky_split(self, m: _Model, prev: PreviousPlacement,
                      parts: list[tuple[_Node | None, tuple[int, ...], int]]) -> Placement | None:
        """A llama.cpp replica over several devices where it runs, split by layers (its
        reported split while that still fits), or None."""
        resolved: list[tuple[_Node, _Pool | None, tuple[int, ...], int | None]] = []
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

    def _fits_exactly(self, m: _Model, backend: str, node: _Node, gpus: tuple[int, ...],
                      nodes: int) -> tuple[_Pool | None, _Need] | None:
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

    def layouts(self, m: _Model) -> list[int]:
        want = m.spec.gpus_per_replica
        if m.spec.pin and m.spec.pin.gpus:
            return [len(m.spec.pin.gpus)]
        return [want] if isinstance(want, int) else list(TP_SIZES)

    def place_fresh(self, m: _Model, replica: int) -> Placement | None:
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

    def _class_usable(self, m: _Model, backend: str, cls: int) -> bool:
        if m.spec.pin and self.fleet.nodes.get(m.spec.pin.node) is None:
            return False
        if m.spec.pin and self.fleet.nodes[m.spec.pin.node].cls != cls:
            return False
        el = self.eligibility(m, backend, cls)
        return bool(el.pools or el.cpu)

    def _place_single(self, m: _Model, replica: int, backend: str, classes: list[int],
                      gpus: int) -> Placement | None:
        layout = (backend, gpus, 1, 0)
        if layout in m.failed_layouts:
            return None
        policy = m.policy
        pin = m.spec.pin
        found: list[tuple[_Node, tuple[_Pool | None, tuple[int, ...], _Need]]] = []

        def accept(node: _Node) -> bool:
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

    def _layout_possible(self, m: _Model, backend: str, cls: int, gpus: int) -> bool:
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

    def _try_pinned(self, m: _Model, backend: str,
                    node: _Node) -> tuple[_Pool | None, tuple[int, ...], _Need] | None:
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

    def _place_distributed(self, m: _Model, replica: int, backend: str,
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
                chosen: list[tuple[_Node, tuple[_Pool | None, tuple[int, ...], _Need]]] = []

                def accept(node: _Node, gpus: int = gpus, nodes: int = nodes,
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

    def _place_split(self, m: _Model, replica: int, backend: str, classes: list[int],
                     gpus: int, nodes: int) -> Placement | None:
        """A replica over `nodes` nodes split by layers (llama.cpp: the main and its RPC
        workers): the first nodes in policy order whose devices hold a layer or more each,
        sharing the layers by free memory; None when no such set holds it."""
        probe: list[Claim] = []
        chosen: list[tuple[_Node, _Pool | None, tuple[int, ...], int | None]] = []

        def accept(node: _Node) -> bool:
            el = self.eligibility(m, backend, node.cls)
            got = self._split_part(m, backend, node, el, gpus, nodes)
            if got is not None and (not probe or _same_split(got[0], probe[0])):
                probe.append(got[0])
                chosen.append((node, got[1], got[2], None))
            return len(chosen) == nodes

        self.fleet.candidates(classes, m.policy, accept)
        if len(chosen) < nodes:
            return None
        parts = self.split_parts(m, probe[0], chosen)
        return None if parts is None else self.place(m, replica, backend, parts)

    def _split_part(self, m: _Model, backend: str, node: _Node, el: _Eligibility, gpus: int,
                    nodes: int) -> tuple[Claim, _Pool | None, tuple[int, ...]] | None:
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

    def _split_unknown(self, m: _Model, backend: str, classes: list[int], gpus: int,
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

    def reasons(self, m: _Model) -> tuple[str, ...]:
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

    def _node_reason(self, m: _Model, backend: str, node: _Node) -> str:
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
    def _split_host_need(m: _Model, claim: Claim) -> _Need:
        return _Need(claim.gpus, 0, claim.ram_bytes,
                     claim.disk_bytes or m.evaluation.meta.files_bytes)

    @staticmethod
    def _split_reason(claim: Claim, node: _Node, pool: _Pool, k: int) -> str:
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
                            _Need(len(held), 0, 0, 0, tuple(node.free[g] for g in held)), port)
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
    return _Scheduler(spec, evaluations, observed).run(prev, failed or {}, unknown or {},
                                                       kinds)


def with_instances(observed: Observed, placements: Placements,
                   spec_hashes: Mapping[str, str] | None = None,
                   agent_version: str | None = None) -> Observed:
    """The facts as they read after a successful apply of `placements`: every reachable
    node's agent runs exactly the placed instances (ready). For tests and benchmarks."""
    hashes = spec_hashes or {}
    per_node: dict[str, list[InstanceFacts]] = {name: [] for name in observed.nodes}
    for p in placements.placements:
        parts = [(p.node, p.gpus, p.port, p.id),
                 *((w.node, w.gpus, w.port, p.worker_id(k))
                   for k, w in enumerate(p.workers, start=1))]
        for node, gpus, port, iid in parts:
            # a main split by layers reports its split (the agent's `layer_split`)
            per_node[node].append(InstanceFacts(
                id=iid, model=p.model, replica=p.replica, gpus=list(gpus), port=port,
                backend=p.backend, backend_version=p.backend_version, state="ready",
                spec_hash=hashes.get(iid), kind=p.kind,
                role="single" if not p.workers else "main" if iid == p.id else "worker",
                layer_split=list(p.split) if p.split and iid == p.id else None))
    nodes: dict[str, NodeFacts] = {}
    for name, facts in observed.nodes.items():
        if not facts.reachable:
            nodes[name] = facts
            continue
        agent = AgentFacts(version=agent_version or facts.agent.version, running=True,
                           instances=per_node[name])
        nodes[name] = facts.model_copy(update={"agent": agent})
    return observed.model_copy(update={"nodes": nodes})
