"""Every stack.toml value that reaches a shell, a path or a template on the hosts, set to
a hostile value (command substitution, backticks, `;`, a newline, quotes, `..`, systemd
specifiers): either stack.toml refuses it with an error that names the file and line and
gives a hint, or nothing that plan and the deploy renderers make of it runs the value.

"Runs" is checked by running: every command and script apply would send to a host (the
deploy steps of each service manager, runtime installs and removals, the lock, the
host-files probe) is run by `sh` in a sandbox, as an unprivileged user
when the tests run as root, with a PATH of harmless stand-ins and the real `touch`. Each
payload touches a canary file; it must never appear. The files apply writes are checked
by form: `sh -n` for the supervisor script, the same directives in the systemd unit, a
TOML agent.toml and a plist that parse.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import plistlib
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from deploys.probe import HostState, host_files_script
from deploys.runtimes import removal_script
from deploys.services import reload_commands, start_commands, stop_commands, unit_file
from deploys.steps import host_steps
from stack import lock
from stack.apply.desired import desired_state
from stack.apply.hosts import Node
from stack.apply.report import HostReport
from stack.apply.targets import host_targets, runtime_install
from stack.catalog import Recipe, recipe
from stack.config import check_text
from stack.nodes import node_prefix
from stack.pipeline import make_plan
from stack.render import render_plan
from stack.snapshot import Observed
from stack.spec import StackSpec
from stack.wheelhouse import AgentBundle

ROOT = Path(__file__).resolve().parents[2]
QWEN_CONFIG = ROOT / "tests" / "estimate" / "configs" / "qwen2.5-7b-instruct.json"
HASH = "sha256:" + "ab" * 32
PAYLOADS = [
    "$(touch {canary})",
    "`touch {canary}`",
    "x;touch {canary}",
    "x\ntouch {canary}",
    "x'; touch {canary}; echo '",
    'x"; touch {canary}; echo "',
    "x && touch {canary} #",
    "x|touch {canary}",
    "../../../../../{canary}",
    "--x=$(touch {canary})",
    "%n${{PATH}}$MAINPID",
]
# Where each value sits in the base stack below; a `KEY` step renames that table key.
FIELDS: list[tuple[Any, ...]] = [
    ("stack", "name"), ("stack", "prefix"),
    ("nodes", "*", "prefix"), ("nodes", "*", "ssh_user"), ("nodes", "*", "address"),
    ("nodes", "*", "labels", "zone"), ("nodes", "*", "labels", "KEY"),
    ("nodes", "*", "drivers", "nvidia", "version"), ("nodes", "*", "drivers", "amd", "version"),
    ("hosts", "gpu-01", "address"), ("hosts", "gpu-01", "user"), ("hosts", "KEY"),
    ("runtimes", "vllm", "versions", 0), ("runtimes", "vllm", "package"),
    ("runtimes", "vllm", "index_url"), ("runtimes", "vllm", "env", "X"),
    ("runtimes", "vllm", "env", "KEY"), ("runtimes", "KEY"),
    ("runtimes", "llama.cpp", "url"), ("runtimes", "llama.cpp", "sha256", "b1"),
    ("runtimes", "llama.cpp", "subdir"), ("runtimes", "llama.cpp", "cmake_args", 0),
    ("runtimes", "llama.cpp", "targets", 0), ("runtimes", "sys", "path"),
    ("runtimes", "vllm", "requires", 0), ("runtimes", "vllm", "extra_index_url"),
    ("runtimes", "vllm", "requirements", 0), ("runtimes", "vllm", "from_extra_index", 0),
    ("runtimes", "vllm", "remove_files", 0), ("runtimes", "llama.cpp", "build_env", "Z"),
    ("runtimes", "llama.cpp", "requires", 0), ("nodes", "*", "env", "X"),
    ("stack", "known_hosts"),
    ("models", "qwen", "backend_version"), ("models", "qwen", "args", 0),
    ("models", "qwen", "env", "X"), ("models", "qwen", "source"),
    ("models", "qwen", "aliases", 0), ("models", "qwen", "mmproj"),
    ("models", "sd", "components", "vae"),
    ("models", "qwen", "selector", 0), ("models", "KEY"),
    ("models", "tool", "command"), ("models", "tool", "health_path"),
    ("keys", 0, "name"), ("keys", 0, "owner"),
]
# Commands the rendered scripts call, as stand-ins that do nothing; `touch` is real.
STAND_INS = (
    "apt-get", "apt-mark", "amdgpu-install", "cat", "chmod", "cmake", "cp", "curl", "dkms",
    "dnf", "dpkg", "dracut", "find", "grep", "head", "kill", "launchctl", "ln", "ls", "mkdir",
    "mv", "nproc", "od", "python3", "rm", "setsid", "sha256sum", "sleep", "systemctl", "tail",
    "tar", "tr", "uname", "unzip", "update-initramfs", "usermod", "wget",
)
MANAGERS = ("systemd", "launchd", "supervise")
UNPRIVILEGED = 65534  # nobody


def _base(prefix: str) -> dict[str, Any]:
    return {
        "stack": {"name": "lab", "prefix": prefix, "known_hosts": "known_hosts"},
        "hosts": {"gpu-01": {"address": "10.0.0.11", "user": "ops"},
                  "mi-01": {"address": "10.0.0.12"}},
        "nodes": {"*": {"ssh_user": "ops", "address": "10.1.0.1", "labels": {"zone": "a"},
                        "env": {"X": "1"},
                        "drivers": {"nvidia": {"mode": "install", "version": "580"},
                                    "amd": {"mode": "install", "version": "6.4.1"}}}},
        "runtimes": {
            "vllm": {"versions": ["0.11.0"], "source": "pip", "package": "vllm=={version}",
                     "index_url": "https://pypi.org/simple", "env": {"X": "1"},
                     "requires": ["python3"], "extra_index_url": "https://example.org/simple",
                     "requirements": ["plugin=={version}"], "from_extra_index": ["torch"],
                     "remove_files": ["plugin/lib/*.so"]},
            "llama.cpp": {"versions": ["b1"], "source": "build",
                          "url": "https://example.org/llama-{version}.tar.gz",
                          "sha256": {"b1": "cd" * 32}, "subdir": "vendor/llama.cpp",
                          "cmake_args": ["-DGGML_RPC=ON"], "targets": ["llama-server"],
                          "requires": ["cmake"], "build_env": {"Z": "1"}},
            "sys": {"backend": "llama.cpp", "versions": ["s1"], "source": "system",
                    "path": "/usr/local/llama/{version}/bin"},
        },
        "models": {
            "qwen": {"source": "local://models/qwen", "backend": "vllm",
                     "backend_version": "0.11.0", "context": 8192, "args": ["--seed", "1"],
                     "env": {"X": "1"}, "aliases": ["q"], "mmproj": "mmproj.gguf",
                     "selector": ["zone=a"]},
            "sd": {"source": "local://models/sd.gguf", "components": {"vae": "ae.safetensors"}},
            "tool": {"source": "/models/tool", "backend": "custom",
                     "command": "tool-server --port {port} --model {model_path}",
                     "health_path": "/health"},
        },
        "keys": [{"name": "k", "hash": HASH, "owner": "ops"}],
    }


def _facts() -> Observed:
    h100 = {"index": 0, "uuid": "GPU-0", "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3",
            "memory_bytes": 85520809984, "compute_capability": "9.0"}
    common = {"os": "linux", "arch": "aarch64", "memory_bytes": 540 * 10**9, "user": "ops",
              "disk_free_bytes": 2 * 10**12, "kernel": "6.8.0-45-generic", "agent": {}}
    return Observed.model_validate({"format_version": 1, "nodes": {
        "gpu-01": {**common, "address": "10.0.0.11", "distro": "ubuntu 24.04",
                   "pci_accelerators": {"nvidia": 1}, "gpus": [h100],
                   "runtimes": {"vllm": ["0.10.0"]}},
        "mi-01": {**common, "address": "10.0.0.12", "distro": "rhel 9.4",
                  "pci_accelerators": {"amd": 1}, "runtimes": {"llama.cpp": ["b0"]}},
    }})


def _set(data: dict[str, Any], path: tuple[Any, ...], value: str) -> None:
    *head, last = path
    for step in head:
        data = data[step]
    if last == "KEY":  # rename the first key of this table to the value
        first = next(iter(data))
        data[value] = data.pop(first)
    else:
        data[last] = value


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    """A folder the unprivileged user can write: stand-ins in `bin`, the stack in `stack`,
    the hosts' prefix in `prefix`."""
    folder = Path(tempfile.mkdtemp(prefix="stack-hostile-", dir="/tmp"))
    try:
        folder.chmod(0o777)
        (folder / "bin").mkdir()
        stand_in = folder / "bin" / "stand-in"
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
        for name in STAND_INS:
            (folder / "bin" / name).symlink_to(stand_in)
        touch = shutil.which("touch")
        assert touch is not None
        (folder / "bin" / "touch").symlink_to(touch)
        (folder / "stack" / "models" / "qwen").mkdir(parents=True)
        shutil.copy(QWEN_CONFIG, folder / "stack" / "models" / "qwen" / "config.json")
        (folder / "bundle.tar").write_bytes(b"bundle")
        (folder / "prefix").mkdir(mode=0o777)
        (folder / "prefix").chmod(0o777)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(script: str, sandbox: Path) -> subprocess.CompletedProcess[str]:
    """`script` run by sh in the sandbox: its PATH, its folder, unprivileged if we are root."""
    sh = shutil.which("sh") or "/bin/sh"
    argv = [sh, "-s"]  # the script on stdin: the facts scripts alone pass argv's limit
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "running as root needs setpriv to drop privileges"
        argv = [setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
                "--clear-groups", "--", *argv]
    return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=60,
                          cwd=sandbox, env={"PATH": str(sandbox / "bin"), "HOME": str(sandbox)})


