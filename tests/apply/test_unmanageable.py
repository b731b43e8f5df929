"""Hosts apply refuses before touching them, each with its reason and a hint."""

from __future__ import annotations

from stack.apply.hosts import unmanageable
from stack.snapshot import NodeFacts


def test_a_windows_host_is_refused_because_pyinfra_cannot_manage_it() -> None:
    facts = NodeFacts(os="windows", reachable=True,
                      error="host `win-01` (10.0.0.9) has no POSIX sh (a Windows host?)\n"
                            "hint: pyinfra 3 cannot manage Windows hosts")
    assert unmanageable("win-01", facts) == (
        "`win-01` runs Windows, which pyinfra 3 cannot manage",
        "remove it from the stack, or serve from a Linux VM (or WSL with an SSH server) on it.",
    )


def test_an_unreachable_host_keeps_the_facts_message_and_hint() -> None:
    facts = NodeFacts(reachable=False, error="host `gpu-02` (10.0.0.12) is unreachable: "
                      "timed out\nhint: check that `gpu-02` is up")
    assert unmanageable("gpu-02", facts) == (
        "host `gpu-02` (10.0.0.12) is unreachable: timed out", "check that `gpu-02` is up")


def test_a_linux_host_that_answers_is_managed() -> None:
    assert unmanageable("gpu-01", NodeFacts(os="linux")) is None
