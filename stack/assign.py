"""From placements to what each host must run: agent assignments and the router config.

`build_assignments` turns `Placements` into one `agent.assignment.Assignment` per node;
`build_router_config` turns them into the router's `RouterConfig`. Both are pure apart
from one look at the controller's disk (is a `local://` source a file or a folder).
API keys are derived from the stack secret (`stack.secrets.derive_key`, purpose
`instance:<id>`); without a secret (planning in CI) they are left out, which is why
`Instance.spec_hash()` and `router_config_sha256()` ignore them. `env` values from the
controller's environment are left out the same way: `digests` (`stack.env.env_digests`)
stand for them, and apply fills them in (`stack.env.with_env_values`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import posixpath
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from agent.assignment import Assignment, Devices, Instance, Peer, RankDevice, RankServer, SecretEnv
from router.config import (
    Health,
    Key,
    Limits,
    Replica,
    RouteModel,
    RouterConfig,
    Timeouts,
    User,
)
from stack.catalog import Recipe, recipe
from stack.nodes import node_prefix, node_settings
from stack.placement import Placement, Placements, Worker
from stack.snapshot import Observed
from stack.spec import ModelSpec, StackSpec

# health paths the router probes where a backend does not answer on /health
# (stable-diffusion.cpp's sd-server 0.4.7 answers 404 on /health, 200 on /v1/models)
HEALTH_PATHS = {"mindie": "/info", "stable-diffusion.cpp": "/v1/models"}
# backends whose gpu_memory_utilization the scheduler's claim decides
UTILIZATION_BACKENDS = ("vllm", "sglang")


def node_host(spec: StackSpec, observed: Observed, node: str) -> str:
    """The private address backends on `node` bind to and the router calls."""
    address = node_settings(spec, node).address  # cached per set of patterns
    if address:
        return address
    facts = observed.nodes.get(node)
    if facts is not None and facts.address:
        return facts.address
    host = spec.hosts.get(node)
    if host is not None and host.address != "@local":
        return host.address
    return "127.0.0.1"


def resolve_local(source: str, stack_dir: Path) -> Path:
    """`local://PATH` -> the controller path (relative to stack.toml, or `local:///abs`)."""
    rest = source[len("local://"):]
    return Path(rest) if rest.startswith("/") else stack_dir / rest


def model_path(name: str, source: str, prefix: str, stack_dir: Path) -> str | None:
    """Where a model's files are on a host.

    `local://` files are uploaded to `PREFIX/models/<model>/<filename>` (folders to
    `PREFIX/models/<model>`); absolute host paths are used as they are; Hugging Face and
    ModelScope sources are None: the agent downloads them into its caches under
    `PREFIX/models/` and resolves the path itself.
    """
    folder = PurePosixPath(prefix) / "models" / name
    if source.startswith("local://"):
        rest = source[len("local://"):]
        local = resolve_local(source, stack_dir)
        if local.is_dir():
            gguf = _gguf_folder(local)
            return str(folder / gguf.name) if gguf is not None else str(folder)
        if not local.exists() and not PurePosixPath(rest).suffix:
            return str(folder)
        return str(folder / PurePosixPath(rest).name)
    if source.startswith("/"):
        return source
    return None


def _gguf_folder(local: Path) -> Path | None:
    """The main GGUF of a `local://` folder of GGUF files (no config.json or
    model_index.json beside them), which llama.cpp loads by file; None for other folders."""
    from stack.estimate.read import pick_gguf

    if (local / "config.json").exists() or (local / "model_index.json").exists():
        return None
    return pick_gguf(local)


def folder_mmproj(source: str, stack_dir: Path) -> str | None:
    """The vision projector of a `local://` folder of GGUF files (`mmproj*.gguf` beside the
    model, when it is the only one): what `--mmproj` gets when stack.toml names none."""
    from stack.estimate.read import pick_mmproj

    if not source.startswith("local://"):
        return None
    local = resolve_local(source, stack_dir)
    if not local.is_dir() or _gguf_folder(local) is None:
        return None
    found = pick_mmproj(local)
    return found.name if found is not None else None


def local_checksum(source: str, stack_dir: Path) -> str | None:
    """The sha256 of a `local://` model's content (a folder: of its files' names and
    hashes), part of its instances' identity; None for other sources."""
    if not source.startswith("local://"):
        return None
    from stack.wheelhouse import sha256_file

    local = resolve_local(source, stack_dir)
    if local.is_file():
        return sha256_file(local)
    if not local.is_dir():
        return None
    lines = [f"{p.relative_to(local).as_posix()}\0{sha256_file(p)}\n"
             for p in sorted(local.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def gpu_memory_utilization(model: ModelSpec, placement: Placement) -> float | None:
    """The model's setting, else (vLLM, SGLang) the claim as a fraction of the GPU."""
    if model.gpu_memory_utilization is not None:
        return model.gpu_memory_utilization
    if placement.backend not in UTILIZATION_BACKENDS or not placement.gpu_memory_bytes:
        return None
    fraction = placement.claim.vram_bytes_per_gpu / placement.gpu_memory_bytes
    return min(1.0, math.ceil(fraction * 100) / 100)


def _api_key(secret: bytes | None, instance: str) -> str | None:
    if secret is None:
        return None
    from stack.secrets import derive_key

    return derive_key(secret, f"instance:{instance}")


def with_api_keys(assignments: dict[str, Assignment], secret: bytes) -> dict[str, Assignment]:
    """The plan's assignments (no secrets) with every backend's API key filled in: what
    apply writes. A worker has none (only the main part faces the router)."""
    return {node: a.model_copy(update={"instances": [
        i.model_copy(update={"api_key": _api_key(secret, i.id)}) if i.role != "worker" else i
        for i in a.instances]}) for node, a in assignments.items()}


def _instances(spec: StackSpec, nodes: _Nodes, paths: dict[tuple[str, str], str | None],
               p: Placement, stack_dir: Path,
               secret: bytes | None) -> list[tuple[str, Instance]]:
    """(node, Instance) for the main part and every worker of one placement."""
    model = spec.models[p.model]
    main = Worker(p.node, p.gpus, p.port, p.vendor)
    parts = [main, *p.workers]
    peers = [Peer(node=w.node, host=nodes.get(w.node)[1], port=w.port) for w in parts]
    rank_table = _rank_table(nodes.observed, parts, peers) \
        if p.backend == "mindie" and p.workers else None
    out: list[tuple[str, Instance]] = []
    for k, part in enumerate(parts):
        prefix = nodes.get(part.node)[0]
        found = recipe(spec, p.runtime, p.backend_version, part.vendor) \
            if p.runtime and p.backend_version else None
        runtime_path = "" if found is None else posixpath.join(
            prefix, "runtimes", p.runtime,
            found.folder if isinstance(found, Recipe) else p.backend_version or "")
        if (p.model, prefix) not in paths:
            paths[(p.model, prefix)] = model_path(p.model, model.source, prefix, stack_dir)
        if (p.model, "") not in paths:
            paths[(p.model, "")] = local_checksum(model.source, stack_dir)
        runtime = found.spec if isinstance(found, Recipe) else None
        iid = p.id if k == 0 else p.worker_id(k)
        role: Literal["single", "main", "worker"] = (
            "single" if not p.workers else ("main" if k == 0 else "worker"))
        # a main lists its workers in rank order; a worker lists the main, then every
        # worker in rank order (itself included), so it can find its own rank
        part_peers = peers[1:] if k == 0 else peers
        env, secret_env = nodes.env(part.node, p.model, runtime.env if runtime else {})
        if isinstance(found, Recipe) and found.device_env and part.gpus:
            env = {**env, found.device_env: ",".join(str(g) for g in part.gpus)}
        out.append((part.node, Instance(
            id=iid, model=p.model, replica=p.replica, source=model.source,
            model_path=paths[(p.model, prefix)], kind=p.kind,
            backend=p.backend, backend_version=p.backend_version, runtime_path=runtime_path,
            runtime_recipe=found.digest if isinstance(found, Recipe) else None,
            args=_args(model.args, p) if k == 0 else list(model.args),
            env=env, secret_env=secret_env,
            devices=Devices(vendor=part.vendor, indices=list(part.gpus)),
            host=peers[k].host, port=part.port,
            api_key=_api_key(secret, iid) if k == 0 else None,
            context=p.context or None, role=role, peers=part_peers if p.workers else [],
            health_path=model.health_path, command=model.command,
            mmproj=model.mmproj or folder_mmproj(model.source, stack_dir),
            components=dict(model.components),
            gpu_memory_utilization=gpu_memory_utilization(model, p) if part.gpus else None,
            # the main runs llama-server, which places the layers (`--tensor-split`)
            layer_split=list(p.split) if k == 0 and p.split else None,
            source_sha256=paths[(p.model, "")],
            rank_table=rank_table,
        )))
    return out


def _rank_table(observed: Observed, parts: list[Worker], peers: list[Peer]
                ) -> list[RankServer] | None:
    """A MindIE replica over several nodes: each part's node address and NPUs with their
    device IPs, the main first (every part gets this same list and writes it as its rank
    table); None when an address is not an IP or an NPU's device IP is unknown (the
    scheduler places such replicas only on NPUs with one; the agent refuses a part
    without a rank table)."""
    servers: list[RankServer] = []
    for part, peer in zip(parts, peers, strict=True):
        facts = observed.nodes.get(part.node)
        ips = {g.index: g.device_ip for g in facts.gpus} if facts else {}
        devices = [(i, ips.get(i)) for i in part.gpus]
        try:
            ipaddress.ip_address(peer.host)
        except ValueError:
            return None
        if not devices or any(ip is None for _, ip in devices):
            return None
        servers.append(RankServer(host=peer.host, devices=[
            RankDevice(device_id=i, device_ip=ip) for i, ip in devices if ip]))
    return servers


def _args(args: list[str], p: Placement) -> list[str]:
    """The model's args; a partial offload adds `-ngl`: the split's layers on the devices
    plus the output layer (llama.cpp offloads the last `-ngl` of `layers + 1`), the rest on
    the main's CPU. After the split's own `-ngl` on the command line, so it wins."""
    if not p.cpu_layers:
        return list(args)
    return [*args, "-ngl", str(sum(p.split) + 1)]


class _Nodes:
    """Per-node prefix, address and environment, looked up once per node."""

    def __init__(self, spec: StackSpec, observed: Observed,
                 digests: Mapping[str, str]) -> None:
        self.spec, self.observed, self.digests = spec, observed, digests
        self.cache: dict[str, tuple[str, str]] = {}
        self.envs: dict[tuple[str, str], tuple[dict[str, str], dict[str, SecretEnv]]] = {}

    def env(self, node: str, model: str, runtime: Mapping[str, str]
            ) -> tuple[dict[str, str], dict[str, SecretEnv]]:
        """An instance's environment: the runtime's, the node's, then the model's `env`,
        key by key, split into plain values and values from the controller."""
        key = (node, model)
        if key not in self.envs:
            from stack.env import split_env

            merged = {**runtime, **node_settings(self.spec, node).env,
                      **self.spec.models[model].env}
            self.envs[key] = split_env(merged, self.digests)
        plain, secret = self.envs[key]
        return dict(plain), dict(secret)

    def node_env(self, node: str) -> tuple[dict[str, str], dict[str, SecretEnv]]:
        """The node's own `env` (the agent's), split like an instance's."""
        from stack.env import split_env

        return split_env(node_settings(self.spec, node).env, self.digests)

    def get(self, node: str) -> tuple[str, str]:
        if node not in self.cache:
            self.cache[node] = (node_prefix(self.spec, node),
                                node_host(self.spec, self.observed, node))
        return self.cache[node]


def build_assignments(spec: StackSpec, placements: Placements, observed: Observed,
                      stack_dir: Path, secret: bytes | None,
                      digests: Mapping[str, str] | None = None) -> dict[str, Assignment]:
    """The assignment of every node in the fleet (empty for nodes that run nothing).
    `digests`: of the controller's `from_env` values (`stack.env.env_digests`)."""
    per_node: dict[str, list[Instance]] = {name: [] for name in sorted(observed.nodes)}
    nodes = _Nodes(spec, observed, digests or {})
    paths: dict[tuple[str, str], str | None] = {}
    # kept replicas (metadata unknown) too: their instances stand for the running ones in
    # the router config; apply swaps them for the host's own (stack.apply.desired.keep_unknown)
    for p in (*placements.placements, *placements.kept):
        if p.model not in spec.models:
            continue
        for node, inst in _instances(spec, nodes, paths, p, stack_dir, secret):
            per_node.setdefault(node, []).append(inst)
    out: dict[str, Assignment] = {}
    for node, items in sorted(per_node.items()):
        env, secret_env = nodes.node_env(node) if spec.nodes else ({}, {})
        out[node] = Assignment(node=node, instances=sorted(items, key=lambda i: i.id),
                               env=env, secret_env=secret_env)
    return out


def build_router_config(spec: StackSpec, placements: Placements,
                        assignments: dict[str, Assignment]) -> RouterConfig:
    """The router.json every router host gets: one route per model (replicas may be
    empty: the router answers 503 until one is placed) and the API keys by hash."""
    mains = {inst.id: inst for a in assignments.values() for inst in a.instances
             if inst.role != "worker"}
    by_model: dict[str, list[Placement]] = {}
    for p in (*placements.placements, *placements.kept):
        by_model.setdefault(p.model, []).append(p)
    routes: list[RouteModel] = []
    for name in sorted(spec.models):
        model = spec.models[name]
        replicas = []
        kind: str = model.kind or "llm"
        for p in by_model.get(name, []):
            inst = mains.get(p.id)
            if inst is None:
                continue
            kind = model.kind or p.kind
            replicas.append(Replica(
                id=p.id, url=f"http://{_url_host(inst.host)}:{inst.port}",
                api_key=inst.api_key, weight=node_settings(spec, p.node).weight,
                health_path=model.health_path or HEALTH_PATHS.get(p.backend, "/health")))
        routes.append(RouteModel(name=name, aliases=list(model.aliases), kind=kind,
                                 replicas=replicas))
    r = spec.router
    return RouterConfig(
        listen=r.listen, workers=r.workers, tls_cert=r.tls_cert, tls_key=r.tls_key,
        timeouts=Timeouts(connect=r.timeouts.connect, first_byte=r.timeouts.first_byte,
                          idle=r.timeouts.idle),
        health=Health(), balancing=r.balancing, affinity=r.affinity,
        affinity_header=r.affinity_header, retries=r.retries, max_body_bytes=r.max_body_bytes,
        models=routes,
        keys=[Key(name=k.name, owner=k.owner, user=k.user, hash=k.hash, models=list(k.models),
                  rpm=k.rpm, tpm=k.tpm, expires=k.expires) for k in spec.keys],
        users=[User(name=name, models=list(u.models), rpm=u.rpm, tpm=u.tpm)
               for name, u in sorted(spec.users.items())],
        limits=Limits(store=r.limits.store, on_store_down=r.limits.on_store_down),
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def keyless_router_body(config: RouterConfig) -> dict[str, Any]:
    """A router config as JSON without the replicas' API keys (which need the stack
    secret, absent when planning in CI): what its fingerprints cover."""
    body = config.model_dump(mode="json")
    for route in body["models"]:
        for replica in route["replicas"]:
            replica.pop("api_key", None)
    return body


def router_config_sha256(config: RouterConfig) -> str:
    """Fingerprint of a router config without the replicas' API keys."""
    text = json.dumps(keyless_router_body(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
