"""Show the fleet as its agents report it: nodes, GPUs (utilization, memory, temperature,
power), model instances (state, restarts, requests in flight, tokens/s, time to first
token) and the routers (requests/s, 5xx share, tokens/s).

Rates are deltas between two reads of the fleet: one second apart for a one-shot status,
one interval apart with `--watch`, which redraws the view in place over one SSH session
until Ctrl-C (or `--count` frames). Hosts that cannot be read are listed with the reason;
the exit code is then 1 (for `--watch`, 0 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from stack.errors import ConfigError
from stack.snapshot import NodeFacts
from stack.spec import StackSpec
from stack.statusview import Reading, RouterSample, parse_router_metrics, status_view

if TYPE_CHECKING:
    import gevent

    from stack.observe import Connected
    from stack.remote import Host

HELP = "show nodes, GPUs, instances and routers as the agents report them"
MIN_INTERVAL = 1.0
READ_TIMEOUT = 20.0  # a frame waits this long (at least) for a host, then shows it as silent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON")
    parser.add_argument("--watch", action="store_true",
                        help="redraw the view every `--interval` seconds until Ctrl-C")
    parser.add_argument("--interval", type=float, default=3.0, metavar="S",
                        help="seconds between frames of `--watch` (default 3)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="with `--watch`, stop after N frames (default: until Ctrl-C)")


def _on_host(host: Host, python: str, code: str, *args: str) -> str | None:
    """The output of a Python snippet run by the agent's interpreter on the host (None if
    it failed, or the host went away meanwhile)."""
    from paramiko.ssh_exception import SSHException
    from pyinfra.api.exceptions import PyinfraError

    from stack.remote import run

    command = " ".join(shlex.quote(a) for a in (python, "-I", "-c", code, *args))
    try:
        ok, out, _ = run(host, command)
    except (OSError, EOFError, SSHException, PyinfraError):
        return None
    return out if ok else None


# fetched on the host, so routers and agents listening on loopback work
_ROUTER_PAGE = ("import sys,urllib.request as u;"
                "print(u.urlopen(sys.argv[1],timeout=5).read().decode())")
_AGENT_ENGINES = (
    "import json,sys,urllib.request as u;from agent.config import load_config,read_token;"
    "c=load_config(sys.argv[1]);h,_,p=c.listen.rpartition(':');"
    "h={'0.0.0.0':'127.0.0.1','[::]':'[::1]'}.get(h,h);"
    "r=u.Request(f'http://{h}:{p}/v1/status',headers={'Authorization':'Bearer '+read_token(c)});"
    "b=json.load(u.urlopen(r,timeout=10));"
    "print(json.dumps({i['id']:i['engine'] for i in b['instances'] if i.get('engine')}))")


def _router_sample(host: Host, prefix: str, listen: str) -> RouterSample | None:
    out = _on_host(host, f"{prefix}/agent/venv/bin/python", _ROUTER_PAGE,
                   f"http://{listen}/metrics")
    return None if out is None else parse_router_metrics(out)


def _agent_engines(host: Host, prefix: str) -> dict[str, dict[str, Any]]:
    """Instance id -> the engine counters the running agent reports in `/v1/status`
    (empty when it reports none, or does not answer)."""
    out = _on_host(host, f"{prefix}/agent/venv/bin/python", _AGENT_ENGINES,
                   f"{prefix}/etc/agent.toml")
    try:
        engines = json.loads(out) if out else {}
    except ValueError:
        return {}
    return engines if isinstance(engines, dict) else {}


def _silent(address: str, message: str, hint: str) -> NodeFacts:
    """A host that did not answer this time."""
    return NodeFacts(address=address, reachable=False, error=message, hint=hint)


class FleetReader:
    """Reads the fleet again and again over one open session. A host still busy with an
    earlier read (hung) is not read again: it shows as silent until that read returns."""

    def __init__(self, spec: StackSpec, connected: Connected) -> None:
        self.spec = spec
        self.connected = connected
        self.busy: dict[str, gevent.Greenlet[Any, Any]] = {}

    def _is_router(self, name: str) -> bool:
        from fnmatch import fnmatchcase

        globs = self.spec.router.hosts
        return not globs or any(fnmatchcase(name, g) for g in globs)

    def _read_host(self, name: str) -> tuple[NodeFacts, RouterSample | None,
                                               dict[str, dict[str, Any]]]:
        """The host's facts, its router's sample (on a router host) and the engine counters
        of its instances, as far as it answered."""
        from stack.nodes import node_prefix
        from stack.observe import read_node, reconnect

        problem = None if name in self.connected.errors else reconnect(self.connected, name)
        if problem is not None:
            return _silent(self.connected.addresses[name], problem.message, problem.hint), \
                None, {}
        facts = read_node(self.spec, self.connected, name)
        if not facts.reachable or facts.error:
            return facts, None, {}
        host, prefix = self.connected.nodes[name], node_prefix(self.spec, name)
        engines = (_agent_engines(host, prefix)
                   if facts.agent.running and facts.agent.instances else {})
        sample = (_router_sample(host, prefix, self.spec.router.listen)
                  if self._is_router(name) else None)
        return facts, sample, engines

    def read(self, timeout: float) -> Reading:
        """Every host once (in parallel), waiting at most `timeout` seconds."""
        import gevent

        for name in self.connected.nodes:
            if name not in self.busy:
                self.busy[name] = gevent.spawn(self._read_host, name)
        gevent.joinall(list(self.busy.values()), timeout=timeout)
        nodes: dict[str, NodeFacts] = {}
        routers: dict[str, RouterSample | None] = {}
        engines: dict[str, dict[str, dict[str, Any]]] = {}
        for name in self.connected.nodes:
            greenlet = self.busy[name]
            address = self.connected.addresses[name]
            sample = None
            if not greenlet.ready():
                nodes[name] = _silent(address, f"host `{name}` did not answer within "
                                      f"{timeout:g} s", "check the host and its network; "
                                      "the view keeps trying.")
            elif not greenlet.successful():  # e.g. the session died during the router read
                del self.busy[name]
                nodes[name] = _silent(address, f"host `{name}` could not be read: "
                                      f"{greenlet.exception}", "the view keeps trying.")
            else:
                del self.busy[name]
                nodes[name], sample, engines[name] = greenlet.get()
            if self._is_router(name):
                routers[name] = sample
        return Reading(nodes=nodes, routers=routers, listen=self.spec.router.listen,
                       engines=engines)


def _gib(n: int | None) -> str:
    return f"{(n or 0) / 1024**3:.1f}"


def _num(value: float | None, fmt: str = "{:g}") -> str:
    return "–" if value is None else fmt.format(value)


def _gpu(g: dict[str, Any]) -> str:
    parts = [f"{g['index']}: {_num(g['utilization_percent'], '{:.0f}%')}",
             f"{_gib(g['memory_used_bytes'])}/{_gib(g['memory_bytes'])} GiB",
             _num(g["temperature_c"], "{:.0f} °C"), _num(g["power_w"], "{:.0f} W")]
    return ", ".join(parts)


def status_tables(status: dict[str, Any]) -> Group:
    """The view: nodes, instances and routers as tables."""
    nodes = Table(title="Nodes", title_justify="left")
    for column in ("node", "agent", "GPUs (util, memory, temperature, power)", "problem"):
        nodes.add_column(column)
    instances = Table(title="Instances", title_justify="left")
    for column in ("instance", "node", "state", "restarts", "in flight", "tokens/s",
                   "TTFT p50", "endpoint", "backend"):
        instances.add_column(column, justify="right" if column in (
            "restarts", "in flight", "tokens/s", "TTFT p50") else "left")
    for name, node in status["nodes"].items():
        agent = node["agent"]
        running = "running" if agent["running"] else "stopped"
        nodes.add_row(name, f"{agent['version'] or '-'} ({running})",
                      "\n".join(_gpu(g) for g in node["gpus"]) or "-",
                      (node["error"] or "").split("\n")[0])
        for inst in node["instances"]:
            instances.add_row(inst["id"], name, inst["state"], str(inst["restarts"]),
                              _num(inst["requests_in_flight"]),
                              _num(inst["tokens_per_second"], "{:.1f}"),
                              _num(inst["ttft_p50_seconds"], "{:.3f} s"), inst["endpoint"],
                              f"{inst['backend']} {inst['backend_version'] or ''}".strip())
    routers = Table(title="Routers", title_justify="left")
    for column in ("router", "listen", "requests/s", "5xx share", "tokens/s", "users"):
        routers.add_column(column)
    for name, router in status["routers"].items():
        if not router["up"]:
            routers.add_row(name, router["listen"], "not answering", "", "", "")
            continue
        users = "; ".join(f"{u}: {_num(got['requests_per_second'])} req/s, "
                          f"{_num(got['tokens_per_second'])} tok/s"
                          for u, got in router["users"].items())
        routers.add_row(name, router["listen"], _num(router["requests_per_second"]),
                        _num(router["error_rate"], "{:.1%}"),
                        _num(router["tokens_per_second"]), users)
    return Group(nodes, instances, routers)


def _reachable(status: dict[str, Any]) -> bool:
    return all(n["reachable"] for n in status["nodes"].values())


def read_status(spec: StackSpec, stack_dir: Path) -> dict[str, Any]:
    """One snapshot: two reads one second apart (for the rates)."""
    import gevent

    from stack.remote import session

    with session(spec, stack_dir) as connected:
        reader = FleetReader(spec, connected)
        first = reader.read(READ_TIMEOUT)
        start = time.monotonic()
        gevent.sleep(1.0)
        second = reader.read(READ_TIMEOUT)
        return status_view(first, second, time.monotonic() - start)


def watch(spec: StackSpec, stack_dir: Path, console: Console, interval: float,
          count: int | None) -> int:
    """Frames until Ctrl-C or `count`: in place on a terminal, one after the other (like
    `top -b`) elsewhere. Exits 0 after Ctrl-C, else as a one-shot status would."""
    import gevent

    from stack.remote import session

    status: dict[str, Any] = {"nodes": {}}
    # Ctrl-C reaches the main greenlet wherever it comes: Python's own handler raises in
    # whichever greenlet runs, and a host read may be running inside code that swallows it
    hub = gevent.get_hub()
    interrupt = gevent.signal_handler(signal.SIGINT, lambda: hub.parent.throw(KeyboardInterrupt))
    with session(spec, stack_dir) as connected:
        reader = FleetReader(spec, connected)
        live = (Live(console=console, auto_refresh=False, screen=False)
                if console.is_terminal else nullcontext())
        before: Reading | None = None
        read_at = 0.0
        frames = 0
        try:
            with live:
                while count is None or frames < count:
                    started = time.monotonic()
                    reading = reader.read(max(READ_TIMEOUT, interval))
                    status = status_view(before, reading, started - read_at)
                    title = Text(f"fleet status at {time.strftime('%H:%M:%S')} · every "
                                 f"{interval:g} s · Ctrl-C to stop", style="bold")
                    view = Group(title, status_tables(status))
                    if isinstance(live, Live):
                        live.update(view, refresh=True)
                    else:
                        console.print(view, "")
                    before, read_at, frames = reading, started, frames + 1
                    if count is None or frames < count:
                        gevent.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            gevent.killall(list(reader.busy.values()), block=False)  # reads still running
            return 0
        finally:
            interrupt.cancel()
    return 0 if _reachable(status) else 1


def run(args: argparse.Namespace) -> int:
    from stack.config import load

    if not args.interval >= MIN_INTERVAL:  # also NaN
        raise ConfigError(f"`--interval` must be at least {MIN_INTERVAL:g} second, got "
                          f"{args.interval:g}", hint="pass e.g. `--interval 3`; each frame "
                          "runs the facts script on every host.")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"`--count` must be at least 1, got {args.count}",
                          hint="leave `--count` out to watch until Ctrl-C.")
    if args.watch and args.json:
        raise ConfigError("`--watch` and `--json` cannot be combined",
                          hint="`--json` prints one snapshot; leave `--watch` out.")
    path = Path(args.file)
    spec = load(path)
    if args.watch:
        return watch(spec, path.resolve().parent, Console(), args.interval, args.count)
    status = read_status(spec, path.resolve().parent)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        Console().print(status_tables(status))
    return 0 if _reachable(status) else 1
