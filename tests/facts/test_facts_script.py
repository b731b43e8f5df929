"""deploys/facts.sh run for real on this machine through pyinfra's @local connector, with
fake vendor tools on PATH printing recorded outputs and a fake sysfs for PCI devices."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from fleet import FIXTURES, Fleet, response_rule

from agent.gpus import TOOLS
from deploys.facts import SCRIPT, node_facts_from, parse_facts_output
from stack.config import load_text
from stack.observe import gather

H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"


def test_script_runs_each_vendor_tool_with_the_command_its_parser_expects() -> None:
    script = SCRIPT.read_text()
    for tool in TOOLS:
        if tool.name in ("hy-smi", "rocm-smi"):  # flags are shared through $rocm_flags
            assert f"{tool.name} $rocm_flags" in script
            assert f'rocm_flags="{" ".join(tool.command[1:])}"' in script
        else:
            assert " ".join(tool.command) in script, tool.name


def _local_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixtures: dict[str, str],
                pci: list[str]) -> Path:
    """A fake `bin/` on PATH and a fake sysfs for this process (what @local runs under)."""
    kit = Fleet(0, names=[], root=tmp_path / "kit")
    for tool_fixture in fixtures.values():
        tool, pattern, status = response_rule(tool_fixture)
        kit.add_tool_response("here", tool, pattern, (FIXTURES / tool_fixture).read_bytes(),
                              status)
    here = tmp_path / "kit" / "here"
    (here / "bin").mkdir(parents=True, exist_ok=True)
    for k, vendor in enumerate(pci):
        device = here / "sysfs" / "bus" / "pci" / "devices" / f"0000:{k + 1:02x}:00.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text("0x030200\n")
    monkeypatch.setenv("PATH", f"{here / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    monkeypatch.setenv("STACK_SYSFS_ROOT", str(here / "sysfs"))
    return here


def _stack(tmp_path: Path, prefix: Path) -> str:
    return f'[stack]\nprefix = "{prefix}"\n\n[hosts.here]\naddress = "@local"\n'


def test_local_host_reports_its_gpu_runtimes_and_agent_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _local_host(tmp_path, monkeypatch, {"nvidia": H100}, ["0x10de"])
    prefix = tmp_path / "prefix"
    for runtime in ("llama.cpp/b6700", "llama.cpp/b6800", "vllm/0.11.0", 'we"ird/1\\2'):
        marker = prefix / "runtimes" / runtime / ".installed"
        marker.parent.mkdir(parents=True)
        marker.write_text("")
    (prefix / "runtimes" / "vllm" / "0.12.0").mkdir()  # no marker: an interrupted install
    (prefix / "agent").mkdir()
    (prefix / "agent" / ".installed").write_text("0.1.0\n")
    spec = load_text(_stack(tmp_path, prefix))
    node = gather(spec, tmp_path).nodes["here"]
    assert node.reachable and node.error is None
    assert node.os == "linux" and node.cpu_cores >= 1 and node.memory_bytes > 0
    assert node.disk_free_bytes > 0
    assert [(g.vendor, g.name, g.memory_bytes, g.compute_capability) for g in node.gpus] == [
        ("nvidia", "NVIDIA H100 80GB HBM3", 81559 * 1024**2, "9.0")]
    assert node.runtimes == {"llama.cpp": ["b6700", "b6800"], "vllm": ["0.11.0"],
                             'we"ird': ["1\\2"]}
    assert node.agent.version == "0.1.0" and not node.agent.running


def test_gpu_on_the_pci_bus_with_a_driver_that_is_not_loaded_is_reported_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _local_host(tmp_path, monkeypatch,
                {"nvidia": "nvidia/error_nvidia-smi-has-failed_no-driver.txt"},
                ["0x10de", "0x10de"])
    node = gather(load_text(_stack(tmp_path, tmp_path / "p")), tmp_path).nodes["here"]
    assert node.gpus == []
    assert node.pci_accelerators == {"nvidia": 2}  # type: ignore[attr-defined]
    problem = node.gpu_problems[0]  # type: ignore[attr-defined]
    assert problem["status"] == "driver-not-loaded" and "driver" in problem["hint"]


def test_gpu_on_the_pci_bus_without_any_vendor_tool_says_to_install_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _local_host(tmp_path, monkeypatch, {}, ["0x1002"])
    node = gather(load_text(_stack(tmp_path, tmp_path / "p")), tmp_path).nodes["here"]
    assert node.pci_accelerators == {"amd": 1}  # type: ignore[attr-defined]
    assert node.gpu_problems[0]["status"] == "no-tool"  # type: ignore[attr-defined]
    assert "drivers.amd" in node.gpu_problems[0]["hint"]  # type: ignore[attr-defined]


def test_version_mismatch_marks_the_node_for_a_reboot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixture = "nvidia/error_nvml-driver-library-version-mismatch_old-driver.txt"
    _local_host(tmp_path, monkeypatch, {"nvidia": fixture}, ["0x10de"])
    node = gather(load_text(_stack(tmp_path, tmp_path / "p")), tmp_path).nodes["here"]
    assert node.reboot_required
    assert node.gpu_problems[0]["status"] == "version-mismatch"  # type: ignore[attr-defined]


def test_unified_memory_gpu_gets_the_hosts_ram_as_its_memory() -> None:
    output = (FIXTURES / "nvidia/query-gpu-csv_index-name-memtotal-memfree_gb10-dgx-spark_NA-"
              "memory.csv").read_bytes()
    raw = {"os": "linux", "memory_bytes": 128 * 1024**3, "tools": {
        "nvidia-smi": {"rc": 0, "enc": "base64", "out": base64.b64encode(output).decode()}}}
    node = node_facts_from(raw)
    assert node.gpus[0].name == "NVIDIA GB10" and node.gpus[0].memory_bytes == 128 * 1024**3


def test_script_output_is_valid_json_even_with_hex_encoding_when_base64_is_missing(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a PATH with the basics the script needs but no base64
    for tool in ("uname", "sed", "tr", "head", "awk", "df", "dirname", "basename", "id", "od",
                 "nproc", "cat", "timeout", "mktemp", "rm", "mkdir", "getconf"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                               text=True).stdout.strip()
        if found:
            (bin_dir / tool).symlink_to(found)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat '{FIXTURES / H100}'\n")
    fake.chmod(0o755)
    out = subprocess.run(["/bin/sh", str(SCRIPT)], capture_output=True, text=True, check=True,
                         env={"PATH": str(bin_dir), "STACK_PREFIX": str(tmp_path / "p")})
    raw = parse_facts_output(out.stdout)
    assert raw["tools"]["nvidia-smi"]["enc"] == "hex"
    assert node_facts_from(raw).gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert json.loads(out.stdout)["os"] == "linux"


def _script_facts(prefix: Path) -> dict[str, object]:
    done = subprocess.run(["/bin/sh", str(SCRIPT)], env={"STACK_PREFIX": str(prefix),
                                                        "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30, check=True)
    return parse_facts_output(done.stdout)


def test_facts_report_what_apply_wrote_and_what_is_there_now(tmp_path: Path) -> None:
    """`state/managed` (what apply wrote) comes back with the sha256 of each file as it is
    now: unchanged, changed by hand, gone; an upload only has to exist (not re-hashed)."""
    import hashlib

    prefix = tmp_path / "prefix"
    (prefix / "etc").mkdir(parents=True)
    (prefix / "state").mkdir()
    (prefix / "models" / "m").mkdir(parents=True)
    same, edited, gone = (prefix / "etc" / name for name in ("a.toml", "b token", "c.json"))
    same.write_text("a\n")
    edited.write_text("b\n")
    (prefix / "models" / "m" / "w.gguf").write_text("weights")
    sha = {p: hashlib.sha256(t.encode()).hexdigest()
           for p, t in ((same, "a\n"), (edited, "b-as-written\n"), (gone, "c\n"))}
    upload = prefix / "models" / "m" / "w.gguf"
    lost = prefix / "models" / "lost.gguf"
    (prefix / "state" / "managed").write_text(
        f"file fp-a {sha[same]} {same}\nfile fp-b {sha[edited]} {edited}\n"
        f"file keys:1,models:2 {sha[gone]} {gone}\n"
        f"upload {'f' * 64} {'f' * 64} {upload}\nupload {'e' * 64} {'e' * 64} {lost}\n")
    node = node_facts_from(_script_facts(prefix))
    assert node.managed is not None
    files = {path: (f.kind, f.fingerprint, f.drifted) for path, f in node.managed.items()}
    assert files == {str(same): ("file", "fp-a", False), str(edited): ("file", "fp-b", True),
                     str(gone): ("file", "keys:1,models:2", True),
                     str(upload): ("upload", "f" * 64, False),
                     str(lost): ("upload", "e" * 64, True)}
    assert node.managed[str(same)].sha256 == sha[same]
    assert node.managed[str(gone)].sha256 is None


def test_facts_without_a_manifest_report_no_files_and_the_listening_ports(
        tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        node = node_facts_from(_script_facts(tmp_path / "none"))
    assert node.managed == {}
    assert port in node.ports_in_use
    assert node.service_manager in ("supervise", "systemd")


def test_hostile_paths_in_the_manifest_are_only_data(tmp_path: Path) -> None:
    """A path in `state/managed` (it comes from stack.toml: prefix, model file names) that
    holds shell syntax or globs is hashed as the file it names; nothing runs or expands."""
    import hashlib

    prefix = tmp_path / "prefix"
    (prefix / "state").mkdir(parents=True)
    hostile = prefix / "m $(touch PWNED) `touch PWNED2`; * ?.gguf"
    hostile.write_text("w\n")
    sha = hashlib.sha256(b"w\n").hexdigest()
    (prefix / "state" / "managed").write_text(
        f"file fp {sha} {hostile}\nfile fp2 {sha} {prefix}/*\n")
    done = subprocess.run(["/bin/sh", str(SCRIPT)], env={"STACK_PREFIX": str(prefix),
                                                        "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30, check=True,
                          cwd=tmp_path)
    node = node_facts_from(parse_facts_output(done.stdout))
    assert node.managed is not None
    assert node.managed[str(hostile)].sha256 == sha and not node.managed[str(hostile)].drifted
    assert node.managed[f"{prefix}/*"].sha256 is None  # a glob is a name, not expanded
    assert not list(tmp_path.rglob("PWNED*"))


def test_facts_list_the_stacks_recorded_for_the_user_and_skip_stale_or_bad_records(
        tmp_path: Path) -> None:
    """`~/.config/modelstack/stacks/NAME` (what apply records): a record whose prefix is
    gone is stale, and one that is not a name, an absolute path and a port is left out;
    the values are only data to the script."""
    home, live = tmp_path / "home", tmp_path / "opt" / "prod"
    (live / "state").mkdir(parents=True)
    records = home / ".config" / "modelstack" / "stacks"
    records.mkdir(parents=True)
    (records / "prod").write_text(f"prefix={live}\nagent_port=7071\nrouter_port=8081\n")
    (records / "test").write_text(f"prefix={live}\nagent_port=7074\n")  # no router there
    (records / "bad-router").write_text(f"prefix={live}\nagent_port=7075\nrouter_port=0\n")
    (records / "gone").write_text(f"prefix={tmp_path / 'removed'}\nagent_port=7072\n")
    (records / "bad-port").write_text(f"prefix={live}\nagent_port=$(touch PWNED)\n")
    (records / "no newline").write_text(f"prefix={live}\nagent_port=7073")
    done = subprocess.run(["/bin/sh", str(SCRIPT)],
                          env={"STACK_PREFIX": str(tmp_path / "none"), "PATH": "/usr/bin:/bin",
                               "HOME": str(home)},
                          capture_output=True, text=True, timeout=30, check=True, cwd=tmp_path)
    node = node_facts_from(parse_facts_output(done.stdout))
    assert node.stacks is not None
    assert [(s.name, s.prefix, s.agent_port, s.router_port) for s in node.stacks] == [
        ("prod", str(live), 7071, 8081), ("test", str(live), 7074, None)]
    assert not list(tmp_path.rglob("PWNED*"))
    assert node_facts_from(_script_facts(tmp_path / "none")).stacks == []  # no HOME: none


def test_runtime_recipes_keep_only_plain_names_and_digests() -> None:
    """What a host prints reaches the plan's text: a recipe entry is kept only as plain
    folder names and a 16-digit hex digest; anything else counts as not recorded."""
    good = "a" * 16
    facts = node_facts_from({"runtimes": ["vllm/0.33.0-cuda", "llama.cpp/b6700"],
                             "runtime_recipes": [
                                 f"vllm/0.33.0-cuda={good}",
                                 "llama.cpp/b6700=\x1b[31mred\x1b[0m",  # not a digest
                                 f"../etc/passwd={good}", f"vllm/a b={good}",
                                 f"vllm/0.1={good.upper()}", 7, None]})
    assert facts.runtime_recipes == {"vllm": {"0.33.0-cuda": good}}
    assert node_facts_from({"runtimes": []}).runtime_recipes is None  # an older script
