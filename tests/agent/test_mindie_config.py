"""MindIE's generated service config, field by field, against the field reference
`mindie/required_fields.json` (MindIE's documentation and the fields real deployments set),
and against the instance it was built for. Every MindIE case in `commands/` is built by the
real command builder; the checks themselves are shown to fail on broken configs."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.assignment import Instance
from agent.commands import Context, Launch, build_launch
from agent.mindie_config import DEFAULT_MAX_SEQ_LEN

HERE = Path(__file__).parent
REFERENCE = json.loads((HERE / "mindie" / "required_fields.json").read_text())
FIELDS: list[dict[str, Any]] = REFERENCE["fields"]
CASES = [path for path in sorted((HERE / "commands").glob("mindie_*.json"))
         if "error" not in json.loads(path.read_text())]
MISSING = object()


def _get(config: Any, path: str) -> Any:
    node = config
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return MISSING
    return node


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Every written field's path (a list of objects is entered by index)."""
    if isinstance(node, dict):
        return [leaf for key, value in node.items()
                for leaf in _leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")]
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        return [leaf for i, item in enumerate(node) for leaf in _leaves(item, f"{prefix}.{i}")]
    return [prefix]


def _bound(config: Any, bound: Any, pick: Any) -> int | None:
    """A bound: a number, another field's path, or a list of them (the tightest counts)."""
    values = []
    for item in bound if isinstance(bound, list) else [bound]:
        value = _get(config, item) if isinstance(item, str) else item
        if isinstance(value, int) and not isinstance(value, bool):
            values.append(value)
    return pick(values) if values else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_int,
    "boolean": lambda v: isinstance(v, bool),
    "ip": lambda v: isinstance(v, str) and _is_ip(v),
    "integer lists": lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(ids, list) and ids and all(_is_int(i) and i >= 0 for i in ids) for ids in v),
    "list": lambda v: isinstance(v, list),
}


def _field_problem(config: Any, field: dict[str, Any]) -> str | None:
    path, value = field["path"], _get(config, field["path"])
    if value is MISSING:
        return f"{path} is missing"
    if not TYPES[field["type"]](value):
        return f"{path} is {value!r}, not of type {field['type']}"
    if "enum" in field and value not in field["enum"]:
        return f"{path} is {value!r}, not one of {field['enum']}"
    if value in field.get("exclude", []):
        return f"{path} must not be {value!r}"
    low, high = _bound(config, field.get("min"), max), _bound(config, field.get("max"), min)
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{path} is {value}, outside [{low}, {high}]"
    if "pattern" in field and not re.search(field["pattern"], value):
        return f"{path} is {value!r}, which does not match {field['pattern']}"
    if len(value) > field["max_length"] if "max_length" in field else False:
        return f"{path} is longer than {field['max_length']}"
    if "max_items" in field and not field["min_items"] <= len(value) <= field["max_items"]:
        return f"{path} has {len(value)} items, not {field['min_items']}-{field['max_items']}"
    return None


def field_problems(config: dict[str, Any], over_nodes: bool) -> list[str]:
    """What in `config` disagrees with the field reference: a field missing, of the wrong
    type or out of its range, or a field the reference does not know."""
    problems = [problem for field in FIELDS
                if field.get("when", "always") == "always" or over_nodes
                for problem in [_field_problem(config, field)] if problem]
    known = {field["path"] for field in FIELDS}
    problems += [f"{leaf} is not a documented field" for leaf in _leaves(config)
                 if leaf not in known]
    return problems


def instance_problems(config: dict[str, Any], launch: Launch, inst: Instance,
                      model_path: str) -> list[str]:
    """What in `config` (and over nodes, the rank table) disagrees with the instance it
    was built for."""
    npus = max(len(inst.devices.indices), 1)
    over_nodes = inst.role != "single"
    expect: dict[str, Any] = {
        "ServerConfig.ipAddress": inst.host,
        "ServerConfig.managementIpAddress": inst.host,
        "ServerConfig.port": inst.port,
        "ServerConfig.managementPort": inst.port + 1,
        "ServerConfig.metricsPort": inst.port + 2,
        "ServerConfig.allowAllZeroIpListening": ipaddress.ip_address(inst.host).is_unspecified,
        "ServerConfig.httpsEnabled": False,  # no certificates are shipped
        "BackendConfig.modelInstanceNumber": 1,
        # NPUs are numbered from 0 among ASCEND_RT_VISIBLE_DEVICES
        "BackendConfig.npuDeviceIds": [list(range(npus))],
        "BackendConfig.multiNodesInferEnabled": over_nodes,
        "BackendConfig.ModelDeployConfig.maxSeqLen": inst.context or DEFAULT_MAX_SEQ_LEN,
        "BackendConfig.ModelDeployConfig.ModelConfig.0.modelName": inst.model,
        "BackendConfig.ModelDeployConfig.ModelConfig.0.modelWeightPath": model_path,
        "BackendConfig.ModelDeployConfig.ModelConfig.0.worldSize": npus,
    }
    if over_nodes:
        expect.update({"BackendConfig.multiNodesInferPort": inst.port + 3,
                       "BackendConfig.interNodeTLSEnabled": False,
                       "ServerConfig.interCommTLSEnabled": False})
    problems = [f"{path} is {_get(config, path)!r}, the instance needs {want!r}"
                for path, want in expect.items() if _get(config, path) != want]
    visible = ",".join(str(i) for i in inst.devices.indices)
    if inst.devices.indices and launch.env.get("ASCEND_RT_VISIBLE_DEVICES") != visible:
        problems.append(f"ASCEND_RT_VISIBLE_DEVICES is not {visible}")
    if over_nodes:
        # this node's server in the rank table names the same NPUs, by physical id
        table = json.loads(launch.files[launch.env["RANKTABLEFILE"]])
        mine = [s for s in table["server_list"]
                if s["container_ip"] == launch.env["MIES_CONTAINER_IP"] == inst.host]
        ids = [int(d["device_id"]) for s in mine for d in s["device"]]
        if ids != inst.devices.indices:
            problems.append(f"the rank table gives this node NPUs {ids}, not "
                            f"{inst.devices.indices}")
    return problems


