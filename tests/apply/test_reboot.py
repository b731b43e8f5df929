"""Reboots: a needed reboot is a plan item (`disruption: reboot`) that `stack apply` does
only with `--allow-reboot`, one host at a time, each back (SSH answers, no reboot pending,
the driver working) before the next goes down; then the fleet converges.

The pure part (when is a rebooted host back) is tested from `reboot/*.json`. The loopback
fleet test uses fake reboots (tests/fleet.py `install_reboot`): the host's own `reboot`
stops its sshd and every process started over it, waits 2 s and starts it again with the
pending reboot cleared; apply sends the same command a real host gets. About 40 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, gemma_stack_toml, llama_sdist, run_stack

from deploys.drivers import DriverRequest
from deploys.probe import HostState
from deploys.services import Service
from deploys.steps import HostTarget, driver_step
from stack.apply.reboot import back_after_reboot
from stack.secrets import generate_key, hash_key
from stack.snapshot import NodeFacts

CASES = sorted((Path(__file__).parent / "reboot").glob("*.json"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_a_rebooted_host_is_back_only_as_the_case_says(path: Path) -> None:
    case = json.loads(path.read_text())
    before = NodeFacts.model_validate(case["before"])
    after = NodeFacts.model_validate(case["after"])
    requests = [DriverRequest(**r) for r in case["drivers"]]
    assert back_after_reboot(before, after, requests) is case["back"], case["note"]


@pytest.mark.parametrize("pending", [True, False])
def test_a_pending_reboot_is_a_reboot_step_without_driver_settings(pending: bool) -> None:
    """The plan shows `node.NAME.reboot` for any host reporting a pending reboot, so apply
    must reboot it too (else the plan never comes clean), driver settings or not."""
    target = HostTarget(
        node="cpu-01", prefix="/opt/stack", facts=NodeFacts(reboot_required=pending),
        probed=HostState(),
        drivers=[], runtimes=[], runtime_uploads={}, bundle=Path("/b.tar"), bundle_version="v",
        wheel_name="w.whl", agent_toml="", agent_token="", models=[],
        agent_service=Service("agent", "s", "/opt/stack", ("a",)), router_service=None,
    )
    step = driver_step(target)
    assert step.reboot is pending
    assert not step.changes


def _events(fleet: Fleet) -> list[tuple[float, str, str]]:
    return sorted((when, event, name) for name in fleet.hosts
                  for event, when in fleet.reboots(name))


@pytest.mark.integration
def test_hosts_reboot_only_when_allowed_one_at_a_time_then_converge(
        tmp_path: Path, llama_bin: Path, gguf_model: Path) -> None:
    sdist = llama_sdist(llama_bin.parent.parent.parent)  # ~/.cache/modelstack
    key = generate_key()
    with Fleet(2, root=tmp_path / "fleet") as fleet:
        text, url = gemma_stack_toml(fleet, "reboottest", gguf_model, sdist, hash_key(key))
        (tmp_path / "stack.toml").write_text(text)
        names = sorted(fleet.hosts)
        for name in names:
            fleet.require_reboot(name)
            fleet.install_reboot(name)
        try:
            _check_reboots(fleet, tmp_path, names, url, key)
        finally:
            run_stack("destroy", "--auto-approve", cwd=tmp_path, timeout=120)


def _check_reboots(fleet: Fleet, work: Path, names: list[str], url: str, key: str) -> None:
    plan = run_stack("plan", "--json", cwd=work)
    assert plan.returncode == 0, plan.stderr
    reboots = {c["address"]: c["disruption"] for c in json.loads(plan.stdout)["changes"]
               if c["address"].endswith(".reboot")}
    assert reboots == {f"node.{n}.reboot": "reboot" for n in names}

    refused = run_stack("apply", "--auto-approve", cwd=work)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    for name in names:
        assert (f"✗ {name}: `{name}` needs a reboot: the host reports that one is pending"
                in refused.stdout), refused.stdout
    assert "hint: run `stack apply --allow-reboot` (hosts reboot one at a time)." \
        in refused.stdout
    assert _events(fleet) == []

    applied = run_stack("apply", "--auto-approve", "--allow-reboot", cwd=work)
    out = applied.stdout
    assert applied.returncode == 0, out + applied.stderr
    events = _events(fleet)
    first, second = events[0][2], events[2][2]
    # the second host went down only after the first was up again
    assert [(e, n) for _, e, n in events] == [("down", first), ("up", first),
                                              ("down", second), ("up", second)], events
    assert {first, second} == set(names)
    # ... and after apply had seen the first one back over SSH
    assert out.index(f"{first}: back after the reboot") < out.index(f"{second}: rebooting")
    for name in names:
        [report] = [line for line in out.splitlines() if line.startswith(f"✓ {name}: ")]
        assert "rebooted" in report.removeprefix(f"✓ {name}: ").split(", "), out
    assert "Apply complete: 2 hosts converged." in out

    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=key, timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content
    after = run_stack("plan", "--detailed-exitcode", cwd=work)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "reboot" not in after.stdout
    status: dict[str, Any] = json.loads(run_stack("status", "--json", cwd=work).stdout)
    assert [i["state"] for n in names for i in status["nodes"][n]["instances"]] == ["ready"]
