"""Backend command builders: pure functions from an `Instance` to a `Launch`.

Each builder returns the argv, the environment to add to the agent's (the devices', then
`Instance.environment()`: the node's and the model's `env`), the health check, and the
files to write before the start (API key files, generated configs). Nothing here touches
the disk, the clock or the environment; the runner does that.

Runtime layout (`instance.runtime_path`, e.g. `PREFIX/runtimes/llama.cpp/b6700`):
binaries under `RUNTIME/bin/` (`llama-server`, `ggml-rpc-server` or `rpc-server`,
`sd-server`, `mindieservice_daemon`), pip runtimes as a venv at `RUNTIME/`
(`RUNTIME/bin/vllm`, `RUNTIME/bin/python`, `RUNTIME/bin/ray`, `RUNTIME/bin/vox-box`).
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from agent.assignment import Instance
from agent.errors import CommandError
from agent.mindie_config import rank_table, service_config

# device selection by environment, per vendor (docs/agent.md, "Backends")
DEVICE_ENV: dict[str, tuple[str, ...]] = {
    "nvidia": ("CUDA_VISIBLE_DEVICES",),
    "amd": ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"),
    "hygon": ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"),
    "ascend": ("ASCEND_RT_VISIBLE_DEVICES",),
    "mthreads": ("MUSA_VISIBLE_DEVICES",),
    "iluvatar": ("CUDA_VISIBLE_DEVICES",),
    "cambricon": ("MLU_VISIBLE_DEVICES",),
}


@dataclass(frozen=True)
class Health:
    """How to tell the backend is serving: `http` GET of `path`, `tcp` connect, or `process`."""

    kind: str
    path: str = ""


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one backend process."""

    argv: list[str]
    env: dict[str, str]
    health: Health
    files: dict[str, str] = field(default_factory=dict)  # path -> content, written 0600
    stop_argv: list[str] = field(default_factory=list)  # run after the process group stops

    def as_json(self) -> dict[str, object]:
        return {"argv": self.argv, "env": self.env,
                "health": {"kind": self.health.kind, "path": self.health.path},
                "files": self.files, "stop_argv": self.stop_argv}


@dataclass(frozen=True)
class Context:
    """Host-side values a builder needs: where the model is and the instance's own folder."""

    model_path: str
    instance_dir: str  # PREFIX/state/instances; files for this instance go here


def device_env(inst: Instance) -> dict[str, str]:
    """The visible-devices variables for the instance's vendor (none for cpu and apple)."""
    names = DEVICE_ENV.get(inst.devices.vendor, ())
    value = ",".join(str(i) for i in inst.devices.indices)
    return {name: value for name in names}


def _gpu_count(inst: Instance) -> int:
    return len(inst.devices.indices) if inst.devices.vendor != "cpu" else 0


def _bin(inst: Instance, name: str) -> str:
    return str(PurePosixPath(inst.runtime_path) / "bin" / name)


def _peer_addrs(inst: Instance) -> list[str]:
    return [f"{p.host}:{p.port}" for p in inst.peers]


def _health(inst: Instance, default: Health) -> Health:
    return Health("http", inst.health_path) if inst.health_path else default


def _key_file(inst: Instance, ctx: Context) -> str:
    return str(PurePosixPath(ctx.instance_dir) / f"{inst.id}.key")


def _sidecar(inst: Instance, ctx: Context, suffix: str) -> str:
    return str(PurePosixPath(ctx.instance_dir) / f"{inst.id}{suffix}")


def _relative_to_model(ctx: Context, path: str) -> str:
    if PurePosixPath(path).is_absolute():
        return path
    base = PurePosixPath(ctx.model_path)
    folder = base.parent if base.suffix else base
    return str(folder / path)


