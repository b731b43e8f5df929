"""Pin the hosts' SSH keys: `stack hosts trust [--host NAME]` connects to each host (a key
exchange, no login), prints the key it offers with its fingerprint, and records it in the
known_hosts file stack.toml names (`[stack] known_hosts`; commit it). From then on plan and
apply refuse a host whose key is not the pinned one. Refused when `CI` is set: CI checks
keys, it never learns them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from paramiko import SSHException

from stack import hostkeys
from stack.spec import StackSpec

HELP = "record the hosts' SSH keys in the stack's known_hosts file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="hosts_action", metavar="ACTION", required=True)
    trust = actions.add_parser("trust", help="record the keys the hosts offer now")
    trust.add_argument("--host", action="append", metavar="NAME",
                       help="only this host (repeat for more); default: every host")


def run(args: argparse.Namespace) -> int:
    from stack.config import load
    from stack.observe import build_inventory

    hostkeys.refuse_in_ci("stack hosts trust", os.environ)
    path = Path(args.file)
    spec = load(path)
    stack_dir = path.resolve().parent
    inventory, addresses = build_inventory(spec, stack_dir, args.host)
    failed = 0
    for host in inventory:
        node = str(host.data.stack_node)
        if host.name == "@local":
            print(f"{node}: this machine, no SSH")
            continue
        port = int(host.data.get("ssh_port") or 22)
        file = Path(host.data.get("ssh_known_hosts_file") or hostkeys.DEFAULT_FILE).expanduser()
        failed += not _trust(node, addresses[node], port, file, spec, stack_dir)
    return 1 if failed else 0


def _trust(node: str, address: str, port: int, file: Path, spec: StackSpec,
           stack_dir: Path) -> bool:
    try:
        key = hostkeys.offered(address, port)
    except (OSError, SSHException) as exc:
        print(f"error: host `{node}` ({address}:{port}) did not show its SSH key: {exc}\n"
              f"hint: check that SSH listens there; the other hosts are recorded.")
        return False
    new = hostkeys.fingerprint(key)
    old = [hostkeys.fingerprint(k) for k in hostkeys.pinned(file, address, port)]
    shown = _shown(file, spec, stack_dir)
    if old == [new]:
        print(f"{node} ({address}:{port}): {key.get_name()} {new}, already in {shown}")
        return True
    hostkeys.record(file, address, port, key)
    was = f" (was {', '.join(old)})" if old else ""
    print(f"{node} ({address}:{port}): {key.get_name()} {new} recorded in {shown}{was}")
    return True


def _shown(file: Path, spec: StackSpec, stack_dir: Path) -> str:
    if spec.stack.known_hosts and file == (stack_dir / spec.stack.known_hosts).resolve():
        return f"`{spec.stack.known_hosts}`"
    return f"`{file}`"
