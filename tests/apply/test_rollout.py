"""Rolling assignments: new instances go beside the old ones, held replacements keep
their old version, and an old instance whose port a new one takes must go first; apply
returns once the agents have stopped the instances it removed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.assignment import Assignment, Instance
from stack.apply.hosts import Node as _Node
from stack.apply.report import ApplyOptions, HostReport
from stack.apply.rollout import _surge, _wait_gone
from stack.snapshot import NodeFacts


def inst(iid: str, port: int, args: list[str] | None = None) -> Instance:
    return Instance(id=iid, model=iid.rsplit("-", 1)[0], source="/m.gguf", backend="llama.cpp",
                    runtime_path="/opt/stack/runtimes/llama.cpp/1", port=port,
                    args=args or [])


def test_new_instances_are_added_beside_the_ones_they_replace() -> None:
    current = Assignment(node="a", instances=[inst("old-0", 40000)])
    desired = Assignment(node="a", instances=[inst("new-0", 40001)])
    assert [i.id for i in _surge(current, desired, set()).instances] == ["new-0", "old-0"]


def test_a_held_replacement_keeps_its_running_version() -> None:
    before = inst("m-0", 40000, ["--old"])
    current = Assignment(node="a", instances=[before, inst("m-1", 40001, ["--old"])])
    desired = Assignment(node="a", instances=[inst("m-0", 40000, ["--new"]),
                                              inst("m-1", 40001, ["--new"])])
    surged = {i.id: i for i in _surge(current, desired, {"m-0"}).instances}
    assert surged["m-0"] == before
    assert surged["m-1"].args == ["--new"]


def test_an_old_instance_on_a_port_a_new_one_needs_is_not_kept() -> None:
    current = Assignment(node="a", instances=[inst("old-0", 40000)])
    desired = Assignment(node="a", instances=[inst("new-0", 40000)])
    assert [i.id for i in _surge(current, desired, set()).instances] == ["new-0"]


def test_without_a_current_assignment_the_desired_one_is_written() -> None:
    desired = Assignment(node="a", instances=[inst("m-0", 40000)])
    assert _surge(None, desired, set()) == desired


def _statuses(*bodies: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from bodies
    while True:
        yield bodies[-1]


def test_apply_waits_until_a_removed_instance_is_no_longer_reported() -> None:
    node = _Node("gpu-02", None, "/p", NodeFacts())
    reads = _statuses({"instances": [{"id": "m-0", "state": "ready"},
                                     {"id": "m-1", "state": "ready"}]},
                      {"error": "ssh hiccup"},
                      {"instances": [{"id": "m-0", "state": "ready"},
                                     {"id": "m-1", "state": "stopping"}]},
                      {"instances": [{"id": "m-0", "state": "ready"}]})
    seen: list[int] = []

    def status(_: _Node) -> dict[str, Any]:
        seen.append(1)
        return next(reads)

    reports = {"gpu-02": HostReport("gpu-02")}
    lines: list[str] = []
    _wait_gone([node], {"gpu-02": {"m-1"}}, reports,
               ApplyOptions(poll_interval=0.01), lines.append, status)
    assert len(seen) == 4  # the stopping one and an unreadable status are waited through
    assert lines == ["gpu-02: m-1 is stopped"]
    assert reports["gpu-02"].error is None


def test_an_instance_that_does_not_stop_in_time_fails_its_host_by_name() -> None:
    node = _Node("gpu-02", None, "/p", NodeFacts())
    reports = {"gpu-02": HostReport("gpu-02")}
    _wait_gone([node], {"gpu-02": {"m-1"}}, reports,
               ApplyOptions(poll_interval=0.01, stop_timeout=0.1), lambda _: None,
               lambda _: {"instances": [{"id": "m-1", "state": "stopping"}]})
    assert reports["gpu-02"].error == (
        "`gpu-02`: m-1 still running 0.1 s after it was removed from the assignment")
    assert "stack status" in reports["gpu-02"].hint


def test_a_replica_kept_for_unknown_metadata_runs_exactly_as_the_host_has_it() -> None:
    """Its instance comes from the host's current assignment (never rebuilt from the
    placement, which lacks what the metadata would say); on a host whose assignment cannot
    be read it is left out rather than written half-known."""
    from stack.apply.desired import Desired, keep_unknown
    from stack.placement import ClaimedResources, Placement, Placements
    from stack.plan import Plan

    running = inst("qwen-0", 40000, ["--max-model-len", "8192"])
    kept = Placement("qwen", 0, "gpu-01", (0,), "vllm", "0.11.0", 40000,
                     ClaimedResources(0, 0))
    plan = Plan("", "", (), Placements((), (), (), (kept,)))
    rebuilt = inst("qwen-0", 40000)  # what the placement alone gives: no args
    other = inst("gemma-0", 40001)
    desired = Desired({"gpu-01": Assignment(node="gpu-01", instances=[other, rebuilt]),
                       "gpu-02": Assignment(node="gpu-02", instances=[rebuilt])}, None, [])
    nodes = [_Node("gpu-01", None, "/p", NodeFacts(),
                   current=Assignment(node="gpu-01", instances=[running])),
             _Node("gpu-02", None, "/p", NodeFacts(), current=None)]
    keep_unknown(desired, plan, nodes)
    assert desired.assignments["gpu-01"].instances == [other, running]
    assert desired.assignments["gpu-02"].instances == []
