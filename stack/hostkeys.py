"""Pinned SSH host keys: what a host offers, what known_hosts pins, and recording it.

    refuse_in_ci(what, environ)              no learning keys where `CI` is set
    offered(address, port) -> PKey          the key the host shows (a handshake, no login)
    pinned(file, address, port) -> [PKey]    the keys a known_hosts file lists for it
    fingerprint(key) -> "SHA256:..."         as `ssh-keygen -lf` prints it
    record(file, address, port, key)         the host's entry replaced by `key`
    key_problem(node, address, port, file)   why a connection was refused, with both keys

`stack` connects with `StrictHostKeyChecking=yes` against the known_hosts file stack.toml
names (`[stack] known_hosts`, kept in git): a host whose key is not pinned, or differs, is
refused before any command runs there. `stack hosts trust` is the one way keys get in
(or `--trust-new-hosts` on an operator's own machine, never when `CI` is set).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from paramiko import HostKeys, PKey, SSHException, Transport

from stack.errors import ConfigError, Problem

SCAN_TIMEOUT = 10.0
DEFAULT_FILE = "~/.ssh/known_hosts"


def refuse_in_ci(what: str, environ: Mapping[str, str]) -> None:
    """Learning a host key from the network is for an operator's own machine, never CI."""
    if environ.get("CI", "").lower() not in ("", "0", "false"):
        raise ConfigError(
            f"`{what}` accepts whatever keys the network shows, so it is refused when `CI` "
            "is set",
            "run `stack hosts trust` on a machine you trust, check the fingerprints it "
            "prints, and commit the known_hosts file; CI then checks keys against it.")


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """`--trust-new-hosts` for the commands that connect to the fleet (plan, apply, facts)."""
    parser.add_argument("--trust-new-hosts", action="store_true",
                        help="accept and record SSH keys of hosts never seen before "
                        "(refused when CI is set; see `stack hosts trust`)")


def trust_new(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """Whether this run may learn new host keys (`--trust-new-hosts`, never in CI)."""
    if getattr(args, "trust_new_hosts", False):
        refuse_in_ci("--trust-new-hosts", environ)
        return True
    return False


def entry_name(address: str, port: int) -> str:
    """The name known_hosts files use: `host` on port 22, else `[host]:port`."""
    return address if port == 22 else f"[{address}]:{port}"


def fingerprint(key: PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def offered(address: str, port: int, timeout: float = SCAN_TIMEOUT) -> PKey:
    """The host key `address:port` offers, from a key exchange without logging in."""
    sock = socket.create_connection((address, port), timeout=timeout)
    transport = Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    finally:
        transport.close()
        sock.close()


def _load(file: Path) -> HostKeys:
    keys = HostKeys()
    if file.is_file():
        keys.load(str(file))
    return keys


def pinned(file: Path, address: str, port: int) -> list[PKey]:
    entry = _load(file).lookup(entry_name(address, port))
    return list(entry.values()) if entry else []


def record(file: Path, address: str, port: int, key: PKey) -> None:
    """Pin `key` for the host: its earlier entries (any key type) are replaced."""
    keys = _load(file)
    name = entry_name(address, port)
    if name in keys:
        del keys[name]
    keys.add(name, key.get_name(), key)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    keys.save(str(tmp))
    os.replace(tmp, file)
    forget_cached()


def forget_cached() -> None:
    """pyinfra memoizes known_hosts files per process: the next connection reads them
    again (a file `record` just wrote, or one a test changed between two runs)."""
    from pyinfra.connectors.sshuserclient import client

    cache = getattr(client.get_host_keys, "cache", None)
    if cache is not None:
        cache.clear()


def key_problem(node: str, address: str, port: int, file: Path) -> Problem:
    """Why `node` was refused: the key it offers, and the one `file` pins (if any)."""
    where = f"host `{node}` ({address}:{port})"
    try:
        key = offered(address, port)
    except (OSError, SSHException) as exc:
        return Problem(f"{where} has an unknown or changed SSH host key, and showing it "
                       f"again failed: {exc}",
                       f"run `stack hosts trust --host {node}` once it answers.")
    have = pinned(file, address, port)
    if not have:
        return Problem(
            f"{where} offers SSH host key {fingerprint(key)} ({key.get_name()}), which "
            f"`{file}` does not list",
            f"if that is the host's key (ask its owner, or compare with `ssh-keygen -lf` on "
            f"the host), run `stack hosts trust --host {node}` and commit `{file.name}`.")
    pins = ", ".join(fingerprint(k) for k in have)
    return Problem(
        f"{where} offers SSH host key {fingerprint(key)}, but `{file}` pins {pins}: the host "
        "was reinstalled, or this is not the host",
        f"nothing was run there; if the new key is right (ask its owner), run `stack hosts "
        f"trust --host {node}` and commit `{file.name}`.")
