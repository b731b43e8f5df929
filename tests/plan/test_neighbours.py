"""Which other stacks on a host collide with this one (stack.neighbours); the plan cases
in tests/plan/cases/ show how a refused host reads in the plan."""

from __future__ import annotations

from stack.config import load_text
from stack.neighbours import node_conflicts, overlaps
from stack.snapshot import NodeFacts, StackOnHost

SPEC = load_text('[stack]\nname = "staging"\nprefix = "/opt/stack"\n')


def _facts(*stacks: tuple[str, str, int]) -> NodeFacts:
    return NodeFacts(stacks=[StackOnHost(name=n, prefix=p, agent_port=a) for n, p, a in stacks])


def test_a_prefix_overlaps_only_itself_and_the_folders_around_or_inside_it() -> None:
    assert overlaps("/opt/stack", "/opt/stack") and overlaps("/opt", "/opt/stack/x")
    assert overlaps("/opt/stack/x", "/opt")
    assert not overlaps("/opt/stack", "/opt/stack2") and not overlaps("/opt/a", "/opt/b")


def test_destroy_is_refused_for_a_shared_prefix_but_not_for_a_shared_port() -> None:
    """`stack destroy` asks with `ports=False`: another agent on the same port is no harm
    to stopping this stack, another stack's services in its prefix are."""
    port_only = _facts(("prod", "/opt/prod", 7070))
    assert [c.error for c in node_conflicts(SPEC, "n1", port_only)] == [
        "stack `prod` already uses agent port 7070 (prefix /opt/prod)"]
    assert node_conflicts(SPEC, "n1", port_only, ports=False) == []
    around = _facts(("lab", "/opt", 7071))
    assert [c.error for c in node_conflicts(SPEC, "n1", around, ports=False)] == [
        "stack `lab` is installed in /opt, which holds this stack's prefix /opt/stack"]


def test_a_snapshot_without_records_refuses_nothing() -> None:
    assert node_conflicts(SPEC, "n1", NodeFacts()) == []
    assert NodeFacts.model_validate({"address": "10.0.0.1"}).stacks is None