def _syntax_ok(script: str) -> bool:
    sh = shutil.which("sh") or "/bin/sh"
    return subprocess.run([sh, "-n", "-c", script], capture_output=True).returncode == 0


@dataclasses.dataclass
class Rendered:
    """Everything apply would send to the hosts for one stack.toml."""

    commands: list[str]
    units: dict[str, str]  # "manager node service" -> content
    agent_tomls: list[str]


def _render(spec: StackSpec, text: str, sandbox: Path, monkeypatch: pytest.MonkeyPatch,
            ) -> Rendered:
    stack_dir = sandbox / "stack"
    facts = _facts()
    plan = make_plan(spec, text.encode(), facts, stack_dir)
    render_plan(plan)
    bundle = AgentBundle(sandbox / "bundle.tar", "0.1.0+test", "modelstack-0.1.0-py3-none-any.whl")
    monkeypatch.setattr("stack.apply.targets.agent_bundle", lambda **_: bundle)
    desired = desired_state(spec, stack_dir, plan)
    out = Rendered([], {}, [])
    info = lock.LockInfo("lock-1", "ops@ci", "2026-01-01T00:00:00Z", 1)
    nodes = [Node(name, None, node_prefix(spec, name), node,  # type: ignore[arg-type]
                  HostState(), manager="supervise")
             for name, node in facts.nodes.items()]
    reports = {n.name: HostReport(n.name) for n in nodes}
    targets, runtime_keys, model_keys = host_targets(spec, stack_dir, nodes, desired, reports)
    assert not [r for r in reports.values() if r.error], reports
    for node in nodes:
        # every runtime version, not only those the placed replicas use
        recipes = [recipe(spec, name, version, "cpu")
                   for name, rt in spec.runtimes.items() for version in rt.versions]
        every = [runtime_install(stack_dir, r, node.prefix, node.facts)[0]
                 for r in recipes if isinstance(r, Recipe)]
        target = dataclasses.replace(targets[node.name], runtimes=every)
        keys = sorted({*runtime_keys, *(f"runtime {i.name} {i.folder}" for i in every)})
        for step in host_steps(target, keys, model_keys):
            out.commands += step.commands
        for service in (target.agent_service, target.router_service):
            for manager in MANAGERS if service is not None else ():
                as_managed = dataclasses.replace(service, manager=manager)
                out.units[f"{manager} {node.name} {service.name}"] = unit_file(as_managed)
                out.commands += start_commands(as_managed, running=True, restart=True)
                out.commands += stop_commands(as_managed)
                out.commands += reload_commands(as_managed)
        out.agent_tomls.append(target.agent_toml)
        for name, versions in node.facts.runtimes.items():
            out.commands.append(removal_script(node.prefix, name, versions))
        out.commands.append(host_files_script(node.prefix, ["/x"], [], []))
        out.commands.append(lock.host_acquire_script(node.prefix, info))
        out.commands.append(lock.host_release_script(node.prefix, "lock-1"))
    out.commands = list(dict.fromkeys(out.commands))
    return out


