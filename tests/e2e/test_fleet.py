"""The whole stack on a loopback fleet of three hosts, end to end, in order.

Two "GPU" hosts whose `nvidia-smi` prints recorded outputs of two different NVIDIA GPUs
(an H100 80GB and an L40S; the CPU build of llama.cpp just runs on the CPU there although
it is told `-ngl 99`), and one CPU host that runs the router and, pinned, the embedding
model. Gemma runs with two replicas, spread over the two GPU hosts; the same GGUF file is
also served for embeddings; one API key made with `stack keys create`.

1. `stack plan --detailed-exitcode` exits 2 with the expected changes and placements;
2. `stack apply` converges; the `openai` client gets chat completions (streaming and not)
   and embeddings through the router, whose `/metrics` counts the tokens per model and key;
3. the plan is clean and a second apply changes nothing (same agent, router, backend pids);
4. `kill -9` of a Gemma backend during 40 requests: the agent restarts it, none fails;
5. a stopped GPU host: requests still succeed, the plan names the host unreachable and
   moves its replica to the other GPU host, apply does it (exit 1, naming the host);
6. replicas 2 -> 1: one delete, one Gemma backend left;
7. `stack destroy`: no process of the stack is left on any host.

75-95 s on 2 cores (mostly the agent installs on three hosts and model loads).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, llama_runtime_toml, llama_sdist, run_stack
from openai import OpenAI

pytestmark = pytest.mark.integration

H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"
L40S = "nvidia/query-gpu-allfields_csv_l40s_595.80_linux.csv"
KEY_NAME = "fleet-test"
MiB = 1024**2


class World:
    """The fleet, the stack folder and what the steps learn along the way."""

    def __init__(self, fleet: Fleet, folder: Path, key: str, url: str) -> None:
        self.fleet = fleet
        self.dir = folder
        self.key = key
        self.url = url
        self.done = 0  # the last step that passed

    def needs(self, step: int) -> None:
        """Later steps build on the fleet state earlier ones leave."""
        if self.done < step:
            pytest.fail(f"step {step} did not pass; this step starts from its state")

    def stack(self, *args: str, timeout: float = 600) -> Any:
        return run_stack(*args, cwd=self.dir, timeout=timeout)

    def client(self) -> OpenAI:
        # no client retries: a request the router fails must fail the test
        return OpenAI(base_url=self.url, api_key=self.key, timeout=60, max_retries=0)

    def status(self, host: str) -> dict[str, Any]:
        """The agent's status file on `host` (what it last wrote)."""
        path = self.fleet.hosts[host].prefix / "state" / "status.json"
        body: dict[str, Any] = json.loads(path.read_text())
        return body

    def instances(self, host: str) -> dict[str, dict[str, Any]]:
        return {i["id"]: i for i in self.status(host)["instances"]}

    def agent_pid(self, host: str) -> int:
        path = self.fleet.hosts[host].prefix / "state" / "agent.pid"
        return int(json.loads(path.read_text())["pid"])

    def router_pid(self) -> int:
        return int((self.fleet.hosts["cpu-01"].prefix / "run" / "router.pid").read_text())

    def router_json(self) -> dict[str, Any]:
        path = self.fleet.hosts["cpu-01"].prefix / "etc" / "router.json"
        body: dict[str, Any] = json.loads(path.read_text())
        return body

    def edit(self, old: str, new: str) -> None:
        path = self.dir / "stack.toml"
        text = path.read_text()
        assert text.count(old) == 1, old
        path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[World]:
    cache = llama_bin.parent.parent.parent  # ~/.cache/modelstack (setup-llama-cpp's cache)
    sdist = llama_sdist(cache)
    work = tmp_path_factory.mktemp("e2e")
    fleet = Fleet(names=["gpu-01", "gpu-02", "cpu-01"], gpu_tools={"gpu-01": H100, "gpu-02": L40S},
                  root=work / "fleet")
    fleet.start()
    router = fleet.hosts["cpu-01"]
    port = fleet.free_port("cpu-01")
    low = random.randint(41000, 59000)
    (work / "stack.toml").write_text(f'''[stack]
name = "e2e"
port_range = [{low}, {low + 40}]

{fleet.inventory_toml()}
[nodes."cpu-*"]
cpu_inference = true

{llama_runtime_toml(sdist)}
[models.gemma]
source = "local://{gguf_model}"
backend = "llama.cpp"
replicas = 2
context = 512
args = ["-t", "1"]

[models.embed]
source = "local://{gguf_model}"
backend = "llama.cpp"
kind = "embedding"
context = 512
args = ["-t", "1"]
pin = {{ node = "cpu-01" }}

[router]
hosts = ["cpu-01"]
listen = "{router.address}:{port}"
''')
    made = run_stack("keys", "create", KEY_NAME, cwd=work)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    try:
        yield World(fleet, work, key, f"http://{router.address}:{port}/v1")
    finally:
        if fleet.stack_processes():
            run_stack("destroy", "--auto-approve", cwd=work, timeout=120)
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def metrics(world: World) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The router's `/metrics` samples by (name, labels)."""
    import httpx

    text = httpx.get(world.url.removesuffix("/v1") + "/metrics", timeout=10).text
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
        if line.startswith("#") or not match:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        out[(match.group(1), labels)] = float(match.group(3))
    return out


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples.get((f"modelstack_router_{name}", frozenset(labels.items())), 0.0)


