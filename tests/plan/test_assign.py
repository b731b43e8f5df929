"""Assignments and the router config built from placements (stack/assign.py)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from stack.assign import build_assignments, build_router_config, router_config_sha256
from stack.plan import Plan
from stack.render import print_plan, render_plan
from stack.schedule import Placement, schedule
from stack.secrets import derive_key
from tests.schedule.cases_lib import load_evaluations, load_facts, load_stack

STACK = """\
[stack]
name = "lab"
prefix = "/srv/stack"

[nodes."gpu-02"]
address = "192.168.1.12"

[runtimes.vllm]
versions = ["0.11.0"]
source = "pip"
package = "vllm=={version}"
env = { VLLM_LOGGING_LEVEL = "WARNING" }

[models.big]
source = "hf://org/big"
distributed = true
args = ["--enable-prefix-caching"]
env = { HF_HUB_OFFLINE = "1" }
aliases = ["gpt-big"]

[models.tiny]
source = "local://models/tiny.gguf"
backend = "vllm"

[models.onhost]
source = "/data/models/onhost"
gpu_memory_utilization = 0.5
"""
FACTS = {"nodes": {
    "gpu-01": {"address": "10.0.0.11", "memory_bytes": 10**12, "disk_free_bytes": 10**13,
               "gpus": {"model": "l40s", "count": 2}},
    "gpu-02": {"address": "10.0.0.12", "memory_bytes": 10**12, "disk_free_bytes": 10**13,
               "gpus": {"model": "l40s", "count": 2}}}}
EVALUATIONS = {"big": {"weights": "150GiB", "overhead_per_gpu": "1GiB"},
               "tiny": {"weights": "1GiB"}, "onhost": {"weights": "2GiB"}}


def _build(secret: bytes | None):  # type: ignore[no-untyped-def]
    spec, _ = load_stack(STACK)
    facts = load_facts(FACTS)
    placements = schedule(spec, load_evaluations(EVALUATIONS), facts)
    return spec, placements, build_assignments(spec, placements, facts, Path("/ctl"), secret)


def test_distributed_replica_becomes_a_main_and_a_worker_that_know_each_other() -> None:
    _, _, assignments = _build(None)
    main = next(i for i in assignments["gpu-01"].instances if i.id == "big-0")
    worker = next(i for i in assignments["gpu-02"].instances if i.id == "big-0-w1")
    assert (main.role, worker.role) == ("main", "worker")
    assert [(p.node, p.host, p.port) for p in main.peers] == [("gpu-02", "192.168.1.12", 40000)]
    assert [(p.node, p.host) for p in worker.peers] == [("gpu-01", "10.0.0.11"),
                                                        ("gpu-02", "192.168.1.12")]
    assert main.host == "10.0.0.11" and worker.host == "192.168.1.12"
    assert main.runtime_path == "/srv/stack/runtimes/vllm/0.11.0"
    assert main.devices.vendor == "nvidia" and main.devices.indices == [0, 1]
    assert main.args == ["--enable-prefix-caching"]
    assert main.env == {"VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    assert main.model_path is None  # the agent resolves hub sources from its cache
    # 38.5 GiB of a 44.99 GiB L40S -> 0.86 after rounding up
    assert main.gpu_memory_utilization == 0.86


def test_model_paths_and_the_models_own_memory_fraction() -> None:
    _, _, assignments = _build(None)
    everything = {i.id: i for a in assignments.values() for i in a.instances}
    assert everything["tiny-0"].model_path == "/srv/stack/models/tiny/tiny.gguf"
    assert everything["onhost-0"].model_path == "/data/models/onhost"
    assert everything["onhost-0"].gpu_memory_utilization == 0.5


def test_api_keys_come_from_the_secret_and_stay_out_of_hashes() -> None:
    spec, placements, without = _build(None)
    _, _, with_keys = _build(b"s" * 32)
    inst = next(i for i in with_keys["gpu-01"].instances if i.id == "big-0")
    assert inst.api_key == derive_key(b"s" * 32, "instance:big-0")
    assert next(i for i in with_keys["gpu-02"].instances if i.id == "big-0-w1").api_key is None
    plain = next(i for i in without["gpu-01"].instances if i.id == "big-0")
    assert plain.api_key is None and plain.spec_hash() == inst.spec_hash()
    config = build_router_config(spec, placements, with_keys)
    route = next(m for m in config.models if m.name == "big")
    assert route.aliases == ["gpt-big"]
    assert [(r.id, r.url, r.api_key) for r in route.replicas] == [
        ("big-0", "http://10.0.0.11:40000", inst.api_key)]
    assert router_config_sha256(config) == router_config_sha256(
        build_router_config(spec, placements, without))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plan_is_plain_off_a_terminal_and_coloured_on_one() -> None:
    folder = Path(__file__).parent / "cases" / "add_model_and_new_version"
    import json

    plan = Plan.from_json(json.loads((folder / "plan.json").read_text()))
    plain, tty = io.StringIO(), _Terminal()
    print_plan(plan, plain)
    print_plan(plan, tty)
    assert plain.getvalue() == render_plan(plan) and "\x1b[" not in plain.getvalue()
    assert "\x1b[" in tty.getvalue()


def test_llama_cpp_split_reaches_the_main_instance_only() -> None:
    case = json.loads((Path(__file__).parents[1] / "schedule" / "cases" /
                       "llama_cpp_rpc_three_cpu_nodes_split_by_free_ram.json").read_text())
    spec, _ = load_stack(case["stack"])
    facts = load_facts(case["facts"])
    placements = schedule(spec, load_evaluations(case["evaluations"]), facts)
    assignments = build_assignments(spec, placements, facts, Path("/ctl"), None)
    main = assignments["cpu-01"].instances[0]
    workers = [assignments[n].instances[0] for n in ("cpu-02", "cpu-03")]
    assert main.role == "main" and main.layer_split == [27, 20, 13]
    assert [p.node for p in main.peers] == ["cpu-02", "cpu-03"]  # the split's order
    assert [w.layer_split for w in workers] == [None, None]
    # the plan JSON carries the split and each part's own claim back to apply
    again = [Placement.from_json(p.to_json()) for p in placements.placements]
    assert again == list(placements.placements)
    assert [w.claim.ram_bytes for w in again[0].workers if w.claim] == [21 * 2**30, 14 * 2**30]


def test_an_instance_without_a_split_keeps_its_fingerprint() -> None:
    _, _, assignments = _build(None)
    inst = assignments["gpu-01"].instances[0]
    assert inst.layer_split is None
    # the fields an instance had before splits, uploads and `from_env` values
    body = inst.model_dump(mode="json", exclude={"api_key", "layer_split", "source_sha256",
                                                 "secret_env"})
    assert inst.spec_hash() == hashlib.sha256(
        json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    split = inst.model_copy(update={"layer_split": [10, 22]})
    assert split.spec_hash() != inst.spec_hash()


def test_apply_fills_the_plans_keyless_assignments_with_the_keys_a_secret_gives() -> None:
    """Apply writes the plan's assignments (no keys) with the keys filled in; that is the
    same as building them with the secret, so the plan shows exactly what apply writes."""
    from stack.assign import with_api_keys

    secret = b"s" * 32
    _, _, keyless = _build(None)
    _, _, keyed = _build(secret)
    assert all(i.api_key is None for a in keyless.values() for i in a.instances)
    assert with_api_keys(keyless, secret) == keyed
    assert [i.id for a in keyed.values() for i in a.instances if i.api_key is None] == [
        "big-0-w1"]


def test_a_partial_offload_main_gets_ngl_for_the_layers_on_its_gpus() -> None:
    """The split's GPU layers + the output layer: llama.cpp offloads the last -ngl of
    layers + 1 slots, so the rest stays on the main's CPU; after the model's own args."""
    spec, _ = load_stack(STACK + '\n[runtimes."llama.cpp"]\nversions = ["b6700"]\nsource = "build"'
                         '\nurl = "https://github.com/ggml-org/llama.cpp/archive/{version}.tar.gz"'
                         '\n\n[models.gguf]\nsource = "hf://org/g-GGUF/g.gguf"\n'
                         'backend = "llama.cpp"\nargs = ["--jinja"]\n')
    facts = load_facts({"nodes": {"gpu-01": {
        "address": "10.0.0.11", "memory_bytes": 10**12, "disk_free_bytes": 10**13,
        "gpus": {"model": "rtx4090", "count": 1}}}})
    evaluations = load_evaluations({"gguf": {
        "weights": "30GiB", "kv": "1GiB", "overhead_per_gpu": "1GiB", "backends": ["llama.cpp"],
        "format": "gguf"}}, spec)
    spec = spec.model_copy(update={"models": {"gguf": spec.models["gguf"]}})
    placements = schedule(spec, evaluations, facts)
    (p,) = placements.placements
    assert p.cpu_layers == 9 and p.split == (23,)
    (inst,) = build_assignments(spec, placements, facts, Path("/ctl"), None)["gpu-01"].instances
    assert inst.args == ["--jinja", "-ngl", "24"]


def test_the_router_probes_sd_server_on_a_path_it_serves() -> None:
    """sd-server 0.4.7 answers 404 on /health (the replica would be ejected and image
    requests get 503); the router probes /v1/models, which it answers, unless the model
    sets its own health_path."""
    spec, _ = load_stack("""\
