"""Pinned host keys over real sshd's: `stack hosts trust` records what OpenSSH would, CI
never learns a key, and a host whose key changed is refused with both fingerprints."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import Fleet, _keygen, run_stack

pytestmark = pytest.mark.integration


def _ssh_keygen_fingerprint(public_key: Path) -> str:
    """The SHA256 fingerprint as OpenSSH prints it (`ssh-keygen -lf`)."""
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[1]


def _stack(fleet: Fleet, work: Path) -> None:
    inventory = "\n".join(line for line in fleet.inventory_toml().splitlines()
                          if not line.startswith("known_hosts"))  # the stack's file instead
    (work / "stack.toml").write_text(
        f'[stack]\nname = "keys"\nknown_hosts = "known_hosts"\n\n{inventory}\n')


def _run(*args: str, cwd: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    with pytest.MonkeyPatch.context() as patch:
        if ci:
            patch.setenv("CI", "true")
        else:
            patch.delenv("CI", raising=False)
        return run_stack(*args, cwd=cwd, timeout=120)


def test_keys_are_pinned_by_trust_and_a_changed_key_is_refused_with_both_fingerprints(
        make_fleet: Any, tmp_path: Path) -> None:
    fleet: Fleet = make_fleet(1)
    host = fleet.hosts["node-01"]
    _stack(fleet, tmp_path)

    # nothing pinned yet: CI refuses the host and names the key it offers
    first = _run("facts", cwd=tmp_path, ci=True)
    offered = _ssh_keygen_fingerprint(host.path / "host_key.pub")
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"host `node-01` ({host.address}:{host.port}) offers SSH host key {offered}" \
        in first.stdout + first.stderr
    assert "does not list" in first.stdout + first.stderr
    assert not (tmp_path / "known_hosts").exists()

    # CI never learns a key, by either door
    for args in (("hosts", "trust"), ("facts", "--trust-new-hosts")):
        refused = _run(*args, cwd=tmp_path, ci=True)
        assert refused.returncode == 1
        assert "refused when `CI` is set" in refused.stderr
        assert not (tmp_path / "known_hosts").exists()

    # an operator pins it: the fingerprint printed is the one OpenSSH computes
    trusted = _run("hosts", "trust", cwd=tmp_path, ci=False)
    assert trusted.returncode == 0, trusted.stderr
    assert f"node-01 ({host.address}:{host.port}): ssh-ed25519 {offered} recorded in " \
           "`known_hosts`" in trusted.stdout
    pinned = (tmp_path / "known_hosts").read_text()
    assert pinned.startswith(f"[{host.address}]:{host.port} ssh-ed25519 ")
    again = _run("hosts", "trust", cwd=tmp_path, ci=False)
    assert "already in `known_hosts`" in again.stdout

    # the pinned fleet is read in CI without a prompt
    ok = _run("facts", cwd=tmp_path, ci=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # the host is reinstalled (a new key): refused, both keys named, nothing run there
    fleet.stop_host("node-01")
    for suffix in ("", ".pub"):
        (host.path / f"host_key{suffix}").unlink()
    _keygen(host.path / "host_key", "fleet-node-01-reinstalled")
    fleet.start_host("node-01")
    new = _ssh_keygen_fingerprint(host.path / "host_key.pub")
    assert new != offered
    changed = _run("apply", "--auto-approve", cwd=tmp_path, ci=True)
    text = " ".join((changed.stdout + changed.stderr).split())  # rich wraps long lines
    assert changed.returncode == 1, text
    assert not (host.prefix / "state").exists()  # apply ran nothing there
    assert f"offers SSH host key {new}, but `{tmp_path / 'known_hosts'}` pins {offered}" in text
    assert "stack hosts trust --host node-01" in text
    # --trust-new-hosts learns only new hosts: a changed key stays refused
    still = _run("facts", "--trust-new-hosts", cwd=tmp_path, ci=False)
    assert still.returncode == 1
    assert f"pins {offered}" in still.stdout + still.stderr
    assert (tmp_path / "known_hosts").read_text() == pinned
