"""Rolling assignments: new instances go beside the old ones, held replacements keep
their old version, and an old instance whose port a new one takes must go first."""

from __future__ import annotations

from agent.assignment import Assignment, Instance
from stack.apply import _surge


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
