"""User-space instructions per request of the router, counted by callgrind (load-independent).

    .venv/bin/python bench/router/callgrind.py [--baseline-dir /tmp/router-baseline]
        [--requests 500,3500] [--which before,after]

The router (one worker, `python -m router.main` from this checkout, "after", or from the
baseline worktree, "before"; see run.py `--baseline`) runs under
`valgrind --tool=callgrind` in front of the canned upstream (not under valgrind) and
answers N keep-alive chat requests with a key on one connection, from a plain socket
client outside valgrind; then it is stopped. Two runs with different N: the difference of
their instruction totals divided by the difference of N is the instructions per request,
start-up and shut-down cancelling out. The kernel's part (socket reads and writes) is not
counted. Prints one line per router; `--keep DIR` keeps the callgrind files (for
`callgrind_annotate`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from run import CHAT, free_port, router_config, wait_port  # noqa: E402

REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT))


def drive(port: int, count: int) -> None:
    """`count` requests one after another on one keep-alive connection."""
    with socket.create_connection(("127.0.0.1", port), 60) as sock:
        buf = b""
        for _ in range(count):
            sock.sendall(REQUEST)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", buf[:end])
                    assert m is not None, buf[:end]
                    total = end + 4 + int(m.group(1))
                    if len(buf) >= total:
                        assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
                        buf = buf[total:]
                        break
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the router closed the connection")
                buf += data


def measure(tree: Path, upstream: str, count: int, out: Path, tmp: Path) -> int:
    port = free_port()
    conf = router_config(tmp / f"cg-{port}.json", port, upstream, 1)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         sys.executable, "-m", "router.main", "--config", str(conf), "--log-level", "warning"],
        cwd=str(tree), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_port(port, 300)
        drive(port, count)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(300)
    text = out.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
    assert m is not None, f"no totals in {out}"
    return int(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-dir", type=Path, default=Path("/tmp/router-baseline"))
    parser.add_argument("--requests", default="500,3500")
    parser.add_argument("--which", default="before,after")
    parser.add_argument("--keep", type=Path, help="keep the callgrind output files here")
    args = parser.parse_args()
    low, high = (int(n) for n in args.requests.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="router-cg-"))
    keep = args.keep or tmp
    keep.mkdir(parents=True, exist_ok=True)
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "canned_upstream.py"),
                                 "--port", str(up_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(up_port, 15)
        for name in args.which.split(","):
            tree = args.baseline_dir if name == "before" else ROOT
            t0 = time.monotonic()
            few = measure(tree, f"127.0.0.1:{up_port}", low, keep / f"{name}-{low}.cg", tmp)
            many = measure(tree, f"127.0.0.1:{up_port}", high, keep / f"{name}-{high}.cg", tmp)
            print(f"{name}: {(many - few) / (high - low):,.0f} instructions per request "
                  f"({few:,} for {low}, {many:,} for {high}; {time.monotonic() - t0:.0f} s)",
                  flush=True)
    finally:
        os.killpg(upstream.pid, signal.SIGTERM)
        upstream.wait(30)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