def _check_forms(rendered: Rendered, baseline: Rendered) -> None:
    for key, unit in rendered.units.items():
        manager = key.split()[0]
        if manager == "supervise":
            assert _syntax_ok(unit), key
        elif manager == "launchd":
            plistlib.loads(unit.encode())
        directives = [line.split("=", 1)[0] for line in unit.splitlines()]
        assert directives == [line.split("=", 1)[0]
                              for line in baseline.units[key].splitlines()], key
    for text, base in zip(rendered.agent_tomls, baseline.agent_tomls, strict=True):
        assert set(tomllib.loads(text)) == set(tomllib.loads(base))


@pytest.fixture(scope="module")
def baseline(sandbox: Path) -> Rendered:
    with pytest.MonkeyPatch.context() as monkeypatch:
        text = tomlkit.dumps(_base(str(sandbox / "prefix")))
        spec, problems = check_text(text)
        assert spec is not None, problems
        return _render(spec, text, sandbox, monkeypatch)


def test_the_sandbox_sees_a_command_that_runs(sandbox: Path) -> None:
    canary = sandbox / "pwned"
    assert _run(f"echo x; touch {canary}", sandbox).returncode == 0
    assert canary.exists(), "the sandbox could not show an injected command"
    canary.unlink()


def test_the_base_stack_renders_every_kind_of_command(baseline: Rendered) -> None:
    joined = "\n".join(baseline.commands)
    for wanted in ("nvidia-open-580", "amdgpu-install-6.4.60401", "pip install",
                   "cmake -S", "ln -s", "rm -rf", "systemctl", "launchctl", "setsid"):
        assert wanted in joined, wanted


