"""What each host needs (`HostTarget`): runtime installs, model uploads, drivers, disk space."""

from __future__ import annotations

import posixpath
from pathlib import Path

from agent.assignment import Assignment, Instance
from deploys.drivers import DriverRequest
from deploys.runtimes import RuntimeInstall, installed
from deploys.steps import HostTarget, ModelUpload, agent_paths
from stack.apply.desired import Desired
from stack.apply.hosts import Node
from stack.apply.report import HostReport
from stack.assign import resolve_local
from stack.bundle_target import AGENT_HINT, BundleTarget, agent_problem, bundle_target
from stack.catalog import Recipe, recipe_of_folder
from stack.errors import ApplyError, StackError
from stack.hostfiles import agent_listen, agent_service, render_agent_toml, router_service
from stack.neighbours import own_record
from stack.snapshot import NodeFacts
from stack.spec import StackSpec
from stack.wheelhouse import (
    AgentBundle,
    agent_bundle,
    agent_extras,
    fetch_sdist,
    prebuilt_bin,
    prebuilt_tarball,
    sha256_file,
)


def runtime_of(spec: StackSpec, inst: Instance, prefix: str) -> Recipe | None:
    """The recipe of an instance's runtime path under the prefix (a stack.toml or
    catalogue runtime), or None."""
    base = f"{prefix}/runtimes/"
    if not inst.runtime_path.startswith(base):
        return None
    name, _, folder = inst.runtime_path[len(base):].partition("/")
    return recipe_of_folder(spec, name, folder)


def runtime_install(
    stack_dir: Path, found: Recipe, prefix: str, facts: NodeFacts,
) -> tuple[RuntimeInstall, Path | None]:
    """A runtime version to install on one host, and the controller file it needs."""
    name, version, variant, rt = found.name, found.version, found.variant, found.spec
    expected = rt.sha256.get(version)
    url = (rt.url or "").replace("{version}", version)
    local: Path | None = None
    if rt.source in ("archive", "build") and not rt.url and rt.package:
        local = fetch_sdist(rt.package.replace("{version}", version),
                            what=f"runtimes.{name}.package")
    elif rt.source in ("archive", "build") and (url.startswith("local://") or url.startswith("/")):
        local = resolve_local(url, stack_dir) if url.startswith("local://") else Path(url)
        if not local.exists():
            raise ApplyError(f"`runtimes.{name}.url` names `{local}`, which does not exist",
                             hint="put the archive there or fix the URL.")
    upload = f"{prefix}/runtimes/.uploads/{name}-{found.folder}"
    archive: tuple[Path, str] | None = None  # what a controller build is made from, its sha256
    if rt.source == "build" and local is not None:
        digest = sha256_file(local)
        if expected and digest != expected:
            raise ApplyError(
                f"`runtimes.{name}.sha256.\"{version}\"` does not match `{local}` "
                f"(its sha256 is {digest})",
                hint="fix the sha256 in stack.toml or replace the archive.",
            )
        archive = local, digest
    elif rt.source == "build" and expected:
        # a URL source with a pinned sha256: a controller build of that archive counts too
        archive = Path(url.rsplit("/", 1)[-1]), expected
    if archive is not None:
        prebuilt = prebuilt_bin(*archive, rt.cmake_args, rt.targets, rt.subdir,
                                f"{facts.os}-{facts.arch}")
        if prebuilt is not None:
            install = RuntimeInstall(name, version, rt, prefix, upload=upload, prebuilt=True,
                                     variant=variant)
            return install, prebuilt_tarball(prebuilt)
    if local is not None:  # for a build, `expected` is unset or its checked digest
        return RuntimeInstall(name, version, rt, prefix, upload=upload,
                              sha256=expected or sha256_file(local), variant=variant), local
    return RuntimeInstall(name, version, rt, prefix, sha256=expected, variant=variant), None


def _runtime_installs(spec: StackSpec, stack_dir: Path, node: Node, assignment: Assignment,
                      ) -> tuple[list[RuntimeInstall], dict[str, Path]]:
    """The runtime versions the host's instances use, and the controller files they need
    (host path -> controller path)."""
    installs: list[RuntimeInstall] = []
    uploads: dict[str, Path] = {}
    seen: set[tuple[str, str]] = set()
    for inst in assignment.instances:
        found = runtime_of(spec, inst, node.prefix)
        if found is None or (found.name, found.folder) in seen:
            continue
        seen.add((found.name, found.folder))
        install, local = runtime_install(stack_dir, found, node.prefix, node.facts)
        installs.append(install)
        if local is not None:
            uploads[install.path] = local
    return installs, uploads


def model_uploads(assignment: Assignment, stack_dir: Path) -> list[ModelUpload]:
    """The controller files (`local://` models) the assignment's instances need on the host."""
    uploads: dict[str, ModelUpload] = {}
    for inst in assignment.instances:
        if not inst.source.startswith("local://") or not inst.model_path:
            continue
        source = resolve_local(inst.source, stack_dir)
        if source.is_file():  # and the files it loads beside it: a projector, components
            for rel in (inst.mmproj or "", *inst.components.values()):
                beside = source.parent / rel if rel and not rel.startswith("/") else None
                if beside is not None and beside.is_file():
                    dest = posixpath.join(posixpath.dirname(inst.model_path), rel)
                    uploads[dest] = ModelUpload(beside, dest, sha256_file(beside))
        files = ([source] if source.is_file()
                 else sorted(p for p in source.rglob("*") if p.is_file()))
        # a folder goes to PREFIX/models/NAME; its model_path is that folder, or the main
        # GGUF in it (a folder of GGUF files, which llama.cpp loads by file)
        folder = inst.model_path
        if source.is_dir() and (source / posixpath.basename(folder)).is_file():
            folder = posixpath.dirname(folder)
        for path in files:
            dest = inst.model_path if source.is_file() else (
                f"{folder}/{path.relative_to(source).as_posix()}")
            uploads[dest] = ModelUpload(path, dest, sha256_file(path))
    return list(uploads.values())


