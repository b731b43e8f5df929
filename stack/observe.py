"""Reading the fleet: connect to every host with pyinfra and gather its facts once.

    gather(spec, stack_dir) -> Observed      facts of every host, in parallel
    connect(spec, stack_dir) -> Connected    a connected pyinfra State + per-host errors
    make_state(spec, stack_dir) -> State     the same State, for deploys

Hosts come from `[hosts.NAME]` in stack.toml (address `@local` is this machine) or from
the pyinfra inventory file named by `stack.inventory`, loaded the way the pyinfra CLI
loads it. `[nodes."PATTERN"]` settings (user, port, key, sudo, prefix) apply on top.

This is the boundary where pyinfra and paramiko errors become messages: a host that does
not answer, refuses the key or lacks sudo is a `NodeFacts(reachable=False, error=...)`
naming the host with a hint, and the other hosts go on. Connecting and reading the facts
run in one greenlet per host; they overlap only when gevent has patched the process (the
CLI does it first thing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent
from paramiko.ssh_exception import SSHException
from pyinfra.api.config import Config
from pyinfra.api.exceptions import ConnectError, FactProcessError, PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.context import ctx_host, ctx_state

from deploys.facts import HostFacts, facts_command, node_facts_from
from stack import hostkeys, sshtcp
from stack.errors import ConfigError, Problem
from stack.nodes import node_prefix, node_settings
from stack.snapshot import NodeFacts, Observed
from stack.spec import StackSpec

CONNECT_TIMEOUT = 10
FACTS_TIMEOUT = 120


@dataclass
class Connected:
    """A pyinfra State whose reachable hosts are connected, and why the others are not."""

    state: State
    nodes: dict[str, Host] = field(default_factory=dict)  # node name -> pyinfra host
    addresses: dict[str, str] = field(default_factory=dict)  # node name -> SSH address
    errors: dict[str, Problem] = field(default_factory=dict)  # node name -> why not


def _inline_hosts(spec: StackSpec, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    entries = []
    for name in names:
        host = spec.hosts[name]
        if host.address == "@local":
            entries.append(("@local", {"stack_node": name}))
            continue
        data: dict[str, Any] = {"stack_node": name, "ssh_hostname": host.address}
        if host.known_hosts:
            data["ssh_known_hosts_file"] = host.known_hosts
        entries.append((name, data))
    return entries


def _inventory_file(spec: StackSpec, stack_dir: Path) -> Inventory:
    from pyinfra_cli.inventory import make_inventory_from_files

    assert spec.stack.inventory is not None
    path = (stack_dir / spec.stack.inventory).resolve()
    if not path.is_file():
        raise ConfigError(
            f"`stack.inventory` names `{spec.stack.inventory}`, which does not exist",
            hint=f"create the pyinfra inventory file at {path}, or list hosts under `[hosts]`.",
        )
    try:
        # pyinfra's loader records the file it runs on the current State
        with ctx_state.use(State(check_for_changes=False)):
            inventory: Inventory = make_inventory_from_files(str(path), cwd=str(stack_dir))
        return inventory
    except Exception as exc:  # an inventory is user code: any error is a config error
        raise ConfigError(
            f"the inventory file `{spec.stack.inventory}` cannot be loaded: {exc}",
            hint="run it with python to see the error; it must define lists of hosts.",
        ) from exc


def build_inventory(spec: StackSpec, stack_dir: Path, hosts: list[str] | None = None,
                    trust_new: bool = False) -> tuple[Inventory, dict[str, str]]:
    """The pyinfra Inventory of the stack (and node name -> SSH address). Host keys are
    checked strictly against the stack's known_hosts (`stack.hostkeys`); `trust_new`
    accepts and records keys never seen before (changed keys are refused either way)."""
    if spec.stack.inventory:
        inventory = _inventory_file(spec, stack_dir)
        names = [h.name for h in inventory]
        if hosts is not None:
            names = [n for n in names if n in hosts]
            entries = [(n, dict(inventory.get_host_data(n))) for n in names]
            data = dict(inventory.get_data())  # type: ignore[no-untyped-call]
            inventory = Inventory((entries, data))  # type: ignore[no-untyped-call]
        for host in inventory:
            host.data.stack_node = host.name
    else:
        names = [n for n in spec.hosts if hosts is None or n in hosts]
        inventory = Inventory((_inline_hosts(spec, names), {}))  # type: ignore[no-untyped-call]
    unknown = sorted(set(hosts or []) - {h.data.stack_node for h in inventory})
    if unknown:
        raise ConfigError(f"no host named `{unknown[0]}` in the stack",
                          hint="check the name against `[hosts]` or the inventory file.")
    addresses: dict[str, str] = {}
    for host in inventory:
        node = str(host.data.stack_node)
        settings = node_settings(spec, node)
        for ours, theirs in (("ssh_user", "ssh_user"), ("ssh_port", "ssh_port"),
                             ("ssh_key", "ssh_key")):
            value = getattr(settings, ours)
            if value is not None:
                setattr(host.data, theirs, value)
        if settings.sudo:
            host.data._sudo = True
        if host.data.get("ssh_known_hosts_file") is None and spec.stack.known_hosts:
            host.data.ssh_known_hosts_file = str((stack_dir / spec.stack.known_hosts).resolve())
        if host.data.get("ssh_strict_host_key_checking") is None:  # an inventory's own wins
            host.data.ssh_strict_host_key_checking = "accept-new" if trust_new else "yes"
        # no Nagle / delayed-ACK stalls (stack.sshtcp); a user's own paramiko kwargs win
        host.data.ssh_paramiko_connect_kwargs = {
            "transport_factory": sshtcp.transport,
            **(host.data.get("ssh_paramiko_connect_kwargs") or {}),
        }
        address = host.data.get("ssh_hostname") or host.name
        addresses[node] = "127.0.0.1" if address == "@local" else str(address)
    return inventory, addresses


def _connect_error(node: str, address: str, exc: Exception) -> Problem:
    text = str(exc.args[0] if exc.args else exc)
    lowered = text.lower()
    if "authentication" in lowered or "no authentication" in lowered or "permission denied" \
            in lowered:
        hint = (f"check the SSH user and key for `{node}` (`[nodes.\"{node}\"] ssh_user` / "
                "`ssh_key`) and that the key is in the host's authorized_keys.")
        return Problem(f"host `{node}` ({address}) refused the SSH key: {text}", hint)
    hint = f"check that `{node}` is up and that SSH listens at {address}; other hosts go on."
    return Problem(f"host `{node}` ({address}) is unreachable: {text}", hint)


def _is_host_key_error(exc: Exception) -> bool:
    text = str(exc.args[0] if exc.args else exc).lower()
    return "host key" in text or "known_hosts" in text


def connect(spec: StackSpec, stack_dir: Path, *, hosts: list[str] | None = None,
            then: Callable[[Connected, str], None] | None = None,
            then_timeout: float = 0, trust_new: bool = False) -> Connected:
    """Connect to every host in parallel; unreachable ones are in `errors`, not raised.

    With `then`, each host's greenlet calls `then(connected, node)` as soon as that host is
    connected (gather reads its facts there), so one host's work overlaps the other hosts'
    handshakes instead of waiting for the slowest of them; `then_timeout` is added to the
    time the greenlets get. A greenlet still in `then` at the deadline is killed and its
    node is left to the caller (it is connected, not in `errors`).
    """
    inventory, addresses = build_inventory(spec, stack_dir, hosts, trust_new)
    hostkeys.forget_cached()  # known_hosts as it is now, not as this process first read it
    config = Config(CONNECT_TIMEOUT=CONNECT_TIMEOUT)  # type: ignore[no-untyped-call]
    state = State(inventory, config)
    connected = Connected(state=state, addresses=addresses)
    for host in inventory:
        connected.nodes[str(host.data.stack_node)] = host

    def one(node: str, host: Host) -> None:
        with ctx_state.use(state), ctx_host.use(host):
            try:
                host.connect(show_errors=False, raise_exceptions=True)
            except (ConnectError, PyinfraError, OSError) as exc:
                port = int(host.data.get("ssh_port") or 22)
                known = Path(host.data.get("ssh_known_hosts_file") or hostkeys.DEFAULT_FILE)
                connected.errors[node] = (
                    hostkeys.key_problem(node, addresses[node], port, known.expanduser())
                    if _is_host_key_error(exc)
                    else _connect_error(node, f"{addresses[node]}:{port}", exc))
                return
        if then is not None:
            then(connected, node)

    with ctx_state.use(state):
        greenlets = [gevent.spawn(one, node, host) for node, host in connected.nodes.items()]
        gevent.joinall(greenlets, timeout=CONNECT_TIMEOUT * 3 + then_timeout)
    for (node, host), greenlet in zip(connected.nodes.items(), greenlets, strict=True):
        if not greenlet.dead:
            greenlet.kill(block=False)
            if not host.connected:
                connected.errors.setdefault(node, _connect_error(
                    node, addresses[node], TimeoutError("connection timed out")))
    if connected.errors:
        failed = {connected.nodes[n] for n in connected.errors}
        # "No hosts remaining!" when all failed: every host is reported, none raised
        with contextlib.suppress(PyinfraError):
            state.fail_hosts(failed)  # type: ignore[no-untyped-call]
    return connected


def make_state(spec: StackSpec, stack_dir: Path, *, hosts: list[str] | None = None) -> State:
    """A pyinfra State with every reachable host connected (failed hosts are marked)."""
    return connect(spec, stack_dir, hosts=hosts).state


def _facts_error(node: str, address: str, stderr: str, sudo: bool) -> tuple[str, Problem]:
    """(os, problem) for a host whose facts script failed."""
    lowered = stderr.lower()
    if "not recognized as an internal or external command" in lowered or "'sh'" in lowered:
        return "windows", Problem(
            f"host `{node}` ({address}) has no POSIX sh (a Windows host?)",
            "pyinfra 3 cannot manage Windows hosts; remove it from the stack or run a Linux "
            "VM (WSL) with SSH on it.")
    if sudo and ("password is required" in lowered or "not in the sudoers" in lowered
                 or "sudo:" in lowered):
        return "unknown", Problem(
            f"host `{node}` ({address}): the SSH user cannot use sudo without a password "
            f"({stderr.strip()[:200]})",
            f"add a NOPASSWD sudoers rule for it, or connect as root and set "
            f"`[nodes.\"{node}\"] sudo = false`.")
    return "unknown", Problem(
        f"host `{node}` ({address}): the facts script failed: "
        f"{stderr.strip()[:300] or 'no output'}",
        "run `sh deploys/facts.sh` on the host by hand to see why.")


def _unreachable(address: str, labels: dict[str, str], problem: Problem,
                 os_name: str = "linux", reachable: bool = False) -> NodeFacts:
    return NodeFacts(address=address, os=os_name, labels=labels, reachable=reachable,
                     error=problem.message, hint=problem.hint or None)


def read_node(spec: StackSpec, connected: Connected, node: str) -> NodeFacts:
    """The facts of one connected host (errors become an unreachable NodeFacts)."""
    host = connected.nodes[node]
    address = connected.addresses[node]
    settings = node_settings(spec, node)
    if node in connected.errors:
        return _unreachable(address, dict(settings.labels), connected.errors[node])
    sudo = bool(settings.sudo)
    with ctx_state.use(connected.state), ctx_host.use(host):
        try:
            status, output = host.run_shell_command(
                facts_command(node_prefix(spec, node)), print_output=False, print_input=False,
                _timeout=FACTS_TIMEOUT, _sudo=sudo,
            )
        except (PyinfraError, OSError, TimeoutError, SSHException, EOFError) as exc:
            return _unreachable(address, dict(settings.labels),
                                _connect_error(node, address, exc))
    if not status:
        os_name, problem = _facts_error(node, address, "\n".join(output.stderr_lines), sudo)
        return _unreachable(address, dict(settings.labels), problem, os_name,
                            reachable=os_name == "windows")
    try:
        raw = HostFacts().process(output.stdout_lines)
    except FactProcessError as exc:
        return _unreachable(address, dict(settings.labels), Problem(
            f"host `{node}` ({address}): {exc}",
            "run `sh deploys/facts.sh` on the host by hand to see its output."))
    return node_facts_from(raw, address=address, labels=dict(settings.labels))


def reconnect(connected: Connected, node: str) -> Problem | None:
    """Connect a host again if its SSH session has ended (it went away, and may be back),
    for readers that keep a session open (`stack status --watch`); the problem if it does
    not answer. Hosts that failed at the start stay in `errors`."""
    host = connected.nodes[node]
    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client is not None else None
    if host.connected and (transport is None or transport.is_active()):
        return None  # connected (or `@local`, which has no SSH session)
    with contextlib.suppress(Exception):  # what is left of the dead session
        host.disconnect()
        if client is not None:
            client.close()
    with ctx_state.use(connected.state), ctx_host.use(host):
        try:
            host.connect(show_errors=False, raise_exceptions=True)
        except (ConnectError, PyinfraError, OSError, SSHException, EOFError) as exc:
            return _connect_error(node, connected.addresses[node], exc)
    return None


def gather(spec: StackSpec, stack_dir: Path, *, hosts: list[str] | None = None,
           now: datetime | None = None, trust_new: bool = False) -> Observed:
    """Facts of every host of the stack, read in parallel; one failing host stops nothing.

    One greenlet per host connects and then reads the facts right away (one SSH round
    trip), overlapping with the other hosts' handshakes.
    """
    results: dict[str, NodeFacts] = {}

    def read(connected: Connected, node: str) -> None:
        results[node] = read_node(spec, connected, node)

    connected = connect(spec, stack_dir, hosts=hosts, then=read, then_timeout=FACTS_TIMEOUT,
                        trust_new=trust_new)
    try:
        for node in connected.nodes:
            if node in connected.errors:
                results[node] = read_node(spec, connected, node)  # the connect error
            results.setdefault(node, _unreachable(
                connected.addresses[node], dict(node_settings(spec, node).labels), Problem(
                    f"host `{node}` did not answer within {FACTS_TIMEOUT} s",
                    "check the host's load and its vendor tools (a hung `nvidia-smi`?).")))
    finally:
        disconnect(connected)
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Observed(collected_at=stamp, nodes={n: results[n] for n in connected.nodes})


def disconnect(connected: Connected) -> None:
    """Close every SSH connection of a Connected.

    pyinfra's SSH connector `disconnect` only drops its file transfer client and leaves the
    paramiko client (and the host's sshd session) open until garbage collection, so the
    client is closed here too.
    """
    for node, host in connected.nodes.items():
        if node not in connected.errors and host.connected:
            try:
                host.disconnect()
                client = getattr(host.connector, "client", None)
                if client is not None:
                    client.close()
            except Exception:  # closing a dead connection must not hide the results
                continue


__all__ = ["Connected", "build_inventory", "connect", "disconnect", "gather", "make_state",
           "read_node", "reconnect"]
