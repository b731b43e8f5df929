"""stack.toml and router.json read `listen` with one grammar (`router.config.parse_listen`):
the router accepts the router.json `stack apply` writes from a stack.toml that validated,
and both refuse the same public addresses without keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from router_harness import ROUTER, Proc, get

from router.config import Key, RouterConfig, check
from stack.config import check_text

KEY_HASH = "sha256:" + "0" * 64
LISTENS = [
    ":8080", "0.0.0.0:8080", "[::]:8080", "127.0.0.1:8080", "127.0.0.9:8080",
    "127.example.com:8080", "localhost:8080", "[::1]:8080", "::1:8080", "10.0.0.5:8080",
    "127.0.0.1", "[::1]", "[router]:8080", "my host:8080", "127.0.0.1:65536",
]


def _stack_toml(listen: str, with_key: bool) -> str:
    text = f"[router]\nlisten = {json.dumps(listen)}\n"
    if with_key:
        text += f'\n[[keys]]\nname = "ci"\nhash = "{KEY_HASH}"\n'
    return text


@pytest.mark.parametrize("with_key", [False, True], ids=["no-keys", "a-key"])
@pytest.mark.parametrize("listen", LISTENS)
def test_stack_toml_and_router_json_accept_and_refuse_the_same_listen(
        listen: str, with_key: bool) -> None:
    _, stack_problems = check_text(_stack_toml(listen, with_key))
    keys = [Key(name="ci", hash=KEY_HASH)] if with_key else []
    router_problem = check(RouterConfig(listen=listen, keys=keys))
    assert bool(stack_problems) == (router_problem is not None), (stack_problems, router_problem)


def test_port_zero_is_for_the_router_alone_not_for_stack_toml() -> None:
    assert check(RouterConfig(listen="127.0.0.1:0")) is None
    _, problems = check_text(_stack_toml("127.0.0.1:0", with_key=False))
    assert [p.message for p in problems] == [
        '`router.listen` must be HOST:PORT, got "127.0.0.1:0": port 0 means any free port, '
        "and clients need to know it (stack.toml:2:10)"]


def test_a_port_only_listen_serves_on_every_ipv4_interface(tmp_path: Path) -> None:
    config = tmp_path / "router.json"
    config.write_text(json.dumps({"listen": ":0", "keys": [{"name": "ci", "hash": KEY_HASH}]}))
    proc = Proc([*ROUTER, "--config", str(config)], r"listening on http://0\.0\.0\.0:(\d+)",
                tmp_path / "router.log")
    try:
        assert get(proc.port, "/healthz")[0] == 200  # reached on 127.0.0.1
    finally:
        proc.stop()
