"""The router on its nodes: router.json written where it differs, the router started or reloaded."""

from __future__ import annotations

from deploys.services import reload_commands, start_commands
from deploys.steps import agent_paths, sha256_text
from stack import remote
from stack.apply.desired import Desired
from stack.apply.hosts import Node
from stack.apply.report import HostReport
from stack.errors import ApplyError, StackError
from stack.hostfiles import router_body, router_service
from stack.spec import StackSpec


def update_routers(spec: StackSpec, nodes: list[Node], desired: Desired,
                   reports: dict[str, HostReport]) -> bool:
    """Write router.json where it differs and start or reload the router (SIGHUP)."""
    if desired.router is None:
        return False
    body = router_body(desired.router)
    changed = False
    for node in nodes:
        if node.name not in desired.router_nodes or reports[node.name].error is not None:
            continue
        service = router_service(spec, node.prefix, node.manager)
        path = agent_paths(node.prefix)["router_json"]
        alive = bool(node.probed.alive.get(service.supervisor_pid_file))
        if service.manager != "supervise":
            alive = True
        fresh = node.probed.files.get(path) != sha256_text(body)
        unit_changed = "router-unit" in reports[node.name].changed
        agent_changed = "agent-install" in reports[node.name].changed
        try:
            if fresh:
                remote.write(node.host, path, body, "600")
            commands = start_commands(service, running=alive, restart=unit_changed or agent_changed)
            if alive and fresh and not commands:
                commands = reload_commands(service)
            for command in commands:
                ok, _, err = remote.run(node.host, command)
                if not ok:
                    raise ApplyError(f"`{node.name}`: the router did not start: {err.strip()}",
                                     hint=f"read {service.log} on the host.")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
            continue
        node.written[path] = sha256_text(body)
        if fresh or commands:
            reports[node.name].changed.append("router")
            changed = True
    return changed
