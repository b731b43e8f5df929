"""`stack status --watch` and `stack logs -f/--since` against a loopback fleet of two hosts
serving Gemma on llama.cpp (real sshd, agents, router, llama-server), in order:

1. apply;
2. `status --watch --count` frames while streamed chat completions go through the router:
   the instance is ready and shows requests in flight, a TTFT p50 and router requests/s;
3. Ctrl-C ends `--watch` with exit code 0 (in a pseudo-terminal, rich's live display);
4. `logs` rejects bad flags by name with a hint;
5. `logs -f` keeps printing after the backend is killed and the agent restarts it;
6. `logs --since` prints only output after that time (the restart, not the first start);
7. a host that stops answering shows its error in the next frames and the view goes on.

About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import STACK_CLI, Fleet, gemma_stack_toml, llama_sdist, run_stack, stack_session

from stack.secrets import generate_key, hash_key

pytestmark = pytest.mark.integration

ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
STARTING = b" starting "  # the line the agent writes into the log before each backend start
READY = b"llama_server: listening on"  # llama-server, once its model is loaded


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    llama_sdist(llama_bin.parent.parent.parent)  # so apply uploads scripts/setup-llama-cpp's build
    work = tmp_path_factory.mktemp("live")
    fleet = Fleet(2, root=work / "fleet")
    fleet.start()
    key = generate_key()
    text, url = gemma_stack_toml(fleet, "livetest", gguf_model, None, hash_key(key),
                                 router="node-01")
    (work / "stack.toml").write_text(text)
    with stack_session(fleet, work, "live-test-secret-0123456789abcdef"):
        yield {"fleet": fleet, "dir": work, "key": key, "url": url}


def _stack(*args: str, cwd: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(STACK_CLI), *args], cwd=cwd, env=ENV, **kwargs)


def _agent_instance(world: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(node, the agent's own record of gemma-0) from the hosts' status files."""
    for name, host in world["fleet"].hosts.items():
        path = host.prefix / "state" / "status.json"
        if path.exists():
            for inst in json.loads(path.read_text())["instances"]:
                if inst["id"] == "gemma-0":
                    return name, inst
    raise AssertionError("no agent reports gemma-0")


def _agent_engine(world: dict[str, Any]) -> dict[str, Any] | None:
    """The `engine` object of gemma-0 in its agent's `/v1/status` (None when it has none)."""
    node, _ = _agent_instance(world)
    prefix = world["fleet"].hosts[node].prefix
    config = tomllib.loads((prefix / "etc" / "agent.toml").read_text())
    token = Path(config["token_file"]).read_text().strip()
    request = urllib.request.Request(f"http://{config['listen']}/v1/status",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        body = json.load(answer)
    [inst] = [i for i in body["instances"] if i["id"] == "gemma-0"]
    engine: dict[str, Any] | None = inst.get("engine")
    return engine


def _frames(out: str) -> list[dict[str, list[str]]]:
    """Each frame of `--watch` output: the cells of its gemma-0 row and router row."""
    frames = []
    for text in out.split("fleet status at ")[1:]:
        rows: dict[str, list[str]] = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.split("│")[1:-1]]
            if cells and cells[0] in ("gemma-0", "node-01", "node-02"):
                rows.setdefault(cells[0] if cells[0] == "gemma-0" else
                                f"{cells[0]}:{len(cells)}", cells)
        frames.append(rows)
    return frames


def _chat_until(world: dict[str, Any], stop: threading.Event) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    while not stop.is_set():
        stream = client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=16, stream=True)
        for _ in stream:
            pass