[stack]
name = "lab"
prefix = "/srv/stack"

[models.sd]
source = "/data/models/sd1-tiny"
kind = "image"
backend = "stable-diffusion.cpp"

[models.own]
source = "/data/models/sd1-other"
kind = "image"
backend = "stable-diffusion.cpp"
health_path = "/"
""")
    facts = load_facts({"nodes": {"gpu-01": {
        "address": "10.0.0.21", "memory_bytes": 10**11, "disk_free_bytes": 10**13,
        "gpus": {"model": "l40s", "count": 2}}}})
    placements = schedule(spec, load_evaluations(
        {name: {"weights": "1GiB", "kind": "image", "backends": ["stable-diffusion.cpp"],
                "vendors": {"stable-diffusion.cpp": ["nvidia"]}}
         for name in ("sd", "own")}), facts)
    assignments = build_assignments(spec, placements, facts, Path("/ctl"), None)
    config = build_router_config(spec, placements, assignments)
    paths = {m.name: [r.health_path for r in m.replicas] for m in config.models}
    assert paths == {"sd": ["/v1/models"], "own": ["/"]}


def test_a_nodes_weight_is_the_router_weight_of_the_replicas_it_runs() -> None:
    spec, _ = load_stack(STACK.replace('[nodes."gpu-02"]\n', '[nodes."gpu-02"]\nweight = 3\n')
                         .replace('backend = "vllm"\n', 'backend = "vllm"\nreplicas = 2\n', 1))
    facts = load_facts(FACTS)
    placements = schedule(spec, load_evaluations(EVALUATIONS), facts)
    config = build_router_config(spec, placements, build_assignments(
        spec, placements, facts, Path("/ctl"), None))
    nodes = {p.id: p.node for p in placements.placements}
    weights = {r.id: r.weight for m in config.models for r in m.replicas}
    assert {nodes["tiny-0"], nodes["tiny-1"]} == {"gpu-01", "gpu-02"}
    assert weights == {rid: 3 if nodes[rid] == "gpu-02" else 1 for rid in weights}


def test_users_keys_and_the_shared_store_reach_router_json() -> None:
    users = ('[users.alice]\nmodels = ["gpt-big"]\nrpm = 60\n\n[router.limits]\n'
             'store = "redis://10.0.0.5:6379/2"\non_store_down = "refuse"\n\n[[keys]]\n'
             'name = "laptop"\nuser = "alice"\nhash = "sha256:' + "0" * 64 + '"\n')
    spec, _ = load_stack(STACK + users)
    facts = load_facts(FACTS)
    placements = schedule(spec, load_evaluations(EVALUATIONS), facts)
    config = build_router_config(spec, placements, build_assignments(
        spec, placements, facts, Path("/ctl"), None))
    assert [(u.name, u.models, u.rpm, u.tpm) for u in config.users] == [
        ("alice", ["gpt-big"], 60, None)]
    assert [(k.name, k.user) for k in config.keys] == [("laptop", "alice")]
    assert (config.limits.store, config.limits.on_store_down) == (
        "redis://10.0.0.5:6379/2", "refuse")
    # without users or a store router.json keeps the bytes it had before they existed
    plain, _ = load_stack(STACK + '\n[[keys]]\nname = "ci"\nhash = "sha256:' + "1" * 64 + '"\n')
    body = build_router_config(plain, placements, build_assignments(
        plain, placements, facts, Path("/ctl"), None)).model_dump(mode="json")
    assert "users" not in body and "limits" not in body
    assert body["keys"] == [{"name": "ci", "owner": None, "hash": "sha256:" + "1" * 64,
                             "models": [], "rpm": None, "tpm": None, "expires": None}]
