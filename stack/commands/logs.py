"""Print the log of a model's instance (the backend's output, as the agent keeps it under
`PREFIX/logs/<instance>.log`), read over SSH from the node it runs on.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from stack.errors import ConfigError, StackError

HELP = "show the log of a model's instance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the model's name in stack.toml")
    parser.add_argument("--replica", type=int, default=0, metavar="N",
                        help="which replica (default 0)")
    parser.add_argument("--tail", type=int, default=100, metavar="N",
                        help="number of lines (default 100)")


def run(args: argparse.Namespace) -> int:
    import gevent

    from stack.config import load
    from stack.nodes import node_prefix
    from stack.observe import read_node
    from stack.placement import instance_id
    from stack.remote import run as run_on
    from stack.remote import session

    path = Path(args.file)
    spec = load(path)
    if args.model not in spec.models:
        names = ", ".join(sorted(spec.models)) or "none"
        raise ConfigError(f"no model `{args.model}` in `{path}` (models: {names})",
                          hint="pass a name from `[models]`.")
    wanted = instance_id(args.model, args.replica)
    with session(spec, path.resolve().parent) as connected:
        found: list[str] = []

        def look(name: str) -> None:
            facts = read_node(spec, connected, name)
            if any(i.id == wanted for i in facts.agent.instances):
                found.append(name)

        gevent.joinall([gevent.spawn(look, n) for n in connected.nodes
                        if n not in connected.errors])
        if not found:
            raise StackError(f"no agent runs `{wanted}` (model `{args.model}`, replica "
                             f"{args.replica})",
                             hint="run `stack status` to see where instances run, or "
                                  "`stack apply` to start them.")
        node = found[0]
        log = f"{node_prefix(spec, node)}/logs/{wanted}.log"
        ok, out, err = run_on(connected.nodes[node],
                              f"tail -n {int(args.tail)} {shlex.quote(log)}")
        if not ok:
            raise StackError(f"cannot read `{log}` on `{node}`: {err.strip()}",
                             hint="the instance may not have started yet; see `stack status`.")
        sys.stdout.write(out if out.endswith("\n") or not out else out + "\n")
        return 0
