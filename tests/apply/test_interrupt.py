"""Interrupting `stack apply` leaves every host consistent, and the next apply finishes
the job (loopback fleet of two hosts, first install).

- Ctrl-C (SIGINT) while the agent is being installed: apply finishes the steps in
  progress, starts no new one, releases its locks and exits 130; no command of it keeps
  running on a host.
- SIGKILL while the model is being uploaded: the locks stay, the next apply is refused
  naming the lock ID and `stack force-unlock ID`, which removes them.

Either way no runtime, agent or model is marked installed without being complete, and
the next apply converges: the instance is ready, a chat completion goes through the
router, and `stack plan --detailed-exitcode` exits 0. About 40 s each.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleet import (
    LLAMA_SDIST_VERSION,
    STACK_CLI,
    Fleet,
    gemma_stack_toml,
    llama_sdist,
    run_stack,
)

from stack.apply.interrupt import Interrupt
from stack.secrets import generate_key, hash_key


@dataclass
class World:
    fleet: Fleet
    dir: Path
    url: str
    key: str
    model: Path
    llama_bin: Path


@pytest.fixture
def world(tmp_path: Path, llama_bin: Path, gguf_model: Path) -> Iterator[World]:
    sdist = llama_sdist(llama_bin.parent.parent.parent)  # ~/.cache/modelstack
    key = generate_key()
    with Fleet(2, root=tmp_path / "fleet") as fleet:
        text, url = gemma_stack_toml(fleet, "interrupttest", gguf_model, sdist, hash_key(key))
        (tmp_path / "stack.toml").write_text(text)
        try:
            yield World(fleet, tmp_path, url, key, gguf_model, llama_bin)
        finally:
            run_stack("destroy", "--auto-approve", cwd=tmp_path, timeout=120)


def _start_apply(work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([str(STACK_CLI), "apply", "--auto-approve"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
                            start_new_session=True)


def _when(proc: subprocess.Popen[str], seen: Callable[[], bool], what: str,
          timeout: float = 120) -> None:
    """Wait until `seen()` (polled), failing if apply ends first."""
    deadline = time.monotonic() + timeout
    while not seen():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"apply ended before {what}: {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _assert_nothing_half_installed(world: World) -> None:
    """Whatever is marked installed is complete (temporary folders may remain)."""
    want_bin = {p.name: p.stat().st_size for p in world.llama_bin.iterdir() if p.is_file()}
    model_sha = _sha256(world.model)
    for host in world.fleet.hosts.values():
        for marker in (host.prefix / "runtimes").glob("*/*/.installed"):
            have = {p.name: p.stat().st_size for p in (marker.parent / "bin").iterdir()
                    if p.is_file()}
            assert have == want_bin, f"{marker} marks an incomplete runtime"
        agent = host.prefix / "agent"
        if (agent / ".installed").exists():
            check = subprocess.run([str(agent / "venv" / "bin" / "stack-agent"), "--help"],
                                   capture_output=True, text=True, check=False)
            assert check.returncode == 0, f"{agent} is marked installed: {check.stderr}"
        for sidecar in (host.prefix / "models").glob("*/*.sha256"):
            model = sidecar.with_suffix("")
            assert sidecar.read_text().strip() == model_sha == _sha256(model), sidecar


def _assert_next_apply_finishes_the_job(world: World) -> None:
    again = run_stack("apply", "--auto-approve", cwd=world.dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Apply complete: 2 hosts converged." in again.stdout
    status = json.loads(run_stack("status", "--json", cwd=world.dir).stdout)
    [(node, state)] = [(n, i["state"]) for n, body in status["nodes"].items()
                       for i in body["instances"]]
    assert state == "ready"
    runtime = world.fleet.hosts[node].prefix / "runtimes" / "llama.cpp" / LLAMA_SDIST_VERSION
    assert (runtime / ".installed").exists()
    _assert_nothing_half_installed(world)

    from openai import OpenAI

    client = OpenAI(base_url=world.url, api_key=world.key, timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content
    plan = run_stack("plan", "--detailed-exitcode", cwd=world.dir)
    assert plan.returncode == 0, plan.stdout + plan.stderr


def _host_locks(world: World) -> list[Path]:
    return [h.prefix / "state" / "apply.lock" for h in world.fleet.hosts.values()
            if (h.prefix / "state" / "apply.lock").exists()]


def test_the_first_ctrl_c_is_noted_for_later_and_the_second_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)
    with Interrupt() as interrupt:
        interrupt.check()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes: no KeyboardInterrupt here
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.integration
def test_ctrl_c_finishes_the_steps_in_progress_and_the_next_apply_converges(
        world: World) -> None:
    proc = _start_apply(world.dir)
    venvs = [h.prefix / "agent" / "venv" for h in world.fleet.hosts.values()]
    _when(proc, lambda: any(v.exists() for v in venvs), "an agent venv appeared")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted: stopping once the steps in progress are done" in err
    assert "error: interrupted" in err
    # the agent install that was running finished on both hosts; nothing after it started
    for host in world.fleet.hosts.values():
        assert (host.prefix / "agent" / ".installed").exists()
        assert not (host.prefix / "etc" / "agent.toml").exists()
    # no command of the interrupted apply runs on; its locks are gone
    assert world.fleet.stack_processes() == {}
    assert not (world.dir / ".stack" / "lock").exists()
    assert _host_locks(world) == []
    _assert_nothing_half_installed(world)
    _assert_next_apply_finishes_the_job(world)


@pytest.mark.integration
def test_a_killed_apply_leaves_its_lock_and_the_next_one_converges_after_force_unlock(
        world: World) -> None:
    proc = _start_apply(world.dir)
    parts = [h.prefix / "models" / "gemma" / (world.model.name + ".part")
             for h in world.fleet.hosts.values()]
    _when(proc, lambda: any(p.exists() and p.stat().st_size > 0 for p in parts),
          "the model upload started")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _assert_nothing_half_installed(world)

    lock = json.loads((world.dir / ".stack" / "lock").read_text())
    assert _host_locks(world) != []
    refused = run_stack("apply", "--auto-approve", cwd=world.dir)
    assert refused.returncode == 1
    assert f"another apply holds the stack's lock (lock `{lock['id']}` held by" in refused.stderr
    assert (f"hint: wait for it to finish; if it was killed, run "
            f"`stack force-unlock {lock['id']}`.") in refused.stderr
    unlocked = run_stack("force-unlock", lock["id"], cwd=world.dir)
    assert unlocked.returncode == 0, unlocked.stdout + unlocked.stderr
    assert not (world.dir / ".stack" / "lock").exists()
    assert _host_locks(world) == []
    _assert_next_apply_finishes_the_job(world)
