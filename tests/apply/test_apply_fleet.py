"""`stack apply` over real SSH on a loopback fleet of two hosts, in order:

1. apply installs the agent (wheel + wheelhouse, no index), the llama.cpp runtime (the
   controller's prebuilt `bin/` for the same sdist, args and platform), uploads the model,
   starts the router; a chat completion through the router with the `openai` client;
2. a second apply changes nothing and `stack plan --detailed-exitcode` exits 0;
3. a changed model setting replaces the instance and the plan is clean again;
4. with one host stopped, apply exits 1 naming it while the other converges;
5. `stack status --json` and `stack logs`; `stack destroy` stops every process.

About 60-90 s on 2 cores (mostly the agent venv install on two hosts and the model load).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet  # tests/ is on sys.path (tests/conftest.py)

from stack.secrets import generate_key, hash_key

ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / ".venv" / "bin" / "stack")
SDIST_VERSION = "0.3.36"

pytestmark = pytest.mark.integration


def _sdist(cache: Path) -> Path:
    """The llama-cpp-python sdist (the `build` source), fetched once like setup-llama-cpp."""
    folder = cache / "sdist"
    path = folder / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "-d", str(folder),
                        f"llama-cpp-python=={SDIST_VERSION}"], check=True, timeout=600)
    return path


def stack(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STACK, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NO_COLOR": "1",
                                                "COLUMNS": "200"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    cache = llama_bin.parent.parent.parent  # ~/.cache/modelstack (setup-llama-cpp's cache)
    sdist = _sdist(cache)
    work = tmp_path_factory.mktemp("apply")
    fleet = Fleet(2, root=work / "fleet")
    fleet.start()
    key = generate_key()
    router = fleet.hosts["node-01"]
    with __import__("socket").socket() as sock:
        sock.bind((router.address, 0))
        port = sock.getsockname()[1]
    low = random.randint(41000, 59000)
    (work / "stack.toml").write_text(f'''
[stack]
name = "applytest"
port_range = [{low}, {low + 40}]

{fleet.inventory_toml()}
[nodes."*"]
cpu_inference = true

[runtimes."llama.cpp"]
source = "build"
versions = ["{SDIST_VERSION}"]
url = "local://{sdist}"
subdir = "vendor/llama.cpp"
cmake_args = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DGGML_RPC=ON"]
targets = ["llama-server", "ggml-rpc-server"]

[models.gemma]
source = "local://{gguf_model}"
backend = "llama.cpp"
context = 1024
args = ["-t", "1"]

[router]
hosts = ["node-01"]
listen = "{router.address}:{port}"

[[keys]]
name = "test"
hash = "{hash_key(key)}"
''')
    env = {"STACK_SECRET": "apply-test-secret-0123456789abcdef"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"fleet": fleet, "dir": work, "key": key,
               "url": f"http://{router.address}:{port}/v1"}
    finally:
        stack("destroy", "--auto-approve", cwd=work, timeout=120)
        fleet.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


def test_1_apply_installs_everything_and_serves_through_the_router(world: dict[str, Any]) -> None:
    result = stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node-01: runtime llama.cpp 0.3.36, agent-install" in result.stdout
    assert "Apply complete: 2 hosts converged." in result.stdout
    prefix = world["fleet"].hosts["node-01"].prefix
    runtime = prefix / "runtimes" / "llama.cpp" / SDIST_VERSION
    assert (runtime / "bin" / "llama-server").exists()
    assert (runtime / ".installed").exists()
    assert (prefix / "agent" / ".installed").read_text().strip() == "0.1.0"
    assert oct((prefix / "etc" / "agent.token").stat().st_mode & 0o777) == "0o600"
    assert oct((prefix / "etc" / "router.json").stat().st_mode & 0o777) == "0o600"

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_2_second_apply_changes_nothing_and_plan_is_clean(world: dict[str, Any]) -> None:
    result = stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node-01: no changes" in result.stdout
    assert "node-02: no changes" in result.stdout
    assert result.stdout.rstrip().endswith("No changes. The fleet matches stack.toml.")
    plan = stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_3_a_changed_model_is_replaced_and_the_plan_is_clean_again(
        world: dict[str, Any]) -> None:
    path = world["dir"] / "stack.toml"
    path.write_text(path.read_text().replace("context = 1024", "context = 1536"))
    result = stack("apply", "--auto-approve", "--max-unavailable", "1", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ node-01: assignment" in result.stdout
    assert "node-01: gemma-0 is ready" in result.stdout
    plan = stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_4_a_stopped_host_fails_by_name_while_the_other_converges(
        world: dict[str, Any]) -> None:
    fleet: Fleet = world["fleet"]
    fleet.stop_host("node-02")
    try:
        result = stack("apply", "--auto-approve", cwd=world["dir"])
        assert result.returncode == 1
        assert "✗ node-02: host `node-02`" in result.stdout
        assert "is unreachable" in result.stdout
        assert "✓ node-01:" in result.stdout
        assert "Apply failed on 1 of 2 hosts." in result.stdout
        # the lock was released: the next apply is not refused
        assert not (world["dir"] / ".stack" / "lock").exists()
    finally:
        fleet.start_host("node-02")
    again = stack("apply", "--auto-approve", cwd=world["dir"])
    assert again.returncode == 0, again.stdout + again.stderr


def test_5_status_logs_and_destroy(world: dict[str, Any]) -> None:
    status = stack("status", "--json", cwd=world["dir"])
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    [inst] = body["nodes"]["node-01"]["instances"]
    assert inst["id"] == "gemma-0" and inst["state"] == "ready"
    assert body["routers"]["node-01"]["up"] is True
    logs = stack("logs", "gemma", "--tail", "5", cwd=world["dir"])
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    destroy = stack("destroy", "--auto-approve", cwd=world["dir"])
    assert destroy.returncode == 0, destroy.stdout + destroy.stderr
    prefix = world["fleet"].hosts["node-01"].prefix
    assert not (prefix / "run" / "agent.supervisor.pid").exists()
    assert not (prefix / "run" / "router.supervisor.pid").exists()
    out = subprocess.run(["pgrep", "-f", str(prefix)], capture_output=True, text=True)
    assert out.stdout.strip() == ""
