"""SSH connections have Nagle off and acknowledge at once (stack.sshtcp), over a real sshd.

Without it every small SSH packet can wait for a 40 ms delayed ACK (bench/facts_bench.py
measures the time; here only the socket settings and that the connection works).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fleet import Fleet
from pyinfra.api.inventory import Inventory
from pyinfra.context import ctx_host, ctx_state

from stack import observe, sshtcp
from stack.config import load_text
from stack.observe import build_inventory, connect, disconnect


def test_every_ssh_connection_runs_on_a_tcp_socket_without_nagle() -> None:
    with Fleet(n=1) as fleet:
        connected = connect(load_text(fleet.inventory_toml()), fleet.root)
        try:
            host = connected.nodes["node-01"]
            sock = host.connector.client.get_transport().sock  # type: ignore[attr-defined]
            assert isinstance(sock, sshtcp._QuickAckSocket)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            with ctx_state.use(connected.state), ctx_host.use(host):
                ok, output = host.run_shell_command("echo hello", print_output=False,
                                                    print_input=False)
            assert ok and output.stdout_lines == ["hello"]
        finally:
            disconnect(connected)


def test_a_users_own_paramiko_arguments_are_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what pyinfra's loader makes of an inventory file with the user's own paramiko kwargs
    # (loading a file for real imports pyinfra_cli, which gevent-patches this test process)
    hosts = [("gpu-1", {"ssh_paramiko_connect_kwargs": {"banner_timeout": 7}})]
    users = Inventory((hosts, {}))  # type: ignore[no-untyped-call]
    monkeypatch.setattr(observe, "_inventory_file", lambda spec, stack_dir: users)
    spec = load_text('[stack]\ninventory = "inventory.py"\n')
    built, _ = build_inventory(spec, tmp_path)
    kwargs = built.get_host("gpu-1").data.ssh_paramiko_connect_kwargs
    assert kwargs == {"transport_factory": sshtcp.transport, "banner_timeout": 7}


def test_a_socket_that_is_not_tcp_is_passed_through() -> None:
    left, right = socket.socketpair()
    with left, right:
        transport = sshtcp.transport(left)
        assert transport.sock is left
        transport.close()