def build_llama_cpp(inst: Instance, ctx: Context) -> Launch:
    """`llama-server` (single or RPC main) or its `ggml-rpc-server` worker."""
    env = {"LD_LIBRARY_PATH": f"{inst.runtime_path}/bin:{inst.runtime_path}/lib",
           **device_env(inst)}
    if inst.role == "worker":
        argv = [_bin(inst, "ggml-rpc-server"), "-H", inst.host, "-p", str(inst.port), *inst.args]
        return Launch(argv, {**env, **inst.environment()}, _health(inst, Health("tcp")))
    argv = [_bin(inst, "llama-server"), "-m", ctx.model_path, "--host", inst.host,
            "--port", str(inst.port), "--alias", inst.model]
    files: dict[str, str] = {}
    if inst.api_key:
        files[_key_file(inst, ctx)] = inst.api_key + "\n"
        argv += ["--api-key-file", _key_file(inst, ctx)]
    if inst.context:
        argv += ["-c", str(inst.context)]
    gpus = _gpu_count(inst)
    if inst.layer_split is not None:
        argv += _layer_split_args(inst, inst.layer_split)
    else:
        offload = gpus > 0 or (inst.role == "main" and inst.peers)
        argv += ["-ngl", "99" if offload else "0"]
        if gpus > 1:
            argv += ["--tensor-split", ",".join("1" for _ in range(gpus))]
    if inst.role == "main":
        if not inst.peers:
            raise CommandError(f"instance `{inst.id}` has role main but no `peers`",
                               hint="list its rpc-server workers as peers, or use role single.")
        argv += ["--rpc", ",".join(_peer_addrs(inst))]
    if inst.kind == "embedding":
        argv += ["--embeddings", "--pooling", "mean"]
    elif inst.kind == "rerank":
        argv += ["--reranking"]
    if inst.mmproj:
        argv += ["--mmproj", _relative_to_model(ctx, inst.mmproj)]
    argv += ["--metrics", *inst.args]  # the engine metrics the agent scrapes
    return Launch(argv, {**env, **inst.environment()}, _health(inst, Health("http", "/health")),
                  files)


def _layer_split_args(inst: Instance, split: list[int]) -> list[str]:
    """`-ngl` and `--tensor-split` that put exactly the scheduler's layers on each device.

    `split` lists this node's devices first (its GPUs, or one entry: the layers its CPU
    keeps), then the RPC workers' devices in `--rpc` order. llama.cpp orders devices the
    other way round: "add RPC servers at the front of the list to minimize network
    transfers", then the local GPUs; the CPU is never one (`llama_model_load_from_file_impl`
    in src/llama.cpp, default device selection). Its loader (`load_tensors` in
    src/llama-model.cpp) offloads the last `n_gpu_layers` of `n_layer + 1` slots, the
    output layer being the last slot, and gives slot `i` to the first device whose
    cumulative `--tensor-split` fraction exceeds `i / n_gpu_layers`. So whole-layer counts,
    with the output slot added to the last device, land exactly. Args from stack.toml come
    later on the command line and win.
    """
    local = max(_gpu_count(inst), 1)
    remote = split[local:]
    if len(split) < local or min(split, default=0) < 0 or (
            len(remote) < len(inst.peers) if inst.role == "main" else remote):
        raise CommandError(
            f"instance `{inst.id}` has a `layer_split` of {len(split)} entries for {local} "
            f"local device(s) and {len(inst.peers) if inst.role == 'main' else 0} RPC worker(s)",
            hint="list this node's devices first, then each worker's, at least one each.")
    on_cpu = 0 if _gpu_count(inst) else split[0]
    devices = [*remote, *split[:local]] if _gpu_count(inst) else remote
    if not devices:
        return ["-ngl", "0"]
    shares = [*devices[:-1], devices[-1] + 1]
    slots = sum(split) + 1 - on_cpu
    ngl = slots if on_cpu else max(slots, 99)
    return ["-ngl", str(ngl), "--tensor-split", ",".join(str(n) for n in shares)]


def _ray_head_port(port: int) -> int:
    # the Ray head listens one above the main instance's API port (documented contract)
    return port + 1


def _ray_worker(inst: Instance) -> Launch:
    if not inst.peers:
        raise CommandError(f"instance `{inst.id}` has role worker but no `peers`",
                           hint="its first peer must be the main instance (the Ray head).")
    head = inst.peers[0]
    argv = [_bin(inst, "ray"), "start", "--block", "--disable-usage-stats",
            f"--address={head.host}:{_ray_head_port(head.port)}",
            f"--node-ip-address={inst.host}", *inst.args]
    return Launch(argv, {**device_env(inst), **inst.environment()}, Health("process"))


