"""`stack-router --config router.json`: serve the fleet's OpenAI-compatible endpoint.

With `workers` > 1 the parent forks that many processes, each with its own listening
socket on the same address (SO_REUSEPORT) so the kernel spreads connections; the parent
forwards SIGHUP (reload) and SIGTERM/SIGINT (drain and stop) and restarts a worker that
dies. Each worker re-reads the config on SIGHUP or when the file changes. The workers
share rate-limit windows and answer `/metrics` for all of them (router/shared.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

from router import config as router_config
from router.app import Router
from router.config import RouterConfig
from router.errors import ConfigError
from router.guard import Guard, raise_fd_limit
from router.server import ClientConnection
from router.shared import SharedState

log = logging.getLogger("stack-router")
DRAIN_SECONDS = 30.0
WATCH_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stack-router", description="One OpenAI-compatible endpoint for the fleet.")
    parser.add_argument("--config", required=True, help="router.json written by `stack apply`")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    path = Path(args.config)
    try:
        config = router_config.load(path)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 1
    host, port = router_config.parse_listen(config.listen)
    try:
        reserve = _socket(host, port)
    except OSError as exc:
        print(f"error: cannot listen on `listen` = {config.listen!r} from `{path}`: "
              f"{exc.strerror}\nhint: pick a free port or stop what uses it.", file=sys.stderr)
        return 1
    port = reserve.getsockname()[1]
    if config.workers == 1:
        reserve.listen(1024)
        return _serve(path, config, reserve, None, None, 0)
    return _supervise(path, config, host, port, reserve)


def _socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _announce(config: RouterConfig, sock: socket.socket, workers: int) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if config.tls_cert else "http"
    print(f"stack-router: listening on {scheme}://{shown}:{port} with {workers} worker(s)",
          file=sys.stderr, flush=True)


def _supervise(path: Path, config: RouterConfig, host: str, port: int,
               reserve: socket.socket) -> int:
    """Fork the workers, forward signals, restart the ones that die."""
    children: dict[int, int] = {}
    stopping = False
    ready_r, ready_w = os.pipe()
    shared = SharedState(config.workers)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            code = 1
            try:
                sock = _socket(host, port)
                sock.listen(1024)
                code = _serve(path, config, sock, ready_w, shared, slot)
            finally:
                os._exit(code)
        children[pid] = slot

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for slot in range(config.workers):
        spawn(slot)
    for _ in range(config.workers):
        os.read(ready_r, 1)
    _announce(config, reserve, config.workers)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = children.pop(pid, -1)
        if slot >= 0 and not stopping:
            log.warning("router: worker %d exited (status %d); starting it again", pid, status)
            spawn(slot)
    return 0


def _serve(path: Path, config: RouterConfig, sock: socket.socket, ready_fd: int | None,
           shared: SharedState | None, slot: int) -> int:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        runner = asyncio.Runner()
    with runner:
        return runner.run(_worker(path, config, sock, ready_fd, shared, slot))


class _Reloader:
    """Re-reads router.json on SIGHUP or when the file changes; a file that does not load
    keeps the previous config (and says why)."""

    def __init__(self, path: Path, app: Router, guard: Guard) -> None:
        self.path, self.app, self.guard = path, app, guard
        self.stamp = _stamp(path)

    def reload(self, reason: str) -> None:
        try:
            new = router_config.load(self.path)
        except ConfigError as err:
            log.error("router: reload (%s) failed, keeping the previous config: %s",
                      reason, err.render().replace("\n", " "))
            return
        old = self.app.tables.config
        if new.listen != old.listen or new.workers != old.workers:
            log.warning("router: `listen` and `workers` changes need a restart")
        self.app.reload(new)
        self.guard.configure(new.clients, _replica_count(new))
        log.info("router: reloaded %s (%s): %d models, %d keys", self.path, reason,
                 len(new.models), len(new.keys))

    def on_hup(self) -> None:
        self.stamp = _stamp(self.path)
        self.reload("SIGHUP")

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            stamp = _stamp(self.path)
            if stamp != self.stamp:
                self.stamp = stamp
                self.reload("file changed")


def _tls(config: RouterConfig) -> ssl.SSLContext | None:
    if not (config.tls_cert and config.tls_key):
        return None
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(config.tls_cert, config.tls_key)
    return tls


async def _worker(path: Path, config: RouterConfig, sock: socket.socket,
                  ready_fd: int | None, shared: SharedState | None, slot: int) -> int:
    loop = asyncio.get_running_loop()
    app = Router(config, loop, shared=shared, slot=slot)
    peers = None if shared is None else await shared.serve_snapshots(slot, app.snapshot)
    guard = Guard(config.clients, _replica_count(config), raise_fd_limit())

    def factory() -> ClientConnection:
        return ClientConnection(app.handle, app.streams_body, app.max_body,
                                app.tables.config.affinity_header.encode(), guard)

    server = await loop.create_server(factory, sock=sock, ssl=_tls(config), backlog=1024)
    stop = asyncio.Event()
    reloader = _Reloader(path, app, guard)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [loop.create_task(reloader.watch()), loop.create_task(app.probe_forever()),
             loop.create_task(guard.sweep_forever())]
    if ready_fd is None:
        _announce(config, sock, 1)
    else:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    await stop.wait()
    server.close()
    if peers is not None:
        peers.close()
    deadline = loop.time() + DRAIN_SECONDS  # answers in flight finish, then the rest close
    while app.inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(guard.connections):
        conn.close()
    for task in tasks:
        task.cancel()
    return 0


def _replica_count(config: RouterConfig) -> int:
    return sum(len(model.replicas) for model in config.models)


def _stamp(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except OSError:
        return (0.0, 0)
    return (st.st_mtime, st.st_size)


if __name__ == "__main__":
    raise SystemExit(main())