def chat(client: OpenAI, text: str = "Say hello.") -> Any:
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": text}], max_tokens=8)
    assert reply.choices[0].message.content, reply
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8, reply.usage
    return reply


def request_loop(world: World, count: int, workers: int = 1) -> list[str]:
    """`count` chat completions, `workers` at a time (two keep both Gemma replicas busy:
    the router sends the second to the replica without an outstanding request). The
    errors, one line per failed request (empty when all succeeded)."""
    client = world.client()
    errors: list[str] = []
    numbers = iter(range(count))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            try:
                chat(client, f"Count to {i % 5 + 2}.")
            except Exception as exc:  # every failure is a finding
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return errors


def served(world: World, host: str, iid: str) -> int:
    """How many requests the backend of instance `iid` on `host` has processed (llama-server
    logs one `prompt eval time` line per task into the agent's instance log)."""
    path = world.fleet.hosts[host].prefix / "logs" / f"{iid}.log"
    return int(path.read_text(errors="replace").count("prompt eval time ="))


def gemma_backends(world: World) -> dict[int, str]:
    """pid -> command line of the running Gemma llama-servers of the stack."""
    return {pid: cmd for pid, cmd in world.fleet.stack_processes().items()
            if "llama-server" in cmd and "--alias gemma" in cmd}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass  # a status file being replaced
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# --------------------------------------------------------------------------- steps


def test_1_plan_shows_every_host_install_and_replica(world: World) -> None:
    result = world.stack("plan", "--detailed-exitcode", "--out", "plan.json")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Plan: 10 to add, 0 to change, 0 to destroy." in result.stdout
    plan = json.loads((world.dir / "plan.json").read_text())
    assert plan["summary"] == {"add": 10, "change": 0, "destroy": 0}
    changes = {c["address"]: c["action"] for c in plan["changes"]}
    assert changes == {
        **{f"node.{h}.agent": "create" for h in ("cpu-01", "gpu-01", "gpu-02")},
        **{f"node.{h}.runtime.llama.cpp@0.3.36": "create" for h in ("cpu-01", "gpu-01",
                                                                    "gpu-02")},
        "model.embed.replica[0]": "create",
        "model.gemma.replica[0]": "create",
        "model.gemma.replica[1]": "create",
        "router": "create",
    }
    placed = {(p["model"], p["replica"]): (p["node"], p["gpus"], p["vendor"],
                                           p["gpu_memory_bytes"], p["kind"], p["context"])
              for p in plan["placements"]}
    # spread over the two GPU hosts, each replica on its host's one (different) GPU
    assert placed == {
        ("embed", 0): ("cpu-01", [], "cpu", 0, "embedding", 512),
        ("gemma", 0): ("gpu-01", [0], "nvidia", 81559 * MiB, "llm", 512),
        ("gemma", 1): ("gpu-02", [0], "nvidia", 46068 * MiB, "llm", 512),
    }
    assert plan["unschedulable"] == [] and plan["routers"] == ["cpu-01"]
    world.done = 1


