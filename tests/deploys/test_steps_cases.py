"""Deploy steps as data: each `steps/*.json` is one host before `stack apply`, what apply
would put there, and the steps `host_steps` must return; then the host as those steps
leave it must need nothing more (a second apply is all no-ops).

A case holds:
- `node`, `prefix`, `facts` (NodeFacts fields) and `host`, the `files` answer: `manager`,
  `files` {path: sha256 | "absent" | "current"}, `sidecars` {path: value | "current"},
  `alive` {pid file: bool}; "current" is what this apply writes there (read from the
  steps of the same target on an empty host).
- `apply`: `bundle_version`, `agent_toml`, `agent_token`, `router` (bool), `record` (the
  stack's record on the host: `name`, `prefix`, `agent_port`), `drivers`
  (DriverRequest fields but `node`), `runtimes` (RuntimeInstall fields but `prefix`, with
  `spec` a RuntimeSpec and `local` the controller file to upload), `models`
  ({dest, sha256}), `fleet_keys` (runtime/model step keys of other hosts: no-ops here).
- `expect`: every step key, in order -> "noop" or {uploads: [dest], commands, reboot,
  blocked: part of the reason or hint}; a command is a string or its list of lines, where
  a last line "..." stands for the rest.
- `facts_after` (optional): facts the steps change but cannot show (a driver loaded),
  merged over `facts`.
- `stays` (optional): step key -> why it is still not done after the run.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import shlex
from pathlib import Path
from typing import Any

import pytest

from deploys.drivers import DriverRequest
from deploys.probe import HostState
from deploys.runtimes import MARKER, RuntimeInstall
from deploys.steps import HostTarget, ModelUpload, Step, host_steps, sha256_text
from stack.hostfiles import agent_service, router_service
from stack.snapshot import NodeFacts, StackOnHost
from stack.spec import RuntimeSpec, StackSpec

CASES = sorted((Path(__file__).parent / "steps").glob("*.json"))
SPEC = StackSpec.model_validate({"stack": {"name": "prod"}})  # names the services


def _runtime(prefix: str, item: dict[str, Any]) -> tuple[RuntimeInstall, Path | None]:
    fields = {k: v for k, v in item.items() if k not in ("spec", "local")}
    install = RuntimeInstall(spec=RuntimeSpec.model_validate(item["spec"]), prefix=prefix,
                             **fields)
    return install, Path(item["local"]) if "local" in item else None


def _target(case: dict[str, Any], files: dict[str, Any]) -> HostTarget:
    node, prefix, want = case.get("node", "gpu-01"), case.get("prefix", "/opt/stack"), case["apply"]
    installs = [_runtime(prefix, r) for r in want.get("runtimes", [])]
    manager = files["manager"]
    return HostTarget(
        node=node, prefix=prefix, facts=NodeFacts.model_validate(case["facts"]),
        probed=HostState(**files),
        drivers=[DriverRequest(node, **d) for d in want.get("drivers", [])],
        runtimes=[i for i, _ in installs],
        runtime_uploads={i.path: local for i, local in installs if local is not None},
        bundle=Path("/controller/agent-bundle.tar"), bundle_version=want["bundle_version"],
        wheel_name="modelstack-0.1.0-py3-none-any.whl", agent_toml=want["agent_toml"],
        agent_token=want["agent_token"],
        agent_service=agent_service(SPEC, prefix, manager),
        router_service=router_service(SPEC, prefix, manager) if want.get("router") else None,
        models=[ModelUpload(Path("/controller" + m["dest"]), m["dest"], m["sha256"])
                for m in want.get("models", [])],
        stack_record=StackOnHost.model_validate(want["record"]) if "record" in want else None,
    )


def _keys(target: HostTarget, case: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The fleet-wide runtime and model step keys, as apply builds them."""
    keys = {f"runtime {i.name} {i.version}" for i in target.runtimes}
    keys |= {f"model {m.dest}" for m in target.models} | set(case["apply"].get("fleet_keys", []))
    return (sorted(k for k in keys if k.startswith("runtime ")),
            sorted(k for k in keys if k.startswith("model ")))


def _ran(steps: list[Step]) -> list[Step]:
    """The steps a run gets through: a blocked step's failing command stops the host."""
    blocked = [i for i, s in enumerate(steps) if s.blocked is not None]
    return steps[:blocked[0]] if blocked else steps


def _written(steps: list[Step]) -> dict[str, bytes]:
    """What the steps leave on disk (path -> content): their uploads, then the commands
    that place files (`cd`, `mv`, `printf '%s\\n' VALUE > PATH`); the rest is not modelled."""
    disk: dict[str, bytes] = {}
    for step in _ran(steps):
        for upload in step.uploads:
            content = upload.content
            disk[upload.dest] = str(upload.path).encode() if content is None else content
        for command in step.commands:
            cwd = "/"  # each command is its own `sh -c`
            for line in command.splitlines():
                if not line.startswith(("cd ", "mv ", "printf ")):
                    continue
                words = shlex.split(line)
                paths = [posixpath.normpath(posixpath.join(cwd, w)) for w in words]
                if words[0] == "cd":
                    cwd = paths[1]
                elif words[0] == "mv":
                    src, dst = paths[1:3]
                    for path in [p for p in disk if p == src or p.startswith(src + "/")]:
                        disk[dst + path[len(src):]] = disk.pop(path)
                elif words[1:2] == ["%s\\n"] and ">" in words[3:]:
                    at = words.index(">")
                    disk[paths[at + 1]] = "".join(w + "\n" for w in words[2:at]).encode()
    return disk


