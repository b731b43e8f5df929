"""What one host needs, as data: the deploy steps of `stack apply` for one host.

`host_steps(target)` compares what apply would write (`HostTarget`) with what the host
has (its facts and the `HostFiles` answer) and returns one `Step` per step key. Every host
gets every key (an empty step becomes a pyinfra no-op), so pyinfra sees the same
operation sequence everywhere. `deploys.ops.step` runs a step.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from deploys.drivers import Blocked, DriverRequest, driver_commands, needs_reboot
from deploys.prerequisites import install_commands, plan_prerequisites
from deploys.probe import HostState
from deploys.runtimes import RuntimeInstall, host_requires, install_script, installed
from deploys.services import Service, start_commands, unit_file
from stack.snapshot import NodeFacts, StackOnHost

STACK_RECORDS = ".config/modelstack/stacks"  # under the SSH user's home: one file per stack


@dataclass(frozen=True)
class Upload:
    """A controller file (path) or generated content (bytes) to put at `dest` on the host."""

    dest: str
    path: Path | None = None
    content: bytes | None = None


@dataclass
class Step:
    """One operation on one host: uploads then commands; nothing to do -> `noop`."""

    key: str
    noop: str
    uploads: list[Upload] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    blocked: Blocked | None = None
    reboot: bool = False

    @property
    def changes(self) -> bool:
        return bool(self.uploads or self.commands)


@dataclass(frozen=True)
class ModelUpload:
    """A `local://` model file to put on the host, with its sha256."""

    source: Path
    dest: str
    sha256: str


@dataclass(frozen=True)
class HostTarget:
    """Everything apply would put on one host."""

    node: str
    prefix: str
    facts: NodeFacts
    probed: HostState  # what the host probe found there
    drivers: list[DriverRequest]
    runtimes: list[RuntimeInstall]  # versions this host needs, with uploads resolved
    runtime_uploads: dict[str, Path]  # runtime path -> controller file to upload first
    bundle: Path  # the agent bundle's tarball (`stack.wheelhouse.AgentBundle`)
    bundle_version: str
    wheel_name: str
    agent_toml: str
    agent_token: str
    agent_service: Service
    router_service: Service | None
    models: list[ModelUpload]
    stack_record: StackOnHost | None = None  # the host's record of this stack, if kept
    bundle_bytes: int = 0  # what the bundle's wheels take on the host once extracted


def sha256_text(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def agent_paths(prefix: str) -> dict[str, str]:
    """The files apply manages under a prefix."""
    p = prefix.rstrip("/")
    return {
        "agent_toml": f"{p}/etc/agent.toml",
        "agent_token": f"{p}/etc/agent.token",
        "router_json": f"{p}/etc/router.json",
        "assignment": f"{p}/state/assignment.json",
        "installed": f"{p}/agent/.installed",  # the agent's version (facts read it)
        "bundle": f"{p}/agent/.bundle",  # which bundle it came from (apply compares it)
        "venv": f"{p}/agent/venv",
    }


def write_file(dest: str, content: bytes, mode: str) -> tuple[Upload, list[str]]:
    """Upload to `dest.tmp`, set the mode, then rename: readers never see half a file."""
    q = shlex.quote
    tmp = dest + ".tmp"
    return Upload(tmp, content=content), [
        f"mkdir -p {q(str(Path(dest).parent))}", f"chmod {mode} {q(tmp)}", f"mv {q(tmp)} {q(dest)}",
    ]


def _file_step(key: str, target: HostTarget, dest: str, content: bytes, mode: str) -> Step:
    if target.probed.files.get(dest) == sha256_text(content):
        return Step(key, f"{dest} is up to date")
    upload, commands = write_file(dest, content, mode)
    return Step(key, "", [upload], commands)


def record_text(record: StackOnHost) -> str:
    """A stack's record on a host, as deploys/facts.sh reads it back."""
    router = f"router_port={record.router_port}\n" if record.router_port else ""
    return f"prefix={record.prefix}\nagent_port={record.agent_port}\n{router}"


def record_commands(target: HostTarget) -> list[str]:
    """Write the host's record of this stack (`~/.config/modelstack/stacks/NAME`, which
    other stacks' plans read) when the facts do not list it as it should be."""
    record = target.stack_record
    if record is None or record in (target.facts.stacks or []):
        return []
    q = shlex.quote
    lines = " ".join(q(line) for line in record_text(record).splitlines())
    tmp = q(record.name + ".tmp")
    return ["\n".join([
        'test -n "${HOME:-}" || { echo "HOME is not set: cannot record the stack" >&2; exit 1; }',
        f'd="$HOME"/{STACK_RECORDS}',
        'mkdir -p "$d"',
        f"printf '%s\\n' {lines} > \"$d\"/{tmp}",
        f'mv "$d"/{tmp} "$d"/{q(record.name)}',
    ])]


def record_remove_command(record: StackOnHost) -> str:
    """Remove the host's record of this stack (`stack destroy`), if it is this install's
    (a record of the same name for another prefix is another install's)."""
    q = shlex.quote
    return (f'f="$HOME"/{STACK_RECORDS}/{q(record.name)}; '
            f'if [ -n "${{HOME:-}}" ] && [ -f "$f" ] && grep -qxF {q("prefix=" + record.prefix)} '
            '"$f"; then rm -f "$f"; fi')


def driver_step(target: HostTarget) -> Step:
    commands: list[str] = []
    for request in target.drivers:
        result = driver_commands(target.facts, request)
        if isinstance(result, Blocked):
            return Step("driver", "", blocked=result)
        commands += result
    step = Step("driver", "drivers are in the desired state", commands=commands)
    # a pending reboot counts without driver settings too: the plan shows it either way
    step.reboot = needs_reboot(target.facts, commands)
    return step