def test_2_apply_converges_and_serves_chat_and_embeddings_with_counted_tokens(
        world: World) -> None:
    world.needs(1)
    result = world.stack("apply", "--auto-approve")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Apply complete: 3 hosts converged." in result.stdout
    for host, ids in (("gpu-01", ["gemma-0"]), ("gpu-02", ["gemma-1"]), ("cpu-01", ["embed-0"])):
        instances = world.instances(host)
        assert sorted(instances) == ids, instances
        assert all(i["state"] == "ready" for i in instances.values()), instances
    # the GPU hosts' backends were told to use their NVIDIA GPU
    [gemma0] = [cmd for cmd in gemma_backends(world).values()
                if str(world.fleet.hosts["gpu-01"].prefix) in cmd]
    assert "-ngl 99" in gemma0 and "-c 512" in gemma0
    [pid] = [pid for pid, cmd in gemma_backends(world).items() if cmd == gemma0]
    assert b"CUDA_VISIBLE_DEVICES=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")

    client = world.client()
    first = chat(client)
    stream = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8, stream=True, stream_options={"include_usage": True})
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert usage is not None and 0 < usage.completion_tokens <= 8
    vectors = client.embeddings.create(model="embed", input=["a red apple", "a green tree"])
    assert len(vectors.data) == 2
    assert len(vectors.data[0].embedding) == 640  # Gemma 3 270M's embedding width
    assert vectors.data[0].embedding != vectors.data[1].embedding
    assert vectors.usage.prompt_tokens > 0
    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=world.url, api_key="sk-wrong", max_retries=0).models.list()

    samples = metrics(world)
    assert first.usage is not None
    want = {
        ("gemma", "prompt"): first.usage.prompt_tokens + usage.prompt_tokens,
        ("gemma", "completion"): first.usage.completion_tokens + usage.completion_tokens,
        ("embed", "prompt"): vectors.usage.prompt_tokens,
    }
    for (model, kind), n in want.items():
        assert sample(samples, "tokens_total", model=model, key=KEY_NAME, type=kind) == n, \
            (model, kind)
    assert sample(samples, "tokens_total", model="embed", key=KEY_NAME, type="completion") == 0
    assert sample(samples, "requests_total", model="gemma", key=KEY_NAME, status="2xx") == 2
    assert sample(samples, "requests_total", model="embed", key=KEY_NAME, status="2xx") == 1
    world.done = 2


