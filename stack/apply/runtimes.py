"""Runtime versions stack.toml no longer lists, removed from the hosts that converged."""

from __future__ import annotations

from agent.assignment import Assignment
from deploys.runtimes import is_folder_name, removal_script, runtime_path, unused_versions
from stack import remote
from stack.apply.desired import Desired
from stack.apply.hosts import Node
from stack.apply.report import HostReport
from stack.catalog import listed_folders
from stack.spec import StackSpec


def remove_unused_runtimes(spec: StackSpec, nodes: list[Node], desired: Desired,
                           reports: dict[str, HostReport]) -> None:
    """Remove the runtime versions stack.toml no longer lists (`unused_versions`), last and
    only on hosts that converged: their instances run as desired by now. A version that
    the desired or the last written assignment still names is kept (the agent runs it)."""
    listed = listed_folders(spec)
    for node in nodes:
        if reports[node.name].error is not None:
            continue  # its instances may still run on a version stack.toml dropped
        told = [*desired.assignments.get(node.name, Assignment(node=node.name)).instances,
                *(node.current.instances if node.current else [])]
        paths = {i.runtime_path for i in told}
        in_use = {(name, v) for name, versions in node.facts.runtimes.items()
                  for v in versions if is_folder_name(name) and is_folder_name(v)
                  and runtime_path(node.prefix, name, v) in paths}
        for name, stale in unused_versions(node.facts.runtimes, listed, in_use).items():
            ok, _, err = remote.run(node.host, removal_script(node.prefix, name, stale))
            if not ok:
                reports[node.name].fail(
                    f"`{node.name}`: could not remove {name} {', '.join(stale)}: "
                    f"{err.strip()[:300]}",
                    "check the permissions of the prefix; the next `stack apply` tries again.")
                break
            reports[node.name].changed.append(f"removed {name} {', '.join(stale)}")