def runtime_step(key: str, target: HostTarget, install: RuntimeInstall | None) -> Step:
    if install is None:
        return Step(key, f"{key} is not used on {target.node}")
    facts = target.facts
    if installed(facts.runtime_recipes, facts.runtimes, install.name, install.folder,
                 install.digest):
        return Step(key, f"{install.name} {install.folder} is installed")
    first = install_commands(plan_prerequisites(host_requires(install.spec, install.prebuilt),
                                                target.facts))
    uploads = []
    source = target.runtime_uploads.get(install.path)
    if source is not None and install.upload:
        uploads.append(Upload(install.upload, path=source))
        mkdir = f"mkdir -p {shlex.quote(str(Path(install.upload).parent))}"
    else:
        mkdir = "true"
    return Step(key, "", uploads, [*first, mkdir, install_script(install)])


def agent_install_step(target: HostTarget) -> Step:
    paths = agent_paths(target.prefix)
    installed = target.probed.sidecars.get(paths["bundle"])
    if installed == target.bundle_version:
        return Step("agent-install", f"agent {target.bundle_version} is installed")
    q = shlex.quote
    home = f"{target.prefix.rstrip('/')}/agent"
    tar = f"{home}/bundle.tar.xz"
    wheel = f"wheels/{target.wheel_name}"
    venv = q(paths["venv"])
    pip = f"{venv}/bin/python \"$(ls wheels/pip-*.whl | head -1)\"/pip install --quiet"
    version = "v='import sys; print(sys.version_info[:2])'"
    script = "\n".join([
        "set -eu",
        f"cd {q(home)}",
        # xz by python3's lzma: hosts need no xz binary
        "rm -rf wheels",
        "python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), "
        "sys.stdout.buffer)' bundle.tar.xz | tar -xf -",
        "rm -f bundle.tar.xz",
        # the bundle's wheels are for `python3`: a venv of another Python is made anew
        version,
        f"[ -x {venv}/bin/python ] && [ \"$({venv}/bin/python -I -S -c \"$v\")\" = "
        f"\"$(python3 -I -S -c \"$v\")\" ] || {{ rm -rf {venv}; "
        f"python3 -m venv --without-pip {venv}; }}",
        f"{pip} --no-index --find-links wheels -r wheels/requirements.txt",
        f"{pip} --no-index --no-deps --force-reinstall {q(wheel)}",
        "rm -rf wheels",
        f"printf '%s\\n' {q(target.bundle_version)} > .installed",
        f"printf '%s\\n' {q(target.bundle_version)} > .bundle",
    ])
    return Step("agent-install", "", [Upload(tar, path=target.bundle)],
                [f"mkdir -p {q(home)}", script])


def agent_service_step(target: HostTarget, restart: bool) -> Step:
    service = target.agent_service
    alive = target.probed.alive.get(service.supervisor_pid_file, False)
    if service.manager != "supervise":
        # running means restart when asked: `systemctl start` leaves a running agent as is
        alive = target.probed.files.get(service.unit_path) is not None
    commands = start_commands(service, running=bool(alive), restart=restart)
    return Step("agent-service", "the agent is running", commands=commands)


def model_step(key: str, target: HostTarget, model: ModelUpload | None) -> Step:
    if model is None:
        return Step(key, f"{key} is not needed on {target.node}")
    sidecar = model.dest + ".sha256"
    if target.probed.sidecars.get(sidecar) == model.sha256:
        return Step(key, f"{model.dest} has sha256 {model.sha256[:12]}")
    q = shlex.quote
    part = model.dest + ".part"
    check = (f"echo {q(model.sha256 + '  ' + part)} | sha256sum -c --quiet - || "
             f"{{ echo {q('upload of ' + model.dest + ' is corrupt')} >&2; rm -f {q(part)}; "
             "exit 4; }")
    return Step(key, "", [Upload(part, path=model.source)], [
        check, f"mv {q(part)} {q(model.dest)}",
        f"printf '%s\\n' {q(model.sha256)} > {q(sidecar)}",
    ])


def host_steps(
    target: HostTarget, runtime_keys: list[str], model_keys: list[str],
) -> list[Step]:
    """Every step of one host, in the fleet-wide order (missing keys become no-ops)."""
    paths = agent_paths(target.prefix)
    installs = {f"runtime {i.name} {i.folder}": i for i in target.runtimes}
    models = {f"model {m.dest}": m for m in target.models}
    steps = [driver_step(target)]
    steps += [runtime_step(k, target, installs.get(k)) for k in runtime_keys]
    install = agent_install_step(target)
    config = _file_step("agent-config", target, paths["agent_toml"],
                        target.agent_toml.encode(), "644")
    token = _file_step("agent-token", target, paths["agent_token"],
                       target.agent_token.encode(), "600")
    unit = _file_step("agent-unit", target, target.agent_service.unit_path,
                      unit_file(target.agent_service).encode(), "644")
    if target.router_service is not None:
        router_unit = _file_step("router-unit", target, target.router_service.unit_path,
                                 unit_file(target.router_service).encode(), "644")
    else:
        router_unit = Step("router-unit", f"no router on {target.node}")
    restart = any(s.changes for s in (install, config, token, unit))
    config.commands += record_commands(target)  # beside agent.toml; the agent need not restart
    steps += [install, config, token, unit, router_unit, agent_service_step(target, restart)]
    steps += [model_step(k, target, models.get(k)) for k in model_keys]
    return steps