def _with_ray_head(inst: Instance, serve: list[str]) -> tuple[list[str], list[str]]:
    ray = _bin(inst, "ray")
    start = [ray, "start", "--head", f"--port={_ray_head_port(inst.port)}",
             f"--node-ip-address={inst.host}", "--disable-usage-stats"]
    script = f"{shlex.join(start)} && exec {shlex.join(serve)}"
    return ["/bin/sh", "-c", script], [ray, "stop"]


def build_vllm(inst: Instance, ctx: Context) -> Launch:
    """`vllm serve`; several nodes through a Ray head (main) and Ray workers."""
    if inst.role == "worker":
        return _ray_worker(inst)
    argv = [_bin(inst, "vllm"), "serve", ctx.model_path, "--served-model-name", inst.model,
            "--host", inst.host, "--port", str(inst.port)]
    if inst.context:
        argv += ["--max-model-len", str(inst.context)]
    gpus = _gpu_count(inst)
    if gpus > 1:
        argv += ["--tensor-parallel-size", str(gpus)]
    if inst.role == "main":
        argv += ["--pipeline-parallel-size", str(len(inst.peers) + 1),
                 "--distributed-executor-backend", "ray"]
    if inst.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{inst.gpu_memory_utilization:g}"]
    argv += inst.args
    env = {**device_env(inst)}
    if inst.api_key:
        env["VLLM_API_KEY"] = inst.api_key  # kept out of the process list
    health = _health(inst, Health("http", "/health"))
    if inst.role == "main":
        wrapped, stop = _with_ray_head(inst, argv)
        return Launch(wrapped, {**env, **inst.environment()}, health, stop_argv=stop)
    return Launch(argv, {**env, **inst.environment()}, health)


def build_sglang(inst: Instance, ctx: Context) -> Launch:
    """`python -m sglang.launch_server`; several nodes with `--nnodes`/`--node-rank`.

    A main's peers are its workers in rank order; a worker's peers are the main followed
    by every worker in rank order (itself included), so it can find its own rank.
    """
    argv = [_bin(inst, "python"), "-m", "sglang.launch_server", "--model-path", ctx.model_path,
            "--served-model-name", inst.model, "--host", inst.host, "--port", str(inst.port)]
    if inst.api_key:
        argv += ["--api-key", inst.api_key]
    gpus = _gpu_count(inst)
    if gpus > 1 or inst.role != "single":
        nodes = {"single": 1, "main": len(inst.peers) + 1}.get(inst.role, len(inst.peers))
        argv += ["--tp-size", str(max(gpus, 1) * nodes)]
    if inst.context:
        argv += ["--context-length", str(inst.context)]
    if inst.gpu_memory_utilization is not None:
        argv += ["--mem-fraction-static", f"{inst.gpu_memory_utilization:g}"]
    health = _health(inst, Health("http", "/health"))
    if inst.role == "main":
        init = f"{inst.host}:{inst.port + 1}"
        argv += ["--nnodes", str(len(inst.peers) + 1), "--node-rank", "0",
                 "--dist-init-addr", init]
    elif inst.role == "worker":
        me = [i for i, p in enumerate(inst.peers[1:], 1)
              if (p.host, p.port) == (inst.host, inst.port)]
        if not inst.peers or not me:
            raise CommandError(
                f"sglang worker `{inst.id}` is not listed in its own `peers`",
                hint="a worker's peers are the main, then all workers in rank order.")
        main = inst.peers[0]
        argv += ["--nnodes", str(len(inst.peers)), "--node-rank", str(me[0]),
                 "--dist-init-addr", f"{main.host}:{main.port + 1}"]
        health = Health("process")
    if inst.role != "worker":  # the engine metrics the agent scrapes (not from workers)
        argv += ["--enable-metrics"]
    argv += inst.args
    return Launch(argv, {**device_env(inst), **inst.environment()}, health)


def build_vox_box(inst: Instance, ctx: Context) -> Launch:
    """`vox-box start` for speech-to-text and text-to-speech models."""
    # the visible-devices variable renumbers the chosen GPU as 0
    device = "cuda:0" if _gpu_count(inst) else "cpu"
    argv = [_bin(inst, "vox-box"), "start", "--model", ctx.model_path,
            "--data-dir", _sidecar(inst, ctx, ".data"), "--host", inst.host,
            "--port", str(inst.port), "--device", device, *inst.args]
    return Launch(argv, {**device_env(inst), **inst.environment()},
                  _health(inst, Health("http", "/health")))


