"""Show the fleet as its agents report it: nodes, GPUs (utilization, memory,
temperature), model instances (state, restarts, endpoint) and the routers (requests/s and
tokens/s over one second, from their Prometheus metrics).

Hosts that cannot be read are listed with the reason; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from stack.snapshot import Observed
from stack.spec import StackSpec

if TYPE_CHECKING:
    from stack.remote import Host

HELP = "show nodes, GPUs, instances and routers as the agents report them"
METRIC_PREFIX = "modelstack_router_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


_USER = re.compile(r'[{,]user="((?:[^"\\]|\\.)*)"')


def parse_router_metrics(text: str) -> dict[str, float]:
    """Totals of the router's request and token counters in a Prometheus text page, and
    per user (`user:NAME:requests`, `user:NAME:tokens`) for keys that have one."""
    totals = {"requests": 0.0, "tokens": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0]
        try:
            number = float(value)
        except ValueError:
            continue
        kind = {METRIC_PREFIX + "requests_total": "requests",
                METRIC_PREFIX + "tokens_total": "tokens"}.get(metric)
        if kind is None:
            continue
        totals[kind] += number
        user = _USER.search(name)
        if user is not None:
            label = f"user:{user.group(1)}:{kind}"
            totals[label] = totals.get(label, 0.0) + number
    return totals


def rates(first: dict[str, float], second: dict[str, float], seconds: float) -> dict[str, Any]:
    """Requests/s and tokens/s between two samples, in all and per user."""
    span = max(seconds, 1e-6)

    def rate(name: str) -> float:
        return round((second.get(name, 0.0) - first.get(name, 0.0)) / span, 2)

    users = sorted({k.split(":")[1] for k in second if k.startswith("user:")})
    return {"requests_per_second": rate("requests"), "tokens_per_second": rate("tokens"),
            "users": {u: {"requests_per_second": rate(f"user:{u}:requests"),
                          "tokens_per_second": rate(f"user:{u}:tokens")} for u in users}}


def _router_sample(host: Host, prefix: str, listen: str) -> dict[str, float] | None:
    from stack.remote import run

    python = shlex.quote(f"{prefix}/agent/venv/bin/python")
    url = shlex.quote(f"http://{listen}/metrics")
    code = shlex.quote("import sys,urllib.request as u;"
                       "print(u.urlopen(sys.argv[1],timeout=5).read().decode())")
    ok, out, _ = run(host, f"{python} -c {code} {url}")
    return parse_router_metrics(out) if ok else None


def read_status(spec: StackSpec, stack_dir: Path) -> dict[str, Any]:
    """The whole status as a JSON-able dict."""
    import gevent

    from stack.nodes import node_prefix
    from stack.observe import read_node
    from stack.remote import session

    with session(spec, stack_dir) as connected:
        facts = {}

        def read(name: str) -> None:
            facts[name] = read_node(spec, connected, name)

        gevent.joinall([gevent.spawn(read, n) for n in connected.nodes])
        observed = Observed(nodes=facts)
        routers: dict[str, Any] = {}
        globs = spec.router.hosts
        from fnmatch import fnmatchcase

        hosts = [n for n, f in facts.items() if f.reachable and not f.error
                 and (not globs or any(fnmatchcase(n, g) for g in globs))]
        first: dict[str, dict[str, float] | None] = {}
        second: dict[str, dict[str, float] | None] = {}

        def sample(into: dict[str, dict[str, float] | None], name: str) -> None:
            into[name] = _router_sample(connected.nodes[name], node_prefix(spec, name),
                                        spec.router.listen)

        start = time.monotonic()
        gevent.joinall([gevent.spawn(sample, first, n) for n in hosts])
        gevent.sleep(1.0)
        gevent.joinall([gevent.spawn(sample, second, n) for n in hosts])
        span = time.monotonic() - start
        for name in hosts:
            a, b = first.get(name), second.get(name)
            routers[name] = ({"listen": spec.router.listen, "up": True, **rates(a, b, span)}
                             if a is not None and b is not None
                             else {"listen": spec.router.listen, "up": False})
    return _status_json(observed, routers)


def _status_json(observed: Observed, routers: dict[str, Any]) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    for name, node in sorted(observed.nodes.items()):
        nodes[name] = {
            "reachable": node.reachable and not node.error,
            "error": node.error,
            "address": node.address,
            "agent": {"version": node.agent.version, "running": node.agent.running},
            "gpus": [{"index": g.index, "name": g.name, "vendor": g.vendor,
                      "utilization_percent": g.utilization_percent,
                      "memory_used_bytes": g.memory_used_bytes,
                      "memory_bytes": g.memory_bytes, "temperature_c": g.temperature_c}
                     for g in node.gpus],
            "instances": [{"id": i.id, "model": i.model, "replica": i.replica,
                           "state": i.state,
                           "restarts": i.restarts,
                           "endpoint": f"http://{i.host or node.address}"
                                       f":{i.port}",
                           "backend": i.backend, "backend_version": i.backend_version}
                          for i in node.agent.instances],
        }
    return {"nodes": nodes, "routers": routers}


def _gib(n: int | None) -> str:
    return f"{(n or 0) / 1024**3:.1f}"


def render(console: Console, status: dict[str, Any]) -> None:
    nodes = Table(title="Nodes")
    for column in ("node", "agent", "GPUs (util %, used/total GiB, °C)", "problem"):
        nodes.add_column(column)
    instances = Table(title="Instances")
    for column in ("instance", "node", "state", "restarts", "endpoint", "backend"):
        instances.add_column(column)
    for name, node in status["nodes"].items():
        agent = node["agent"]
        gpus = "; ".join(f"{g['index']}: {g['utilization_percent'] or 0:.0f}%, "
                         f"{_gib(g['memory_used_bytes'])}/{_gib(g['memory_bytes'])}, "
                         f"{g['temperature_c'] if g['temperature_c'] is not None else '-'}"
                         for g in node["gpus"]) or "-"
        running = "running" if agent["running"] else "stopped"
        nodes.add_row(name, f"{agent['version'] or '-'} ({running})", gpus,
                      (node["error"] or "").split("\n")[0])
        for inst in node["instances"]:
            instances.add_row(inst["id"], name, inst["state"], str(inst["restarts"]),
                              inst["endpoint"],
                              f"{inst['backend']} {inst['backend_version'] or ''}".strip())
    console.print(nodes)
    console.print(instances)
    for name, router in status["routers"].items():
        if router.get("up"):
            console.print(f"router on {name} ({router['listen']}): "
                          f"{router['requests_per_second']} requests/s, "
                          f"{router['tokens_per_second']} tokens/s", highlight=False)
            for user, got in router.get("users", {}).items():
                console.print(f"  user {user}: {got['requests_per_second']} requests/s, "
                              f"{got['tokens_per_second']} tokens/s", highlight=False)
        else:
            console.print(f"router on {name} ({router['listen']}): not answering",
                          highlight=False)


def run(args: argparse.Namespace) -> int:
    from stack.config import load

    path = Path(args.file)
    status = read_status(load(path), path.resolve().parent)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render(Console(), status)
    return 0 if all(n["reachable"] for n in status["nodes"].values()) else 1