@pytest.mark.parametrize("path", FIELDS, ids=[".".join(map(str, f)) for f in FIELDS])
def test_a_hostile_value_is_refused_or_runs_nothing(
    path: tuple[Any, ...], sandbox: Path, baseline: Rendered, monkeypatch: pytest.MonkeyPatch,
) -> None:
    canary = sandbox / "pwned"
    victim = sandbox / "victim"
    victim.mkdir(exist_ok=True)
    for payload in PAYLOADS:
        value = payload.format(canary=canary)
        data = copy.deepcopy(_base(str(sandbox / "prefix")))
        _set(data, path, value)
        text = tomlkit.dumps(data)
        spec, problems = check_text(text)
        if problems:
            for problem in problems:
                assert "(stack.toml:" in problem.message and problem.hint, problem.render()
            continue
        assert spec is not None
        rendered = _render(spec, text, sandbox, monkeypatch)
        _check_forms(rendered, baseline)
        # each command in its own subshell: one that stops (`set -e`) stops only itself
        script = "\n".join(f"(\n{command}\n) >/dev/null 2>&1" for command in rendered.commands)
        assert _syntax_ok(script), f"{value!r} at {path} breaks a command's syntax"
        _run(script, sandbox)
        assert not canary.exists(), f"{value!r} at {path} ran"
        assert victim.is_dir(), f"{value!r} at {path} deleted outside the prefix"