def build_stable_diffusion_cpp(inst: Instance, ctx: Context) -> Launch:
    """stable-diffusion.cpp's `sd-server` for image generation."""
    # a model that comes without its text encoders is a diffusion model alone (FLUX, SD3)
    alone = bool(inst.components.keys() & {"clip_l", "clip_g", "t5xxl", "llm"})
    argv = [_bin(inst, "sd-server"), "--diffusion-model" if alone else "-m", ctx.model_path]
    for part, path in sorted(inst.components.items()):
        argv += [f"--{part}", _relative_to_model(ctx, path)]
    argv += ["--listen-ip", inst.host, "--listen-port", str(inst.port), *inst.args]
    env = {"LD_LIBRARY_PATH": f"{inst.runtime_path}/bin:{inst.runtime_path}/lib",
           **device_env(inst)}
    # sd-server serves no /health (404); /v1/models answers 200 once the model is loaded
    return Launch(argv, {**env, **inst.environment()},
                  _health(inst, Health("http", "/v1/models")))


def build_mindie(inst: Instance, ctx: Context) -> Launch:
    """MindIE's service daemon with a generated config (`agent.mindie_config`: management
    port = port + 1, metrics port = port + 2); over several nodes every part runs it with
    the same rank table, on port + 3 between the nodes."""
    config = service_config(inst, ctx.model_path)
    path = _sidecar(inst, ctx, ".mindie.json")
    env = {**device_env(inst), "MIES_CONFIG_JSON_PATH": path, **inst.environment()}
    health = _health(inst, Health("http", "/info"))
    files: dict[str, str] = {}
    if inst.role != "single":
        table = _sidecar(inst, ctx, ".ranktable.json")
        files[table] = json.dumps(rank_table(inst), indent=2, sort_keys=True) + "\n"
        # which of the rank table's servers this node is
        env = {**env, "RANKTABLEFILE": table,
               "MIES_CONTAINER_IP": str(ipaddress.ip_address(inst.host))}
        if inst.role == "worker":
            health = Health("process")  # only the main node serves requests
    files[path] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return Launch([_bin(inst, "mindieservice_daemon"), *inst.args], env, health, files)


def build_custom(inst: Instance, ctx: Context) -> Launch:
    """A command template: split first, then fill each word, so a value is never split
    or interpreted by a shell."""
    if not inst.command:
        raise CommandError(f"custom instance `{inst.id}` has no `command`",
                           hint="set a template like `my-server --port {port} {model_path}`.")
    values = {"model_path": ctx.model_path, "port": str(inst.port), "host": inst.host,
              "name": inst.model, "api_key": inst.api_key or ""}
    try:
        words = shlex.split(inst.command)
        argv = [w.format(**values) for w in words]
    except (ValueError, KeyError, IndexError) as exc:
        raise CommandError(
            f"custom instance `{inst.id}` has a bad `command` template: {exc}",
            hint="use only {model_path} {port} {host} {name} {api_key}; write {{ }} for braces.",
        ) from exc
    if argv and not argv[0].startswith("/"):
        argv[0] = _bin(inst, argv[0])
    return Launch(argv + inst.args, {**device_env(inst), **inst.environment()},
                  _health(inst, Health("tcp")))


BUILDERS: dict[str, Callable[[Instance, Context], Launch]] = {
    "llama.cpp": build_llama_cpp,
    "vllm": build_vllm,
    "sglang": build_sglang,
    "vox-box": build_vox_box,
    "stable-diffusion.cpp": build_stable_diffusion_cpp,
    "mindie": build_mindie,
    "custom": build_custom,
}


def build_launch(inst: Instance, ctx: Context) -> Launch:
    """The launch for an instance, or `CommandError` saying what is wrong with it."""
    builder = BUILDERS.get(inst.backend)
    if builder is None:
        raise CommandError(
            f"instance `{inst.id}` has unknown backend `{inst.backend}`",
            hint=f"use one of {', '.join(sorted(BUILDERS))}.")
    return builder(inst, ctx)