def test_3_plan_is_clean_and_a_second_apply_changes_nothing(world: World) -> None:
    world.needs(2)
    plan = world.stack("plan", "--detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert plan.stdout.strip() == "No changes. The fleet matches stack.toml."
    hosts = ("gpu-01", "gpu-02", "cpu-01")
    before = ({h: world.agent_pid(h) for h in hosts}, world.router_pid(),
              {h: {i: s["pid"] for i, s in world.instances(h).items()} for h in hosts})
    backends = gemma_backends(world)
    result = world.stack("apply", "--auto-approve")
    assert result.returncode == 0, result.stdout + result.stderr
    for host in hosts:
        assert f"✓ {host}: no changes" in result.stdout
    assert "router: config written" not in result.stdout
    assert result.stdout.rstrip().endswith("No changes. The fleet matches stack.toml.")
    after = ({h: world.agent_pid(h) for h in hosts}, world.router_pid(),
             {h: {i: s["pid"] for i, s in world.instances(h).items()} for h in hosts})
    assert after == before
    assert gemma_backends(world) == backends and len(backends) == 2
    world.done = 3


def test_4_a_killed_backend_is_restarted_and_no_request_fails(world: World) -> None:
    world.needs(3)
    old = world.instances("gpu-01")["gemma-0"]
    before = metrics(world)
    killed: list[str] = []

    def kill() -> None:
        # SIGKILL while the router has a request outstanding on it: that one must be retried
        def busy() -> bool:
            return sample(metrics(world), "replica_in_flight", model="gemma",
                          replica="gemma-0") >= 1
        wait_for("a request on gemma-0", busy, timeout=60)
        os.kill(old["pid"], signal.SIGKILL)
        killed.append("yes")

    killer = threading.Thread(target=kill)
    killer.start()
    errors = request_loop(world, 40, workers=2)
    killer.join(timeout=60)
    assert killed, "the backend was not killed during the requests"
    assert errors == []
    wait_for("gemma-0 to be restarted and ready", lambda: (
        (new := world.instances("gpu-01")["gemma-0"])["state"] == "ready"
        and new["pid"] not in (None, old["pid"])))
    new = world.instances("gpu-01")["gemma-0"]
    assert new["restarts"] == old["restarts"] + 1
    assert not Path(f"/proc/{old['pid']}").exists()
    cmdline = Path(f"/proc/{new['pid']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].endswith(b"/llama-server") and b"gemma" in cmdline
    after = metrics(world)
    for status in ("2xx", "4xx", "5xx"):
        got = sample(after, "requests_total", model="gemma", key=KEY_NAME, status=status) \
            - sample(before, "requests_total", model="gemma", key=KEY_NAME, status=status)
        assert got == (40 if status == "2xx" else 0), status
    # the request cut off on gemma-0 was sent to gemma-1 (before its first byte)
    assert sample(after, "retries_total", model="gemma") \
        > sample(before, "retries_total", model="gemma")
    # the restarted backend serves again: two at a time reach both replicas
    wait_for("the router to take gemma-0 again", lambda: sample(
        metrics(world), "replica_up", model="gemma", replica="gemma-0") == 1, timeout=30)
    count = served(world, "gpu-01", "gemma-0")
    assert request_loop(world, 6, workers=2) == []
    assert served(world, "gpu-01", "gemma-0") > count
    world.done = 4


def test_5_a_stopped_host_is_named_and_its_replica_moves_to_the_other_gpu_host(
        world: World) -> None:
    world.needs(4)
    fleet = world.fleet
    gpu02 = fleet.hosts["gpu-02"]
    fleet.stop_host("gpu-01")
    assert not any(str(fleet.hosts["gpu-01"].prefix) in cmd
                   for cmd in fleet.stack_processes().values())
    assert request_loop(world, 10) == []  # gemma-1 on gpu-02 serves

    plan = world.stack("plan", "--detailed-exitcode", "--out", "plan.json")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    gpu01 = fleet.hosts["gpu-01"]
    assert f"  ! host `gpu-01` ({gpu01.address}:{gpu01.port}) is unreachable: " in plan.stdout
    assert "  # model.gemma.replica[0] will be created (not running on a reachable node; " \
        "gpu-01 is unreachable)" in plan.stdout
    body = json.loads((world.dir / "plan.json").read_text())
    assert [u["node"] for u in body["unreachable"]] == ["gpu-01"]
    [moved] = [p for p in body["placements"] if (p["model"], p["replica"]) == ("gemma", 0)]
    assert (moved["node"], moved["gpus"]) == ("gpu-02", [0])
    changes = {c["address"]: c["action"] for c in body["changes"]}
    assert changes == {"model.gemma.replica[0]": "create", "router.models": "update"}, changes
    assert "Plan: 1 to add, 1 to change, 0 to destroy." in plan.stdout

    result = world.stack("apply", "--auto-approve")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "✗ gpu-01: host `gpu-01`" in result.stdout and "is unreachable" in result.stdout
    assert "✓ gpu-02:" in result.stdout and "✓ cpu-01:" in result.stdout
    assert "Apply failed on 1 of 3 hosts." in result.stdout
    on_gpu02 = world.instances("gpu-02")
    assert sorted(on_gpu02) == ["gemma-0", "gemma-1"]
    assert all(i["state"] == "ready" for i in on_gpu02.values()), on_gpu02
    [route] = [m for m in world.router_json()["models"] if m["name"] == "gemma"]
    assert sorted(r["url"] for r in route["replicas"]) == sorted(
        f"http://{gpu02.address}:{on_gpu02[i]['port']}" for i in ("gemma-0", "gemma-1"))
    count = {i: served(world, "gpu-02", i) for i in ("gemma-0", "gemma-1")}
    assert request_loop(world, 10, workers=2) == []
    # both replicas on gpu-02 served: the moved one too
    assert all(served(world, "gpu-02", i) > n for i, n in count.items()), count
    world.done = 5


def test_6_one_replica_less_deletes_one_backend(world: World) -> None:
    world.needs(5)
    world.edit("replicas = 2", "replicas = 1")
    plan = world.stack("plan", "--detailed-exitcode", "--out", "plan.json")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    body = json.loads((world.dir / "plan.json").read_text())
    deletes = [c for c in body["changes"] if c["action"] == "delete"]
    assert [(c["address"], c["node"]) for c in deletes] == [("model.gemma.replica[1]", "gpu-02")]
    assert {c["address"] for c in body["changes"]} == {"model.gemma.replica[1]", "router.models"}
    assert "# model.gemma.replica[1] will be destroyed (`models.gemma.replicas` is 1)" \
        in plan.stdout
    result = world.stack("apply", "--auto-approve")
    assert result.returncode == 1, result.stdout + result.stderr  # gpu-01 is still down
    assert "Apply failed on 1 of 3 hosts." in result.stdout
    assert "gpu-02: gemma-1 is stopped" in result.stdout
    # apply returns once the agent stopped it
    [cmd] = gemma_backends(world).values()
    assert str(world.fleet.hosts["gpu-02"].prefix) in cmd
    assert [i["id"] for i in world.status("gpu-02")["instances"]] == ["gemma-0"]
    [route] = [m for m in world.router_json()["models"] if m["name"] == "gemma"]
    assert [r["id"] for r in route["replicas"]] == ["gemma-0"]
    # converged: nothing is left to do on the reachable hosts
    again = world.stack("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.rstrip().endswith(
        "No changes on the reachable hosts, but some hosts cannot be reached."), again.stdout
    assert chat(world.client())
    world.done = 6


def test_7_destroy_leaves_no_process_of_the_stack(world: World) -> None:
    world.needs(6)
    running = " ".join(world.fleet.stack_processes().values())
    for what in ("supervise-agent.sh", "stack-agent", "supervise-router.sh", "stack-router",
                 "llama-server"):
        assert what in running, what  # so that "none left" below means something
    result = world.stack("destroy", "--auto-approve", timeout=180)
    assert "✓ gpu-02: stopped" in result.stdout and "✓ cpu-01: stopped" in result.stdout
    assert "✗ gpu-01:" in result.stdout and result.returncode == 1  # still unreachable
    wait_for("no process of the stack", lambda: world.fleet.stack_processes() == {},
             timeout=15)
    world.done = 7
