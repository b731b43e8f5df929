"""How the plan is derived: the desired state against the observed one, change by change.

Desired is the placements, turned into assignments, host files and a router config;
observed is the facts. Changes are: hosts (drivers, reboots, the agent, runtimes, the
files apply keeps there), model replicas (create, replace with its reason, delete) and the
router. `derive_plan` is the only entry; `stack.pipeline` calls it for every command.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.assignment import Assignment, Instance
from deploys.drivers import Blocked, DriverRequest, driver_commands, needs_reboot
from deploys.prerequisites import plan_prerequisites
from deploys.runtimes import host_requires, installed, unused_versions
from stack.assign import build_router_config, router_config_sha256
from stack.bundle_target import AGENT_HINT, agent_problem, host_agent_version
from stack.catalog import (
    Recipe,
    folder,
    listed_folders,
    parse_folder,
    prebuilt_on_controller,
    recipe,
    recipe_of_folder,
)
from stack.env import shown as shown_env
from stack.hostfiles import HostFile, desired_files, router_fingerprint
from stack.neighbours import own_record, set_aside
from stack.nodes import node_settings
from stack.placement import (
    Placement,
    Placements,
    RunningPart,
    gib,
    instance_id,
    running_replicas,
)
from stack.plan import (
    Action,
    Change,
    HostProblem,
    Plan,
    Summary,
    facts_sha256,
    replica_address,
    sha256_bytes,
)
from stack.snapshot import ManagedFile, NodeFacts, Observed, StackOnHost
from stack.spec import StackSpec


def _placement_details(spec: StackSpec, p: Placement) -> tuple[tuple[str, str], ...]:
    gpus = ", ".join(map(str, p.gpus)) if p.gpus else "none (CPU)"
    backend = f"{p.backend} {p.backend_version or ''}".strip()
    found = recipe(spec, p.runtime, p.backend_version, p.vendor) \
        if p.runtime and p.backend_version else None
    if isinstance(found, Recipe) and found.variant:
        backend += f" ({found.variant} build from the runtime catalogue)"
    out = [("node", p.node), ("gpus", f"{p.vendor} {gpus}" if p.gpus else gpus),
           ("backend", backend),
           ("port", str(p.port))]
    claim = f"{gib(p.claim.ram_bytes)} RAM"
    if p.gpus:
        claim = f"{gib(p.claim.vram_bytes_per_gpu)} per GPU, " + claim
    out.append(("claim", claim))
    if p.context:
        context = f"{p.context} tokens"
        if p.shortened_from:
            context += (f" (the training context {p.shortened_from} does not fit; "
                        "set `context` to choose)")
        out.append(("context", context))
    if p.split:
        layers = " / ".join(map(str, p.split)) + " (per device, by free memory)"
        if p.cpu_layers:
            layers += f", {p.cpu_layers} on {p.node}'s CPU"
        out.append(("layers", layers))
    for k, w in enumerate(p.workers, start=1):
        wg = ", ".join(map(str, w.gpus)) if w.gpus else "CPU"
        out.append((f"worker {k}", f"{w.node} gpus {wg} port {w.port}"))
    return tuple(out)


# --------------------------------------------------------------------------- host changes


def _host_changes(spec: StackSpec, observed: Observed, placements: Placements,
                  agent_version: str) -> list[Change]:
    needed: dict[str, dict[tuple[str, str], list[str]]] = {}
    for p in (*placements.placements, *placements.kept):
        if not p.runtime or not p.backend_version:
            continue
        for node, vendor in ((p.node, p.vendor), *((w.node, w.vendor) for w in p.workers)):
            key = (p.runtime, folder(spec, p.runtime, p.backend_version, vendor))
            needed.setdefault(node, {}).setdefault(key, []).append(
                replica_address(p.model, p.replica))
    out: list[Change] = []
    for name in sorted(observed.nodes):
        facts = observed.nodes[name]
        if not facts.reachable:
            continue
        out.extend(_driver_changes(spec, name, facts))
        if facts.reboot_required:
            out.append(Change(f"node.{name}.reboot", Action.UPDATE,
                              "the node reports that a reboot is required", "reboot", name))
        agent, want = facts.agent, host_agent_version(agent_version, facts)
        problem = agent_problem(facts)
        if problem is not None:
            # the same refusal apply makes (stack.wheelhouse.agent_bundle)
            out.append(Change(f"node.{name}.agent", Action.UPDATE,
                              f"blocked: no agent can be installed: {problem}", "none", name,
                              hint=AGENT_HINT))
        elif agent.version is None:
            out.append(Change(f"node.{name}.agent", Action.CREATE,
                              f"install the agent {want}", "none", name))
        elif agent.version != want:
            out.append(Change(f"node.{name}.agent", Action.UPDATE,
                              f"agent {agent.version} -> {want}", "none", name))
        elif not agent.running:
            out.append(Change(f"node.{name}.agent", Action.UPDATE,
                              "the agent is not running", "none", name))
        out.extend(_runtime_changes(spec, name, facts, needed.get(name, {})))
    return out


def _driver_changes(spec: StackSpec, name: str, facts: NodeFacts) -> list[Change]:
    """The driver work apply would do on this node: the same decision apply runs
    (`deploys.drivers.driver_commands`), so plan and apply never disagree."""
    out: list[Change] = []
    user = facts.user or None
    for vendor, driver in sorted(node_settings(spec, name).drivers.items()):
        request = DriverRequest(name, vendor, driver.mode, driver.version, user)
        result = driver_commands(facts, request)
        address = f"node.{name}.driver.{vendor}"
        if isinstance(result, Blocked):
            out.append(Change(address, Action.UPDATE, f"blocked: {result.reason}", "none", name,
                              hint=result.hint))
        elif result:
            have = sorted({g.driver for g in facts.gpus if g.vendor == vendor and g.driver})
            disruption = "reboot" if needs_reboot(facts, result) else "none"
            if have:
                out.append(Change(address, Action.UPDATE,
                                  f"{vendor} driver {', '.join(have)} -> "
                                  f"{driver.version or 'the pinned branch'}", disruption, name))
            else:
                what = f"install the {vendor} driver {driver.version or ''}".rstrip()
                out.append(Change(address, Action.CREATE, what, disruption, name))
    return out


def _runtime_prerequisites(spec: StackSpec, name: str, facts: NodeFacts, runtime: str,
                           folder: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """The distro packages apply installs on a node before a runtime, and what it cannot
    install there (the hint): the same decision apply makes
    (`deploys.prerequisites.plan_prerequisites`; a build uploaded from the controller
    needs none of the build tools)."""
    found = recipe_of_folder(spec, runtime, folder)
    if found is None:
        return (), ""
    prebuilt = prebuilt_on_controller(found, f"{facts.os}-{facts.arch}")
    pre = plan_prerequisites(host_requires(found.spec, prebuilt), facts)
    details: list[tuple[str, str]] = []
    if pre.packages:
        details.append(("installs first", f"{' '.join(pre.packages)} ({pre.manager})"))
    if pre.missing:
        details.append(("missing", ", ".join(pre.what)))
    return tuple(details), pre.hint(name, runtime) if pre.missing else ""


def _runtime_changes(spec: StackSpec, name: str, facts: NodeFacts,
                     needed: dict[tuple[str, str], list[str]]) -> list[Change]:
    out: list[Change] = []
    for (runtime, version), users in sorted(needed.items()):
        found = recipe_of_folder(spec, runtime, version)
        have = version in facts.runtimes.get(runtime, [])
        if have and (found is None or installed(facts.runtime_recipes, facts.runtimes,
                                                runtime, version, found.digest)):
            continue
        more = f" and {len(users) - 1} more" if len(users) > 1 else ""
        details, hint = _runtime_prerequisites(spec, name, facts, runtime, version)
        address = f"node.{name}.runtime.{runtime}@{version}"
        if not have:
            out.append(Change(address, Action.CREATE, f"needed by {users[0]}{more}", "none",
                              name, details, hint))
            continue
        assert found is not None and facts.runtime_recipes is not None
        was = facts.runtime_recipes.get(runtime, {}).get(version)
        why = (f"its recipe changed ({was} -> {found.digest}): installed again"
               if was else f"installed by an older stack that did not record its recipe: "
               f"installed again as {found.digest}")
        out.append(Change(address, Action.REPLACE, why, "restart", name,
                          (*details, ("used by", f"{users[0]}{more}")), hint))
    # what apply removes last: the same decision (`deploys.runtimes.unused_versions`)
    for runtime, versions in unused_versions(facts.runtimes, listed_folders(spec),
                                              needed).items():
        for version in versions:
            why = (f"`runtimes.{runtime}.versions` no longer lists {version}"
                   if runtime in spec.runtimes
                   else f"no replica here uses the catalogue's {runtime} {version}"
                   if parse_folder(spec, runtime, version) is not None
                   else f"`runtimes.{runtime}` is no longer in stack.toml")
            out.append(Change(f"node.{name}.runtime.{runtime}@{version}", Action.DELETE, why,
                              "none", name))
    return out


# --------------------------------------------------------------------------- instances


def _replace_reasons(p: Placement, want: dict[str, tuple[str, Instance]],
                     have: dict[str, RunningPart], observed: Observed) -> list[str]:
    reasons: list[str] = []
    main = have.get(p.id)
    if main is None:
        return ["its main instance is missing"]
    if main.node != p.node:
        down = observed.nodes.get(main.node)
        why = " (unreachable)" if down is not None and not down.reachable else ""
        reasons.append(f"moved from {main.node}{why} to {p.node}")
    moved = set(want) != set(have) or any(have[i].node != want[i][0] for i in want if i in have)
    if moved and not reasons:
        reasons.append(f"spans {len(want)} node(s), ran on {len(have)}"
                       if len(want) != len(have) else "a worker moved")
    if main.facts.backend != p.backend:
        reasons.append(f"backend {main.facts.backend} -> {p.backend}")
    elif main.facts.backend_version != p.backend_version:
        reasons.append(f"new version {main.facts.backend_version} -> {p.backend_version}")
    if main.node == p.node and tuple(main.facts.gpus) != p.gpus:
        old = ", ".join(map(str, main.facts.gpus)) or "CPU"
        reasons.append(f"GPUs {old} -> {', '.join(map(str, p.gpus)) or 'CPU'}")
    if main.node == p.node and main.facts.port != p.port:
        reasons.append(f"port {main.facts.port} -> {p.port}")
    if not reasons:
        for iid, (_, inst) in sorted(want.items()):
            facts = have[iid].facts
            if facts.spec_hash is not None and facts.spec_hash != inst.spec_hash():
                files = facts.source_sha256 is not None \
                    and facts.source_sha256 != inst.source_sha256
                reasons.append("model files changed" if files
                               else "its runtime is installed again (recipe changed)"
                               if _runtime_reinstalled(observed, have[iid].node, inst)
                               else "args or env changed")
                break
    return reasons


def _runtime_reinstalled(observed: Observed, node: str, inst: Instance) -> bool:
    """True when `inst`'s runtime folder on `node` was made by another recipe than the one
    it is to run from (the plan's runtime change installs it again)."""
    facts = observed.nodes.get(node)
    if facts is None or facts.runtime_recipes is None or inst.runtime_recipe is None:
        return False
    name, folder = inst.runtime_path.rstrip("/").split("/")[-2:]
    return facts.runtime_recipes.get(name, {}).get(folder) != inst.runtime_recipe


def _instance_changes(spec: StackSpec, observed: Observed, placements: Placements,
                      assignments: Mapping[str, Assignment]) -> list[Change]:
    desired: dict[str, tuple[str, Instance]] = {
        inst.id: (node, inst) for node, a in assignments.items() for inst in a.instances}
    current, loose = running_replicas(observed)
    out: list[Change] = []
    placed = {(p.model, p.replica) for p in (*placements.placements, *placements.kept)}
    # an unreachable host reports nothing: a replica that ran there looks new
    down = sorted(name for name, facts in observed.nodes.items() if not facts.reachable)
    new = (f"not running on a reachable node; {', '.join(down)} "
           f"{'is' if len(down) == 1 else 'are'} unreachable" if down else "new replica")
    for p in placements.placements:
        ids = [p.id, *(p.worker_id(k) for k in range(1, len(p.workers) + 1))]
        want = {i: desired[i] for i in ids if i in desired}
        have = current.get((p.model, p.replica), {})
        address = replica_address(p.model, p.replica)
        details = _placement_details(spec, p)
        if p.id in desired and (desired[p.id][1].env or desired[p.id][1].secret_env):
            want_main = desired[p.id][1]  # names only: values from the controller stay out
            details += (("env", shown_env(want_main.env, want_main.secret_env)),)
        if not have:
            out.append(Change(address, Action.CREATE, new, "none", p.node, details))
            continue
        reasons = _replace_reasons(p, want, have, observed)
        if reasons:
            out.append(Change(address, Action.REPLACE, "; ".join(reasons), "restart", p.node,
                              details))
    unschedulable = {(u.model, u.replica) for u in placements.unschedulable}
    for key in sorted(set(current) - placed):
        model, replica = key
        parts = current[key]
        main = parts.get(instance_id(model, replica)) or next(iter(parts.values()))
        if model not in spec.models:
            why = f"model `{model}` is no longer in stack.toml"
        elif replica >= spec.models[model].replicas:
            why = f"`models.{model}.replicas` is {spec.models[model].replicas}"
        elif key in unschedulable:
            why = "it no longer fits anywhere (see unschedulable)"
        else:
            why = "no longer placed"
        out.append(Change(replica_address(model, replica), Action.DELETE, why, "restart",
                          main.node, (("node", main.node), ("port", str(main.facts.port)))))
    for node, inst in loose:
        out.append(Change(f"node.{node}.instance.{inst.id}", Action.DELETE,
                          "not an instance of this stack's replicas", "restart", node))
    return out


# --------------------------------------------------------------------------- router


def _router_change_unknown(observed: Observed, placements: Placements,
                           instances_changed: bool) -> Change | None:
    """The `router` change for facts that do not report what apply wrote (snapshots from
    before `managed`): created on a fleet with no agent yet, else updated whenever a
    replica changes (its routes do)."""
    reachable = [n for n in placements.routers
                 if n in observed.nodes and observed.nodes[n].reachable]
    hosts = ", ".join(placements.routers) or "no host"
    details = (("hosts", hosts),)
    if reachable and all(observed.nodes[n].agent.version is None for n in reachable):
        return Change("router", Action.CREATE, f"install on {hosts}", "none", None, details)
    if instances_changed:
        return Change("router", Action.UPDATE, "replicas changed", "none", None, details)
    return None


# --------------------------------------------------------------------------- the plan


def derive_plan(spec: StackSpec, observed: Observed, placements: Placements,
         assignments: Mapping[str, Assignment], stack_bytes: bytes,
         agent_version: str, conflicts: tuple[HostProblem, ...] = ()) -> Plan:
    """Compare desired (placements, assignments) with observed (facts): the plan.
    `conflicts`: hosts where another stack collides with this one (stack.neighbours),
    left out of every change."""
    facts_sha = facts_sha256(observed)
    observed = set_aside(observed, conflicts)
    hosts = _host_changes(spec, observed, placements, agent_version)
    instances = _instance_changes(spec, observed, placements, assignments)
    config = build_router_config(spec, placements, dict(assignments))
    config_sha = router_config_sha256(config)
    router_fp = router_fingerprint(config)
    routers = frozenset(placements.routers)  # looked up once per node: not the tuple
    files = {name: tuple(desired_files(spec, name, facts,
                                       assignments.get(name, Assignment(node=name)),
                                       router_fp if name in routers else None))
             for name, facts in sorted(observed.nodes.items()) if facts.reachable}
    node_files, router_files = _file_changes(observed, files)
    node_files += _record_changes(spec, observed, node_files)
    known = any(observed.nodes[n].managed is not None for n in files if n in routers)
    legacy = None if known else _router_change_unknown(observed, placements, bool(instances))
    router = router_files if known else [legacy] if legacy else []
    changes = tuple(sorted(hosts + node_files, key=_order) + sorted(instances, key=_order)
                    + sorted(router, key=_order))
    unreachable = tuple(HostProblem(name, facts.error or f"`{name}` did not answer",
                                    facts.hint or "")
                        for name, facts in sorted(observed.nodes.items()) if not facts.reachable)
    warnings = tuple(f"model.{model}: metadata unknown ({why}); running replicas kept"
                     for model, why in placements.unknown)
    return Plan(stack_sha256=sha256_bytes(stack_bytes), facts_sha256=facts_sha,
                changes=changes, placements=placements, router_config_sha256=config_sha,
                summary=Summary.of(changes), unreachable=unreachable, conflicts=conflicts,
                files=files, assignments=dict(assignments), warnings=warnings)


# --------------------------------------------------------------------------- files


def _file_changes(observed: Observed, files: Mapping[str, tuple[HostFile, ...]]
                  ) -> tuple[list[Change], list[Change]]:
    """Desired file fingerprints against what the facts report: node-level changes, and
    the fleet-wide ones (`router...`, `model.M.files`) merged over their nodes. A node
    whose agent is not installed yet gets its files with the agent (`node.N.agent`);
    facts that do not report files (an older snapshot) are unknown, not changed."""
    node_level: list[Change] = []
    merged: dict[tuple[str, Action, str], list[str]] = {}  # (address, action, why) -> nodes
    for name, wanted in files.items():
        facts = observed.nodes[name]
        fresh = facts.managed is None or facts.agent.version is None
        for f in wanted:
            if fresh:
                if f.address == "router":
                    merged.setdefault(("router", Action.CREATE, "install"), []).append(name)
                continue
            assert facts.managed is not None
            drift = _file_drift(f, facts.managed.get(f.path))
            if f.address == "router" and not drift and facts.service_manager == "supervise" \
                    and not facts.services_alive.get("router", False):
                drift = [("router", Action.UPDATE, "not running")]
            for address, action, reason in drift:
                if address.startswith("node."):
                    node_level.append(Change(address, action, reason, "none", name,
                                             (("path", f.path),)))
                else:
                    merged.setdefault((address, action, reason), []).append(name)
    fleet = []
    for (address, action, reason), nodes in sorted(merged.items()):
        where = ", ".join(sorted(nodes))
        label = "hosts" if address.startswith("router") else "nodes"
        fleet.append(Change(address, action, f"{reason} on {where}", "none", None,
                            ((label, where),)))
    return node_level, fleet


def _record_changes(spec: StackSpec, observed: Observed, node_files: list[Change]
                    ) -> list[Change]:
    """`node.N.agent.config` where the host's record of this stack (its prefix and agent
    port, which apply writes with agent.toml) is missing or differs, and agent.toml
    itself does not: a stack installed before hosts kept records, or a record removed."""
    have = {c.address for c in node_files}
    out: list[Change] = []
    for name, facts in sorted(observed.nodes.items()):
        address = f"node.{name}.agent.config"
        if not facts.reachable or facts.stacks is None or facts.managed is None \
                or facts.agent.version is None or address in have:
            continue
        want = own_record(spec, name)
        if want not in facts.stacks:
            out.append(Change(address, Action.UPDATE, "the host has no record of this "
                              "stack in ~/.config/modelstack/stacks", "none", name,
                              (("record", _record_line(want)),)))
    return out


def _record_line(record: StackOnHost) -> str:
    router = f", router port {record.router_port}" if record.router_port else ""
    return f"prefix {record.prefix}, agent port {record.agent_port}{router}"


def _file_drift(want: HostFile, have: ManagedFile | None) -> list[tuple[str, Action, str]]:
    """(address, action, reason) for each way the file on the host differs from `want`."""
    if have is None:
        return [(want.address, Action.CREATE, "upload" if want.kind == "upload" else "write")]
    if have.sha256 is None:
        return [(want.address, Action.CREATE, "missing")]
    if have.drifted:
        return [(want.address, Action.UPDATE, "changed by hand")]
    old = dict(p.split(":", 1) for p in have.fingerprint.split(",")) \
        if ":" in have.fingerprint else {"": have.fingerprint}
    return [(f"{want.address}.{part}" if part else want.address, Action.UPDATE, "changed")
            for part, value in want.parts().items() if old.get(part) != value]


def _order(change: Change) -> tuple[Any, ...]:
    # addresses sort by their parts, with replica numbers as numbers: [2] before [10]
    head, _, index = change.address.partition("[")
    number = int(index.rstrip("]")) if index.rstrip("]").isdigit() else -1
    return (head, number, change.address)
