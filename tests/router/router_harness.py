"""Helpers for router tests: canned upstreams and `stack-router` as real processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CANNED = ROOT / "bench" / "router" / "canned_upstream.py"
ROUTER = [sys.executable, "-m", "router.main"]


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class Proc:
    """A process in its own group, with the first line matching `ready` parsed for a port."""

    def __init__(self, argv: list[str], ready: str, log: Path, env: dict[str, str] | None = None,
                 timeout: float = 20.0, nofile: int | None = None) -> None:
        self.log = log

        def limit_files() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})}, preexec_fn=limit_files)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(ready, log.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{argv[:3]} did not start:\n{log.read_text(errors='replace')}")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.config_path = tmp / "router.json"

    def upstream(self, *args: str) -> Proc:
        proc = Proc([sys.executable, str(CANNED), "--port", "0", *args],
                    r"canned: listening on (\d+)", self.tmp / f"canned-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def write(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        tmp.replace(self.config_path)

    def router(self, config: dict[str, Any], nofile: int | None = None) -> Proc:
        """The router on `config`; `nofile`: its open-file limit (soft and hard)."""
        self.write({"listen": "127.0.0.1:0", **config})
        proc = Proc([*ROUTER, "--config", str(self.config_path)],
                    r"listening on https?://127\.0\.0\.1:(\d+)", self.tmp / "router.log",
                    nofile=nofile)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def replica(rid: str, proc: Proc, api_key: str | None = None) -> dict[str, Any]:
    return {"id": rid, "url": f"http://127.0.0.1:{proc.port}", "api_key": api_key}


def get(port: int, path: str, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def stats(proc: Proc, key: str | None = None) -> dict[str, int]:
    """Requests a canned upstream received, by path."""
    result: dict[str, int] = json.loads(get(proc.port, "/stats", key)[1])
    return result


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    _, text = get(port, "/metrics")
    total = 0.0
    for line in text.decode().splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def sockets(pid: int) -> int:
    """Sockets a process holds open."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count