def _build(case_file: Path) -> tuple[dict[str, Any], Launch, Instance, str]:
    case = json.loads(case_file.read_text())
    inst = Instance.model_validate(case["instance"])
    launch = build_launch(inst, Context(case["model_path"], "/opt/stack/state/instances"))
    config = json.loads(launch.files[launch.env["MIES_CONFIG_JSON_PATH"]])
    return config, launch, inst, case["model_path"]


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_mindie_config_has_every_documented_field_in_range_and_matches_its_instance(
        case_file: Path) -> None:
    config, launch, inst, model_path = _build(case_file)
    assert field_problems(config, inst.role != "single") == []
    assert instance_problems(config, launch, inst, model_path) == []


def test_the_cases_cover_one_node_and_several_nodes() -> None:
    roles = {json.loads(c.read_text())["instance"].get("role", "single") for c in CASES}
    assert roles == {"single", "main", "worker"}


def _over_nodes_config() -> dict[str, Any]:
    config, _, inst, _ = _build(HERE / "commands" / "mindie_over_nodes_main.json")
    assert inst.role == "main" and field_problems(config, True) == []
    return config


def _set(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is MISSING:
        del node[last]
    else:
        node[last] = value


WRONG_TYPE = {"string": 7, "integer": "8", "boolean": 0, "ip": "npu-01.example",
              "integer lists": [0, 1], "list": {}}


def _breakages(field: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, Any]]:
    found = [("removed", MISSING), ("mistyped", WRONG_TYPE[field["type"]])]
    if field["type"] == "integer":
        found.append(("a bool", True))
    low, high = _bound(config, field.get("min"), max), _bound(config, field.get("max"), min)
    if low is not None:
        found.append(("below its minimum", low - 1))
    if high is not None:
        found.append(("above its maximum", high + 1))
    if "enum" in field:
        found.append(("not one of its values", "other" if field["type"] == "string" else 99))
    if "pattern" in field:
        found.append(("not of its pattern", "_bad name_"))
    return found


@pytest.mark.parametrize("field", FIELDS, ids=[f"{f['path']}:{f.get('when', 'always')}"
                                               for f in FIELDS])
def test_the_field_check_fails_when_a_field_is_removed_mistyped_or_out_of_range(
        field: dict[str, Any]) -> None:
    good = _over_nodes_config()
    for what, value in _breakages(field, good):
        broken = copy.deepcopy(good)
        _set(broken, field["path"], value)
        problems = field_problems(broken, True)
        assert any(p.startswith(field["path"]) for p in problems), (what, problems)


def test_the_field_check_fails_on_a_field_the_documentation_does_not_know() -> None:
    config = _over_nodes_config()
    config["BackendConfig"]["ModelDeployConfig"]["maxSeqLength"] = 4096  # misspelt
    assert field_problems(config, True) == [
        "BackendConfig.ModelDeployConfig.maxSeqLength is not a documented field"]


@pytest.mark.parametrize("path, value", [
    ("BackendConfig.ModelDeployConfig.ModelConfig.0.worldSize", 4),
    ("BackendConfig.npuDeviceIds", [[0, 1, 2, 3]]),
    ("BackendConfig.ModelDeployConfig.maxSeqLen", 8192),
    ("BackendConfig.ModelDeployConfig.ModelConfig.0.modelName", "llama"),
    ("BackendConfig.ModelDeployConfig.ModelConfig.0.modelWeightPath", "/m/other"),
    ("ServerConfig.metricsPort", 40001),
    ("BackendConfig.multiNodesInferPort", 1120),
    ("BackendConfig.multiNodesInferEnabled", False),
])
def test_the_instance_check_fails_when_a_value_disagrees_with_the_instance(
        path: str, value: Any) -> None:
    config, launch, inst, model_path = _build(HERE / "commands" / "mindie_over_nodes_main.json")
    _set(config, path, value)
    problems = instance_problems(config, launch, inst, model_path)
    assert [p for p in problems if p.startswith(path)], problems


def test_the_instance_check_fails_when_the_rank_table_names_other_npus() -> None:
    config, launch, inst, model_path = _build(HERE / "commands" / "mindie_over_nodes_main.json")
    table_path = launch.env["RANKTABLEFILE"]
    table = json.loads(launch.files[table_path])
    table["server_list"][0]["device"][1]["device_id"] = "7"
    launch.files[table_path] = json.dumps(table)
    assert instance_problems(config, launch, inst, model_path) == [
        "the rank table gives this node NPUs [0, 7], not [0, 1]"]
