"""MindIE over several nodes, from placements to what each node's agent writes: every part
gets the same rank table (the nodes' addresses, their NPUs' physical ids and device IPs),
and the agent turns it into the same rank table file on every node."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from agent.commands import Context, build_launch
from agent.errors import CommandError
from stack.assign import build_assignments
from stack.schedule import schedule
from tests.schedule.cases_lib import load_evaluations, load_facts, load_stack, read_case

CASE = Path(__file__).resolve().parents[1] / "schedule" / "cases" / \
    "mindie_70b_spans_two_nodes_with_a_rank_table.json"


def _parts(facts_data: dict[str, Any]) -> dict[str, Any]:
    case = read_case(CASE)
    spec, _ = load_stack(case["stack"])
    facts = load_facts(facts_data)
    placements = schedule(spec, load_evaluations(case["evaluations"], spec), facts)
    assignments = build_assignments(spec, placements, facts, Path("/ctl"), None)
    return {node: a.instances[0] for node, a in assignments.items() if a.instances}


def test_both_nodes_get_the_same_rank_table_and_write_the_same_file() -> None:
    parts = _parts(read_case(CASE)["facts"])
    main, worker = parts["npu-01"], parts["npu-02"]
    assert (main.role, worker.role) == ("main", "worker")
    assert main.rank_table is not None and main.rank_table == worker.rank_table
    assert [(s.host, [d.device_id for d in s.devices]) for s in main.rank_table] == [
        ("10.0.0.1", list(range(8))), ("10.0.0.2", list(range(8)))]
    assert main.rank_table[1].devices[5].device_ip == "192.168.101.21"
    files = []
    for inst in (main, worker):
        launch = build_launch(inst, Context("/m/llama70b", "/opt/stack/state/instances"))
        table = launch.files[launch.env["RANKTABLEFILE"]]
        files.append(table)
        assert launch.env["MIES_CONTAINER_IP"] == inst.host
        config = json.loads(launch.files[launch.env["MIES_CONFIG_JSON_PATH"]])
        assert config["BackendConfig"]["multiNodesInferPort"] == inst.port + 3
    assert files[0] == files[1]
    ranks = [d["rank_id"] for s in json.loads(files[0])["server_list"] for d in s["device"]]
    assert ranks == [str(r) for r in range(16)]


def test_a_node_named_by_a_host_name_gets_no_rank_table_and_its_agent_refuses_it() -> None:
    data = copy.deepcopy(read_case(CASE)["facts"])
    data["nodes"]["npu-02"]["address"] = "npu-02.lab.example"
    parts = _parts(data)
    assert parts["npu-01"].rank_table is None and parts["npu-02"].rank_table is None
    with pytest.raises(CommandError, match="has no `rank_table`"):
        build_launch(parts["npu-01"], Context("/m/llama70b", "/opt/stack/state/instances"))