def driver_requests(spec: StackSpec, node: Node) -> list[DriverRequest]:
    """The drivers stack.toml asks for on this host, one per vendor."""
    from stack.config import node_settings

    user = node.facts.user or None
    return [DriverRequest(node.name, vendor, d.mode, d.version, user)
            for vendor, d in sorted(node_settings(spec, node.name).drivers.items())]


def _host_target(spec: StackSpec, stack_dir: Path, node: Node, desired: Desired,
                 bundle: AgentBundle, secret: bytes) -> HostTarget:
    """Everything one host should have once its deploy steps ran."""
    from stack.secrets import derive_key

    assignment = desired.assignments.get(node.name, Assignment(node=node.name))
    installs, uploads = _runtime_installs(spec, stack_dir, node, assignment)
    models = model_uploads(assignment, stack_dir)
    drivers = driver_requests(spec, node)
    router = (router_service(spec, node.prefix, node.manager)
              if node.name in desired.router_nodes else None)
    return HostTarget(
        node=node.name, prefix=node.prefix, facts=node.facts, probed=node.probed,
        drivers=drivers, runtimes=installs, runtime_uploads=uploads,
        bundle=bundle.tarball, bundle_version=bundle.version,
        wheel_name=bundle.wheel_name, bundle_bytes=bundle.unpacked_bytes,
        agent_toml=render_agent_toml(spec, node.name,
                                     agent_listen(spec, node.name, node.facts),
                                     node.prefix),
        agent_token=derive_key(secret, f"agent:{node.name}") + "\n",
        agent_service=agent_service(spec, node.prefix, node.manager),
        router_service=router, models=models, stack_record=own_record(spec, node.name),
    )


def _bundles(spec: StackSpec, nodes: list[Node],
             ) -> dict[BundleTarget | None, AgentBundle | StackError]:
    """The agent bundle of each host target among `nodes` (python3, OS, arch, libc), or
    why it cannot be built (naming the hosts of that target)."""
    extras = agent_extras(spec)
    hosts: dict[BundleTarget | None, list[str]] = {}
    for node in nodes:
        if agent_problem(node.facts) is None:
            hosts.setdefault(bundle_target(node.facts), []).append(node.name)
    out: dict[BundleTarget | None, AgentBundle | StackError] = {}
    for target, names in hosts.items():
        try:
            out[target] = agent_bundle(extras=extras, target=target, hosts=tuple(names))
        except StackError as err:
            out[target] = err
    return out


def host_targets(
    spec: StackSpec, stack_dir: Path, nodes: list[Node], desired: Desired,
    reports: dict[str, HostReport],
) -> tuple[dict[str, HostTarget], list[str], list[str]]:
    """Per-host targets and the fleet-wide step keys (runtimes, models); a host whose
    target cannot be made (or does not fit its disk) is reported and left out."""
    from stack.secrets import stack_secret

    bundles = _bundles(spec, nodes)
    secret = stack_secret(stack_dir)
    targets: dict[str, HostTarget] = {}
    for node in nodes:
        problem = agent_problem(node.facts)
        if problem is not None:  # what the plan shows as a blocked agent
            reports[node.name].fail(f"no agent can be installed on `{node.name}`: {problem}",
                                    AGENT_HINT)
            continue
        try:
            bundle = bundles[bundle_target(node.facts)]
            if isinstance(bundle, StackError):
                raise bundle
            target = _host_target(spec, stack_dir, node, desired, bundle, secret)
            check_disk(node.name, node.prefix, node.facts, target)
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
            continue
        targets[node.name] = target
    runtime_keys = {f"runtime {i.name} {i.folder}" for t in targets.values() for i in t.runtimes}
    model_keys = {f"model {m.dest}" for t in targets.values() for m in t.models}
    return targets, sorted(runtime_keys), sorted(model_keys)


def upload_bytes(target: HostTarget) -> int:
    """Bytes this host still has to receive (what is already there is not counted)."""
    total = 0
    if target.probed.sidecars.get(agent_paths(target.prefix)["bundle"]) \
            != target.bundle_version:
        packed = target.bundle.stat().st_size  # the tarball, its wheels, the venv
        total += packed + 2 * max(packed, target.bundle_bytes)
    facts = target.facts
    for install in target.runtimes:
        if installed(facts.runtime_recipes, facts.runtimes, install.name, install.folder,
                     install.digest):
            continue
        local = target.runtime_uploads.get(install.path)
        size = local.stat().st_size if local is not None else 0
        total += (3 if install.prebuilt else 20) * size  # archive + extracted (+ build)
    for model in target.models:
        if target.probed.sidecars.get(model.dest + ".sha256") != model.sha256:
            total += model.source.stat().st_size
    return total


def check_disk(node: str, prefix: str, facts: NodeFacts, target: HostTarget) -> None:
    """Refuse a host whose disk cannot hold what apply would put there."""
    needed = upload_bytes(target)
    free = target.probed.free or facts.disk_free_bytes
    if needed and free and free < needed:
        raise ApplyError(
            f"`{node}` has {free / 1024**3:.1f} GiB free at `{prefix}` but this apply "
            f"needs about {needed / 1024**3:.1f} GiB there",
            hint="free space on that disk or set `[nodes.\"...\"] prefix` to a larger one.")