def _answer(target: HostTarget, files: dict[str, Any], steps: list[Step]) -> dict[str, Any]:
    """The `files` answer of the host after the steps ran."""
    disk = _written(steps)
    alive = dict(files["alive"])
    if any(s.key == "agent-service" and s.changes for s in _ran(steps)):
        alive[target.agent_service.supervisor_pid_file] = True
    return {**files, "alive": alive,
            "files": {**files["files"], **{p: sha256_text(c) for p, c in disk.items()}},
            "sidecars": {**files["sidecars"],
                         **{p: _sidecar(c) for p, c in disk.items()}}}


def _sidecar(content: bytes) -> str:
    """A sidecar's value as the files answer reads it (`sidecar $(cat F) F`)."""
    return content.decode().strip().partition(" ")[0]


def _facts_after(target: HostTarget, case: dict[str, Any], steps: list[Step]) -> NodeFacts:
    """The facts after the run: runtimes whose marker the steps wrote, plus `facts_after`."""
    runtimes = {k: list(v) for k, v in target.facts.runtimes.items()}
    recipes = {k: dict(v) for k, v in (target.facts.runtime_recipes or {}).items()}
    base = f"{target.prefix.rstrip('/')}/runtimes/"
    for path, content in _written(steps).items():
        parts = path.removeprefix(base).split("/")
        if path.startswith(base) and len(parts) == 3 and parts[2] == MARKER:
            runtimes.setdefault(parts[0], []).append(parts[1])
            recipe = content.decode().splitlines()[1:2]  # `recipe DIGEST`, as facts.sh reads
            recipes.setdefault(parts[0], {})[parts[1]] = recipe[0].removeprefix("recipe ")
    return NodeFacts.model_validate({**target.facts.model_dump(), **case.get("facts_after", {}),
                                     "runtimes": runtimes,
                                     "runtime_recipes": recipes
                                     if target.facts.runtime_recipes is not None else None})


def _files(case: dict[str, Any]) -> dict[str, Any]:
    """The case's `files` answer, "current" replaced by what a first apply writes there."""
    host = case["host"]
    empty = {"manager": host["manager"], "files": {}, "sidecars": {}, "alive": {}, "free": None}
    # without drivers: a blocked one would stop the run before anything is written
    fresh = dataclasses.replace(_target(case, empty), drivers=[])
    disk = _written(host_steps(fresh, *_keys(fresh, case)))

    def value(path: str, given: str, sidecar: bool) -> str | None:
        if given == "absent":
            return None
        if given != "current":
            return given
        return _sidecar(disk[path]) if sidecar else sha256_text(disk[path])

    return {**empty, "alive": host.get("alive", {}),
            "files": {p: value(p, v, False) for p, v in host.get("files", {}).items()},
            "sidecars": {p: value(p, v, True) for p, v in host.get("sidecars", {}).items()}}


def _wanted(expect: Any) -> dict[str, Any]:
    """A step's expectation in full ("noop" is {}; each command as its lines)."""
    want = {} if expect == "noop" else expect
    return {"uploads": want.get("uploads", []), "reboot": want.get("reboot", False),
            "commands": [c.split("\n") if isinstance(c, str) else c
                         for c in want.get("commands", [])],
            "blocked": want.get("blocked")}


def _shown(step: Step, want: dict[str, Any]) -> dict[str, Any]:
    """The step in the terms of `_wanted`, shortened where the expectation is ("...", a
    part of the blocking reason) so that a mismatch shows as a plain diff."""
    commands = [c.split("\n") for c in step.commands]
    for lines, like in zip(commands, want["commands"], strict=False):
        if like[-1:] == ["..."]:
            lines[len(like) - 1:] = ["..."]
    blocked = step.blocked and f"{step.blocked.reason} hint: {step.blocked.hint}"
    if blocked and want["blocked"] and want["blocked"] in blocked:
        blocked = want["blocked"]
    return {"uploads": [u.dest for u in step.uploads], "reboot": step.reboot,
            "commands": commands, "blocked": blocked}


def _done(step: Step) -> bool:
    return not step.changes and not step.reboot and step.blocked is None


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_host_steps_match_the_case_and_a_second_run_changes_nothing(path: Path) -> None:
    case = json.loads(path.read_text())
    files = _files(case)
    target = _target(case, files)
    steps = host_steps(target, *_keys(target, case))
    expect = case["expect"]
    assert [s.key for s in steps] == list(expect)
    wanted = {k: _wanted(v) for k, v in expect.items()}
    assert {s.key: _shown(s, wanted[s.key]) for s in steps} == wanted

    after = dataclasses.replace(target, probed=HostState(**_answer(target, files, steps)),
                                facts=_facts_after(target, case, steps))
    again = {s.key: s for s in host_steps(after, *_keys(after, case))}
    stays = case.get("stays", {})
    assert [k for k, s in again.items() if not _done(s) and k not in stays] == []
    assert [k for k in stays if _done(again[k])] == [], "a step marked `stays` is done"


def test_each_step_key_is_exercised_by_some_case() -> None:
    changed = {k.split(" ")[0] for p in CASES
               for k, v in json.loads(p.read_text())["expect"].items() if v != "noop"}
    assert changed >= {"driver", "runtime", "agent-install", "agent-config", "agent-token",
                       "agent-unit", "router-unit", "agent-service", "model"}
