"""Remove a stale apply lock left by an apply that was killed: `.stack/lock` beside
stack.toml and `PREFIX/state/apply.lock` on every host, only where they hold this ID.

Only do this when no apply is running: the lock is what keeps two from interleaving.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stack.errors import LockError

HELP = "remove a stale apply lock by its ID"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lock_id", metavar="ID", help="the lock ID that apply printed")


def run(args: argparse.Namespace) -> int:
    import gevent

    from stack import lock
    from stack.config import load
    from stack.nodes import node_prefix
    from stack.remote import run as run_on
    from stack.remote import session

    path = Path(args.file)
    spec = load(path)
    stack_dir = path.resolve().parent
    local = lock.read_local(stack_dir)
    removed = lock.release_local(stack_dir, args.lock_id)
    if local is not None and not removed:
        raise LockError(f"the lock in `{stack_dir / lock.LOCAL_LOCK}` is `{local.id}`, "
                        f"not `{args.lock_id}`",
                        hint=f"check the ID; the current holder: {local.describe()}.")
    with session(spec, stack_dir) as connected:
        def one(name: str) -> None:
            run_on(connected.nodes[name],
                   lock.host_release_script(node_prefix(spec, name), args.lock_id))

        gevent.joinall([gevent.spawn(one, n) for n in connected.nodes
                        if n not in connected.errors])
    for problem in connected.errors.values():
        print(f"warning: {problem.message} (its lock, if any, stays)")
    print(f"Lock `{args.lock_id}` removed.")
    return 0
