"""Read every host of the stack over SSH (OS, CPU, RAM, disk, GPUs, drivers, runtimes,
the agent) and print a summary table, or write the facts snapshot with `--out FILE`
(the input of `stack plan --facts FILE`).

Hosts that cannot be read are named with the reason and a hint; the others are read
anyway. The exit code is 1 when any host could not be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stack import hostkeys
from stack.config import load
from stack.errors import Problem
from stack.snapshot import NodeFacts, Observed

HELP = "read every host and show (or save) the facts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE", help="write the facts snapshot (JSON) here")
    parser.add_argument("--host", action="append", metavar="NAME",
                        help="read only this host (repeatable)")
    hostkeys.add_trust_flag(parser)


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n else "-"


def _gpus(node: NodeFacts) -> str:
    if not node.gpus:
        return "-"
    names: dict[str, int] = {}
    for gpu in node.gpus:
        label = f"{gpu.name or gpu.vendor} ({_size(gpu.memory_bytes)})"
        names[label] = names.get(label, 0) + 1
    return ", ".join(f"{count}x {label}" for label, count in names.items())


def render_table(observed: Observed) -> Table:
    """The summary of `stack facts` as a rich table."""
    table = Table(title=f"Facts collected at {observed.collected_at}")
    for column in ("host", "address", "os", "cpu", "memory", "disk free", "gpus", "runtimes",
                   "agent"):
        table.add_column(column)
    for name, node in observed.nodes.items():
        if not node.reachable:
            table.add_row(name, node.address, "[red]unreachable[/red]", "", "", "", "", "", "")
            continue
        runtimes = ", ".join(f"{k} {'/'.join(v)}" for k, v in node.runtimes.items()) or "-"
        agent = node.agent.version or "-"
        if node.agent.version and not node.agent.running:
            agent += " (stopped)"
        table.add_row(name, node.address, f"{node.os} {node.distro}".strip(),
                      f"{node.cpu_cores} {node.arch}", _size(node.memory_bytes),
                      _size(node.disk_free_bytes), _gpus(node), runtimes, agent)
    return table


def problems(observed: Observed) -> list[str]:
    """One message per host that could not be read, and per GPU tool that failed."""
    lines = []
    for name, node in observed.nodes.items():
        if node.error:
            lines.append(Problem(node.error, node.hint or "").render())
        for problem in node.gpu_problems:
            lines.append(Problem(f"host `{name}`: {problem.get('message')}",
                                 problem.get("hint") or "").render("warning: "))
    return lines


def run(args: argparse.Namespace) -> int:
    from stack.observe import gather

    path = Path(args.file)
    spec = load(path)
    observed = gather(spec, path.resolve().parent, hosts=args.host,
                      trust_new=hostkeys.trust_new(args, os.environ))
    if args.out:
        Path(args.out).write_text(json.dumps(observed.model_dump(mode="json"), indent=2) + "\n")
        reachable = sum(1 for n in observed.nodes.values() if n.reachable)
        print(f"wrote facts of {reachable}/{len(observed.nodes)} hosts to {args.out}")
    else:
        Console().print(render_table(observed))
    for line in problems(observed):
        print(line, file=sys.stderr)
    return 1 if any(not n.reachable for n in observed.nodes.values()) else 0
