"""Print the log of a model's instance (the backend's output, as the agent keeps it under
`PREFIX/logs/<instance>.log`), read over SSH from the node it runs on.

The host's agent Python runs `agent.logs` there (agent/logs.py): `--since` starts at the
agent's time marks of the log (10 s apart), and `-f` follows the file like `tail -F`,
through the agent's copy-and-truncate rotation and restarts of the backend, until Ctrl-C.
It reads the files, not the agent's API, so it works while the agent is down too.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from stack.errors import ConfigError, StackError

HELP = "show (or follow) the log of a model's instance"
FILE_FLAGS = ("--file",)  # `-f` is follow here, or the file before MODEL (`_resolve_f`)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="the model's name in stack.toml")
    parser.add_argument("--replica", type=int, default=0, metavar="N",
                        help="which replica (default 0)")
    parser.add_argument("--tail", type=int, default=None, metavar="N",
                        help="only the last N lines (default 100; all with `--since`)")
    parser.add_argument("--since", default=None, metavar="DURATION",
                        help="only output of the last DURATION (`30s`, `10m`, `2h`, `1d`), "
                             "to within 10 s")
    parser.add_argument("--follow", action="store_true",
                        help="keep printing new output (across restarts) until Ctrl-C")
    parser.add_argument("-f", dest="f", nargs="?", const=True, default=None,
                        metavar="FILE", help="follow, as `--follow` (`stack logs MODEL -f`); "
                        "followed by a file and a model, the stack file as on every command "
                        "(`stack logs -f stack.toml MODEL`)")


def _resolve_f(args: argparse.Namespace) -> None:
    """`-f` is follow (`logs MODEL -f`, `logs -f MODEL`), as with tail and kubectl; with both
    a value and MODEL after it, it is the stack file every other command takes
    (`logs -f FILE MODEL`). Decided by the words given, never by what exists on disk."""
    if isinstance(args.f, str) and args.model is None:
        args.model, args.follow = args.f, True
    elif isinstance(args.f, str):
        args.file = args.f
    elif args.f:
        args.follow = True
    if args.model is None:
        raise ConfigError("`stack logs` needs the model's name",
                          hint="e.g. `stack logs gemma`, or `stack logs gemma -f` to follow.")


def parse_duration(text: str) -> float:
    """Seconds in `30s`, `10m`, `2h` or `1d`; ConfigError naming `--since` otherwise."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise ConfigError(f"`--since` must be a duration like `30s`, `10m` or `2h`, got "
                          f"`{text}`", hint="use a number followed by s, m, h or d.")
    return float(found.group(1)) * _UNIT[found.group(2)]


def _check(args: argparse.Namespace) -> float | None:
    """The flags' values checked; returns `--since` in seconds."""
    _resolve_f(args)
    if args.replica < 0:
        raise ConfigError(f"`--replica` cannot be negative, got {args.replica}",
                          hint="replicas count from 0; see `stack status`.")
    if args.tail is not None and args.tail < 0:
        raise ConfigError(f"`--tail` cannot be negative, got {args.tail}",
                          hint="pass the number of lines to show, e.g. `--tail 100`.")
    return None if args.since is None else parse_duration(args.since)


def logs_command(prefix: str, log: str, since: float | None, tail: int | None,
                 follow: bool) -> str:
    """The shell command that prints (and follows) `log` on its host."""
    q = shlex.quote
    parts = [q(f"{prefix}/agent/venv/bin/python"), "-I", "-m", "agent.logs", q(log)]
    if since is not None:
        parts += ["--since", f"{since:g}"]
    if tail is not None:
        parts += ["--tail", str(int(tail))]
    if follow:
        parts.append("--follow")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    import gevent

    from stack.config import load
    from stack.nodes import node_prefix
    from stack.observe import read_node
    from stack.placement import instance_id
    from stack.remote import session, stream

    since = _check(args)
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
        prefix = node_prefix(spec, node)
        log = f"{prefix}/logs/{wanted}.log"
        command = logs_command(prefix, log, since, args.tail, args.follow)
        try:
            code, err = stream(connected.nodes[node], command, sys.stdout.buffer)
        except KeyboardInterrupt:
            return 0
        if code != 0:
            raise StackError(f"cannot read `{log}` on `{node}`: {err.strip()}",
                             hint="the instance may not have started yet; see `stack status`.")
        return 0
