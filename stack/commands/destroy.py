"""Stop everything the stack runs: every model instance (the agents are given an empty
assignment and wait for their backends to stop), then the routers and the agents. With
`--purge`, also remove what apply installed under the prefix (runtimes, the agent, model
files, state); drivers stay.

On a terminal it asks for `yes`; elsewhere it needs `--auto-approve`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from stack.errors import ApplyError, ConfigError, StackError
from stack.spec import StackSpec

if TYPE_CHECKING:
    from stack.remote import Host

HELP = "stop the stack's instances, routers and agents (--purge: remove them too)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auto-approve", action="store_true",
                        help="destroy without asking (needed without a terminal)")
    parser.add_argument("--purge", action="store_true",
                        help="also remove runtimes, the agent, model files and state")


def purge_script(prefix: str) -> str:
    """What `--purge` removes under a prefix."""
    q = shlex.quote
    parts = ("runtimes", "agent", "models", "state", "etc", "run", "logs")
    return "rm -rf " + " ".join(q(f"{prefix}/{p}") for p in parts)


def destroy_host(spec: StackSpec, name: str, host: Host, prefix: str, manager: str,
                  purge: bool) -> str | None:
    """Stop one host's instances, router and agent, and remove the host's record of the
    stack; the error, if any."""
    from agent.assignment import Assignment
    from deploys.probe import dumps
    from deploys.services import stop_commands
    from deploys.steps import record_remove_command
    from stack.hostfiles import agent_service, router_service
    from stack.neighbours import own_record
    from stack.remote import run as run_on
    from stack.remote import write

    empty = dumps(Assignment(node=name).model_dump(mode="json")).encode()
    assignment = f"{prefix}/state/assignment.json"
    try:
        ok, out, _ = run_on(host, f"test -d {shlex.quote(prefix + '/state')} && echo present")
        if "present" in out:
            write(host, assignment, empty, "600")
            status = shlex.quote(f"{prefix}/state/status.json")
            # the agent stops its backends (TERM, grace, KILL) and reports none left
            run_on(host, f"i=0; while [ $i -lt 300 ] && grep -q '\"id\"' {status} 2>/dev/null; "
                       "do sleep 0.2; i=$((i+1)); done")
        for service in (router_service(spec, prefix, manager),
                        agent_service(spec, prefix, manager)):
            for command in stop_commands(service):
                run_on(host, command)
        if purge:
            ok, _, err = run_on(host, purge_script(prefix))
            if not ok:
                return f"`{name}`: could not remove {prefix}: {err.strip()}"
        run_on(host, record_remove_command(own_record(spec, name)))
    except StackError as err:
        return err.message
    return None


def run(args: argparse.Namespace) -> int:
    import gevent

    from stack import lock
    from stack.config import load
    from stack.neighbours import node_conflicts
    from stack.nodes import node_prefix
    from stack.observe import read_node
    from stack.remote import run as run_on
    from stack.remote import session

    path = Path(args.file)
    spec = load(path)
    stack_dir = path.resolve().parent
    console = Console()
    if not args.auto_approve:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise ConfigError("`stack destroy` asks for confirmation, but there is no terminal",
                              hint="pass `--auto-approve`.")
        what = "and remove " if args.purge else ""
        answer = console.input(f"Stop {what}every instance, router and agent of "
                               f"`{spec.stack.name}`? Only `yes` is accepted: ")
        if answer.strip() != "yes":
            raise ApplyError("destroy cancelled; nothing was changed")
    info = lock.new_lock()
    lock.acquire_local(stack_dir, info)
    errors: dict[str, str] = {}
    started = time.monotonic()
    try:
        with session(spec, stack_dir) as connected:
            errors.update({n: p.message for n, p in connected.errors.items()})

            def one(name: str) -> None:
                facts = read_node(spec, connected, name)
                host, prefix = connected.nodes[name], node_prefix(spec, name)
                # another stack in this prefix (or around it): its services, not ours
                clash = node_conflicts(spec, name, facts, ports=False)
                if clash:
                    errors[name] = f"{clash[0].error}; nothing was stopped there"
                    return
                try:  # the same host lock as apply: never destroy under a running apply
                    _, out, _ = run_on(host, f"if [ -d {shlex.quote(prefix)} ]; then "
                                             f"{lock.host_acquire_script(prefix, info)}; fi")
                    lock.check_host_lock(out, name)
                except StackError as err:
                    errors[name] = err.message
                    return
                try:
                    error = destroy_host(spec, name, host, prefix,
                                          facts.service_manager or "supervise", args.purge)
                finally:
                    run_on(host, lock.host_release_script(prefix, info.id))
                if error:
                    errors[name] = error

            gevent.joinall([gevent.spawn(one, n) for n in connected.nodes
                            if n not in connected.errors])
    finally:
        lock.release_local(stack_dir, info.id)
    for name in sorted(connected.nodes):
        if name in errors:
            console.print(f"[red]✗[/red] {name}: {errors[name]}", highlight=False)
        else:
            console.print(f"[green]✓[/green] {name}: stopped"
                          + (" and purged" if args.purge else ""), highlight=False)
    console.print(f"Destroy finished in {time.monotonic() - started:.1f} s.")
    return 1 if errors else 0

