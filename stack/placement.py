"""Where replicas run: the scheduler's answer and the values around it.

`Placement` (one replica placed: node, GPUs, backend, port, claim, workers, layer split),
`Placements` (all of them, the replicas that cannot be placed, those kept because their
model's metadata is unknown, and the router hosts), `PreviousPlacement` (where a replica
runs now, from the agents' reports) and their JSON (the plan's `placements`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stack.snapshot import InstanceFacts, NodeFacts, Observed


GiB = 1024**3



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
    # partial offload (llama.cpp): layers the main keeps on its CPU, beside `split`'s
    cpu_layers: int = 0
    # stack.toml sets no `context` and the training context does not fit: `context` is the
    # largest that does, and this is the training context it was shortened from
    shortened_from: int = 0

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
        if self.cpu_layers:
            data["cpu_layers"] = self.cpu_layers
        if self.shortened_from:
            data["shortened_from"] = self.shortened_from
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
            cpu_layers=int(data.get("cpu_layers", 0)),
            shortened_from=int(data.get("shortened_from", 0)),
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


# backends whose multi-node mains start a Ray head on the port after their own
RAY_BACKENDS = ("vllm", "sglang")


def port_span(backend: str, role: str) -> int:
    """How many ports an instance listens on from its own up (agent.commands): a vLLM or
    SGLang main over nodes also the Ray head's (SGLang: its dist-init port) on port + 1;
    every MindIE instance its management and metrics ports on + 1 and + 2, and a part over
    nodes its inter-node port on + 3. The scheduler keeps them all free for it."""
    if role == "main" and backend in RAY_BACKENDS:
        return 2
    if backend == "mindie":
        return 3 if role == "single" else 4
    return 1


def instance_id(model: str, replica: int) -> str:
    """The instance id of a replica's main part."""
    return f"{model}-{replica}"


def gib(value: int) -> str:
    """Bytes as `38.2 GiB`."""
    return f"{value / GiB:.1f} GiB"



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


@dataclass(frozen=True)
class RunningPart:
    """One instance an agent reports for a replica: its node, its part (0: the main,
    k: worker k) and what the agent says about it."""

    node: str
    part: int
    facts: InstanceFacts


def part_of(inst: InstanceFacts) -> int | None:
    """Which part of its replica an instance is, from its id (`{model}-{replica}` is the
    main, `...-w{k}` worker k); None for an id that is no replica's (another stack's)."""
    base = instance_id(inst.model, inst.replica)
    if inst.id == base:
        return 0
    tail = inst.id[len(base):]
    if inst.id.startswith(base) and tail.startswith("-w") and tail[2:].isdigit():
        return int(tail[2:])
    return None


def running_replicas(observed: Observed) -> tuple[
        dict[tuple[str, int], dict[str, RunningPart]], list[tuple[str, InstanceFacts]]]:
    """The instances the agents report, grouped by replica (by instance id), and those
    that are no replica's, with their node."""
    replicas: dict[tuple[str, int], dict[str, RunningPart]] = {}
    loose: list[tuple[str, InstanceFacts]] = []
    for name in sorted(observed.nodes):
        for inst in observed.nodes[name].agent.instances:
            part = part_of(inst)
            if part is None:
                loose.append((name, inst))
            else:
                replicas.setdefault((inst.model, inst.replica), {}).setdefault(
                    inst.id, RunningPart(name, part, inst))
    return replicas, loose


def previous_placements(observed: Observed) -> dict[tuple[str, int], PreviousPlacement]:
    """The placements the agents report, by (model, replica); workers folded in."""
    out: dict[tuple[str, int], PreviousPlacement] = {}
    for key, parts in sorted(running_replicas(observed)[0].items()):
        main = next((p for p in parts.values() if p.part == 0), None)
        if main is None:
            continue
        inst = main.facts
        workers = tuple(sorted((p.part, p.node, tuple(p.facts.gpus), p.facts.port)
                               for p in parts.values() if p.part))
        out[key] = PreviousPlacement(
            inst.model, inst.replica, main.node, tuple(inst.gpus), inst.port, inst.backend,
            inst.backend_version, workers, tuple(inst.layer_split or ()))
    return out


def with_instances(observed: Observed, placements: Placements,
                   spec_hashes: Mapping[str, str] | None = None,
                   agent_version: str | None = None) -> Observed:
    """The facts as they read after a successful apply of `placements`: every reachable
    node's agent runs exactly the placed instances (ready), `agent_version` built for
    its target if given. For tests and benchmarks."""
    from stack.bundle_target import host_agent_version
    from stack.snapshot import AgentFacts, InstanceFacts  # the scheduler itself needs neither

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
        version = host_agent_version(agent_version, facts) if agent_version else None
        agent = AgentFacts(version=version or facts.agent.version, running=True,
                           instances=per_node[name])
        # the instances listen on their ports (and those after them they use)
        listening = {q for i in per_node[name]
                     for q in range(i.port, i.port + port_span(i.backend, i.role))}
        nodes[name] = facts.model_copy(update={
            "agent": agent, "ports_in_use": sorted({*facts.ports_in_use, *listening})})
    return observed.model_copy(update={"nodes": nodes})