def test_1_apply(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_2_watch_frames_show_the_instance_ready_and_live_numbers(
        world: dict[str, Any]) -> None:
    stop = threading.Event()
    chatter = threading.Thread(target=_chat_until, args=(world, stop), daemon=True)
    chatter.start()
    try:
        result = run_stack("status", "--watch", "--interval", "3", "--count", "4",
                           cwd=world["dir"], timeout=300)
    finally:
        stop.set()
        chatter.join(timeout=120)
    print(result.stdout)  # the frames (`pytest -rP` shows them)
    assert result.returncode == 0, result.stdout + result.stderr
    frames = _frames(result.stdout)
    assert len(frames) == 4, result.stdout
    # instance, node, state, restarts, in flight, tokens/s, TTFT p50, endpoint, backend
    rows = [f["gemma-0"] for f in frames]
    assert all(r[2] == "ready" for r in rows), result.stdout
    assert rows[0][5] == rows[0][6] == "–"  # the first frame has no earlier read
    assert all(r[4].isdigit() for r in rows), result.stdout  # the router's in-flight gauge
    later = rows[1:]
    assert any(r[6].endswith(" s") and float(r[6][:-2]) > 0 for r in later), result.stdout
    if _agent_engine(world) is not None:  # an agent that reads the engine's counters
        assert any(r[5] != "–" and float(r[5]) > 0 for r in later), result.stdout
    else:
        assert all(r[5] == "–" for r in rows), result.stdout
    routers = [f["node-01:6"] for f in frames]  # router, listen, requests/s, 5xx, tok/s, users
    assert routers[0][2] == "–"
    assert any(float(r[2]) > 0 for r in routers[1:] if r[2] != "–"), result.stdout
    assert all(r[3] in ("–", "0.0%") for r in routers), result.stdout


def test_3_ctrl_c_ends_the_live_view_with_exit_code_0(world: dict[str, Any]) -> None:
    main, child = pty.openpty()
    proc = _stack("status", "--watch", "--interval", "2", cwd=world["dir"],
                  stdin=child, stdout=child, stderr=child)
    os.close(child)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"gemma-0" not in seen and time.monotonic() < deadline:
            if select.select([main], [], [], 5)[0]:
                seen += os.read(main, 65536)
        assert b"gemma-0" in seen, seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            # a terminal keeps reading: the view's last writes must not block on a full pty
            if select.select([main], [], [], 1)[0]:
                with contextlib.suppress(OSError):  # EIO once the view has closed it
                    os.read(main, 65536)
        assert proc.wait(timeout=1) == 0
    finally:
        proc.kill()
        os.close(main)


def test_4_logs_names_a_bad_flag_with_a_hint(world: dict[str, Any]) -> None:
    for args, flag in ((("--since", "10x"), "`--since`"), (("--replica", "-1"), "`--replica`"),
                       (("--tail", "-5"), "`--tail`")):
        result = run_stack("logs", "gemma", *args, cwd=world["dir"])
        assert result.returncode == 1
        assert flag in result.stderr and "\nhint: " in result.stderr, result.stderr


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, count: int,
                timeout: float) -> bytes:
    """What `proc` printed until `needle` appeared `count` times (or the timeout)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while seen.count(needle) < count and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 5)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_5_logs_follow_goes_on_across_a_restart_of_the_backend(world: dict[str, Any]) -> None:
    node, before = _agent_instance(world)
    log = world["fleet"].hosts[node].prefix / "logs" / "gemma-0.log"
    starts = log.read_bytes().count(STARTING)
    proc = _stack("logs", "gemma", "-f", "--tail", "3", cwd=world["dir"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = _read_until(proc, b"\n", 3, 120)
        assert first.count(b"\n") >= 3, first
        world["killed_at"] = time.time()
        os.kill(before["pid"], signal.SIGKILL)  # a crash: the agent starts it again
        # the restart's own line, then llama-server's output of the new process
        restart = _read_until(proc, STARTING, 1, 180)
        assert STARTING in restart, restart
        after = restart.split(STARTING, 1)[1]
        after += _read_until(proc, READY, 0 if READY in after else 1, 180)
        assert READY in after, after
        assert log.read_bytes().count(STARTING) == starts + 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    _, now = _agent_instance(world)
    assert now["restarts"] == before["restarts"] + 1 and now["pid"] != before["pid"]


def test_6_logs_since_prints_only_the_recent_output(world: dict[str, Any]) -> None:
    everything = run_stack("logs", "gemma", "--tail", "100000", cwd=world["dir"])
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.encode().count(STARTING) >= 2  # the first start and the restart
    seconds = int(time.time() - world["killed_at"]) + 1
    recent = run_stack("logs", "gemma", "--since", f"{seconds}s", cwd=world["dir"])
    assert recent.returncode == 0, recent.stderr
    assert recent.stdout.encode().count(STARTING) == 1, recent.stdout  # only the restart
    assert READY.decode() in recent.stdout
    assert len(recent.stdout) < len(everything.stdout)


def _next_frame(proc: subprocess.Popen[bytes], seen: list[bytes], after: int,
                want: Callable[[dict[str, list[str]]], bool]) -> int:
    """Read `--watch` output into `seen` until a complete frame after the first `after`
    frames is one that `want`s (or 180 s passed); its index."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        frames = _frames(b"".join(seen).decode(errors="replace"))[:-1]  # the last: partial
        for index in range(after, len(frames)):
            if want(frames[index]):
                return index
        if select.select([proc.stdout], [], [], 5)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, b"".join(seen).decode(errors="replace")
            seen.append(chunk)
    raise AssertionError(b"".join(seen).decode(errors="replace"))


def test_7_a_host_that_stops_answering_shows_its_error_and_the_view_goes_on(
        world: dict[str, Any]) -> None:
    fleet: Fleet = world["fleet"]
    proc = _stack("status", "--watch", "--interval", "2", cwd=world["dir"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[bytes] = []

    def problem(frame: dict[str, list[str]]) -> str:
        return frame["node-02:4"][3]  # node, agent, GPUs, problem

    try:
        first = _next_frame(proc, seen, 0, lambda f: "node-02:4" in f and not problem(f))
        fleet.stop_host("node-02")
        down = _next_frame(proc, seen, first + 1, lambda f: "host `node-02`" in problem(f))
        fleet.start_host("node-02")
        back = _next_frame(proc, seen, down + 1, lambda f: not problem(f))
        assert back > down > first
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        fleet.start_host("node-02")
