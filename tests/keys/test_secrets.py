"""The stack secret, derived keys and key hashes (the router relies on `hash_key`)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from stack.errors import ConfigError
from stack.secrets import derive_key, generate_key, hash_key, stack_secret


def test_hash_key_is_sha256_hex_of_the_key() -> None:
    assert hash_key("foo") == (
        "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
    key = generate_key()
    assert hash_key(key) == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_generated_keys_are_long_random_and_url_safe() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("sk-") and len(key) == 3 + 43
        assert set(key[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   "0123456789-_")


def test_derived_keys_are_stable_per_secret_and_purpose() -> None:
    one = derive_key(b"s" * 32, "instance:gpu-01:qwen-0")
    assert one == derive_key(b"s" * 32, "instance:gpu-01:qwen-0")
    assert one != derive_key(b"s" * 32, "instance:gpu-01:qwen-1")
    assert one != derive_key(b"t" * 32, "instance:gpu-01:qwen-0")
    assert one.startswith("sk-") and len(one) == 3 + 43


def test_secret_file_is_made_once_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STACK_SECRET", raising=False)
    first = stack_secret(tmp_path)
    path = tmp_path / ".stack" / "secret"
    assert len(first) == 32 and path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stack_secret(tmp_path) == first


def test_secret_from_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_SECRET", "from-ci-vault")
    assert stack_secret(tmp_path) == b"from-ci-vault"
    assert not (tmp_path / ".stack").exists()


def test_a_secret_file_others_can_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STACK_SECRET", raising=False)
    stack_secret(tmp_path)
    path = tmp_path / ".stack" / "secret"
    path.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        stack_secret(tmp_path)
    assert caught.value.message == f"`{path}` can be read by other users (mode 644)"
    assert caught.value.hint.startswith(f"run `chmod 600 {path}`")
