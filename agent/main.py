"""`stack-agent`: run the node agent, or print its status from the state files.

    stack-agent --config PREFIX/etc/agent.toml            run the agent
    stack-agent status [--json] --config PREFIX/etc/agent.toml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from agent import procs
from agent.config import AgentConfig, ensure_dirs, load_config, read_token
from agent.errors import AgentError
from agent.reconcile import VERSION

log = logging.getLogger("agent")
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers; the agent's own need 1 KiB


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=None,
                        help="agent.toml (default: $STACK_AGENT_CONFIG, "
                        "else /opt/stack/etc/agent.toml)")
    parser = argparse.ArgumentParser(
        prog="stack-agent", parents=[common],
        description="The modelstack node agent: runs, watches and heals model instances.")
    parser.add_argument("--version", action="version", version=f"stack-agent {VERSION}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", parents=[common], help="run the agent (the default)")
    status = sub.add_parser("status", parents=[common],
                            help="print this node's status from the state files")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("STACK_AGENT_CONFIG")
               or "/opt/stack/etc/agent.toml")


# ---- status without the agent ---------------------------------------------------------

def _agent_running(cfg: AgentConfig) -> bool:
    try:
        info = json.loads(cfg.pid_file.read_text())
        return procs.pid_alive(int(info["pid"])) and \
            procs.proc_cmdline(int(info["pid"])) == info["cmdline"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def local_status(cfg: AgentConfig) -> dict[str, Any]:
    """The agent's last written status, checked against the processes that exist now."""
    from agent.gpu_metrics import GpuReader

    try:
        body: dict[str, Any] = json.loads(cfg.status_file.read_text())
    except (OSError, ValueError):
        body = {"node": cfg.node, "version": VERSION, "instances": []}
    running = _agent_running(cfg)
    body["running"] = running
    body["version"] = VERSION
    if not running:
        records = {r.id: r for r in procs.load_records(cfg.instances_dir)} \
            if cfg.instances_dir.exists() else {}
        for inst in body.get("instances", []):
            rec = records.get(inst["id"])
            if rec is None or not procs.matches(rec):
                inst["state"], inst["pid"] = "stopped", None
    body["gpu_source"], body["gpus"], body["gpu_error"] = GpuReader().read()
    return body


def _print_status(body: dict[str, Any]) -> None:
    print(f"node {body.get('node')}: agent {'running' if body['running'] else 'not running'}")
    for inst in body.get("instances", []):
        extra = f"  {inst['last_error']}" if inst.get("last_error") else ""
        print(f"  {inst['id']:<24} {inst.get('state', '?'):<14} port {inst.get('port')} "
              f"restarts {inst.get('restarts', 0)}{extra}")
    if not body.get("instances"):
        print("  no instances")


# ---- running ----------------------------------------------------------------------------

def _check_listen(cfg: AgentConfig) -> None:
    host, port = cfg.listen_address()
    if not procs.port_free(host, port):
        raise AgentError(f"`listen` address {cfg.listen} is already in use",
                         hint="another agent may be running; stop it or change `listen`.")
    with contextlib.suppress(OSError):
        socket.getaddrinfo(host, port)


@contextlib.contextmanager
def _pid_file(cfg: AgentConfig) -> Iterator[None]:
    if _agent_running(cfg):
        raise AgentError(f"another agent already runs with state {cfg.state_dir}",
                         hint="stop it first (`systemctl stop stack-agent`).")
    me = {"pid": os.getpid(), "cmdline": procs.proc_cmdline(os.getpid())}
    procs.write_private(cfg.pid_file, json.dumps(me))
    try:
        yield
    finally:
        cfg.pid_file.unlink(missing_ok=True)


async def _serve(cfg: AgentConfig, token: str) -> None:
    import uvicorn

    from agent.api import create_app
    from agent.engine_scraper import EngineScraper
    from agent.gpu_metrics import GpuReader
    from agent.http import agent_protocol
    from agent.reconcile import Reconciler

    class Server(uvicorn.Server):
        # we handle SIGTERM ourselves so the status file is written before exiting
        def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
            return contextlib.nullcontext()

    reconciler = Reconciler(cfg)
    host, port = cfg.listen_address()
    # h11, not httptools: it bounds a request's head (httptools takes headers of any
    # size, before the token is checked)
    # (agent.http: JSON for its own 400s, a connection cap, a deadline per request)
    tuning = cfg.tuning
    server = Server(uvicorn.Config(
        create_app(reconciler, token, GpuReader(),
                   EngineScraper() if tuning.engine_metrics else None), host=host, port=port,
        log_level="warning", access_log=False, lifespan="off",
        http=agent_protocol(tuning.max_connections, tuning.request_timeout_seconds,
                            MAX_HEAD_BYTES),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=int(tuning.keep_alive_seconds)))
    stop = asyncio.Event()

    def shutdown() -> None:
        log.info("node %s: agent stopping; backends keep running", cfg.node)
        server.should_exit = True
        stop.set()
        reconciler.wake()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown)
    loop_task = asyncio.create_task(reconciler.run(stop))
    log.info("node %s: agent %s listening on %s", cfg.node, VERSION, cfg.listen)
    try:
        await server.serve()
    finally:
        shutdown()
        await loop_task


def run_agent(cfg: AgentConfig) -> int:
    token = read_token(cfg)
    ensure_dirs(cfg)
    _check_listen(cfg)
    with _pid_file(cfg):
        asyncio.run(_serve(cfg, token))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = args.command == "status"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(_config_path(args))
        if args.command == "status":
            body = local_status(cfg)
            if args.json:
                print(json.dumps(body, indent=2, sort_keys=True))
            else:
                _print_status(body)
            return 0
        return run_agent(cfg)
    except AgentError as err:
        print(err.render(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
