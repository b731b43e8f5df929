"""What keeps gathering facts cheap (bench/facts_bench.py measures the time itself).

- deploys/facts.sh starts only a handful of processes: every command it may run is replaced
  on PATH by a wrapper that logs its name, so a new `sed` or `head` per value shows here.
- The command sent over SSH (comment lines left out, no second shell) prints the same JSON
  as the script file.
- `gather` closes its SSH connections: no session of a fleet host outlives it.
- Fleet hosts do not source this machine's ~/.bashrc in their sessions.
- A running agent's status is read from its status file: no Python starts on the host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fleet import FIXTURES, Fleet

from deploys.facts import SCRIPT, agent_status_body, facts_command, node_facts_from
from stack.config import load_text
from stack.observe import gather

H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"
# every command facts.sh may start (those missing on this machine are left out)
COMMANDS = ("uname", "nproc", "getconf", "sysctl", "sw_vers", "df", "id", "tr", "sed", "head",
            "awk", "dirname", "basename", "cat", "timeout", "base64", "od", "mktemp", "rm",
            "mkdir", "modinfo", "mokutil", "needs-restarting", "sudo", "python3")
# run only where the tool exists (none of them on a host without accelerators' tools)
PROBES = {"modinfo", "mokutil", "needs-restarting", "sudo"}
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def _host(tmp_path: Path, runtimes: list[str], nvidia: bool) -> tuple[dict[str, str], Path]:
    """Logging wrappers of every command, a fake sysfs and a prefix; (env, log file)."""
    wrappers = tmp_path / "wrap"
    wrappers.mkdir()
    log = tmp_path / "calls.log"
    for name in COMMANDS:
        real = shutil.which(name, path=SYSTEM_PATH)
        if real:
            (wrappers / name).write_text(f'#!/bin/sh\necho {name} >>"{log}"\nexec {real} "$@"\n')
            (wrappers / name).chmod(0o755)
    if nvidia:
        tool = wrappers / "nvidia-smi"
        tool.write_text(f"#!/bin/sh\nexec {shutil.which('cat')} '{FIXTURES / H100}'\n")
        tool.chmod(0o755)
    for k, (vendor, pci_class) in enumerate([("0x10de", "0x030200"), ("0x8086", "0x060000")]):
        device = tmp_path / "sysfs" / "bus" / "pci" / "devices" / f"0000:{k:02x}:00.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(pci_class + "\n")
    prefix = tmp_path / "prefix"
    for runtime in runtimes:
        (prefix / "runtimes" / runtime).mkdir(parents=True)
        (prefix / "runtimes" / runtime / ".installed").write_text("")
    (prefix / "agent").mkdir(parents=True)
    (prefix / "agent" / ".installed").write_text("0.1.0\n")
    env = {"PATH": f"{wrappers}:{SYSTEM_PATH}", "STACK_PREFIX": str(prefix),
           "STACK_SYSFS_ROOT": str(tmp_path / "sysfs")}
    return env, log


def _calls(log: Path) -> list[str]:
    return [c for c in log.read_text().split() if c not in PROBES] if log.exists() else []


def test_a_host_without_accelerator_tools_costs_five_processes(tmp_path: Path) -> None:
    env, log = _host(tmp_path, ["llama.cpp/b6700", "vllm/0.11.0"], nvidia=False)
    done = subprocess.run(["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          check=True)
    facts = json.loads(done.stdout)
    assert facts["runtimes"] == ["llama.cpp/b6700", "vllm/0.11.0"]
    assert facts["pci"] == ["0x10de:0x030200"] and facts["agent_version"] == "0.1.0"
    assert sorted(_calls(log)) == ["df", "id", "nproc", "python3", "uname"]


def test_a_vendor_tool_adds_itself_its_timeout_and_the_encoder(tmp_path: Path) -> None:
    env, log = _host(tmp_path, [], nvidia=True)
    done = subprocess.run(["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          check=True)
    assert json.loads(done.stdout)["tools"]["nvidia-smi"]["rc"] == 0
    assert sorted(_calls(log)) == ["base64", "df", "id", "nproc", "python3", "timeout", "tr",
                                   "uname"]


def test_only_a_value_that_needs_escaping_costs_tr_and_sed(tmp_path: Path) -> None:
    env, log = _host(tmp_path, ['we"ird/1\\2', "plain/1"], nvidia=False)
    done = subprocess.run(["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          check=True)
    assert json.loads(done.stdout)["runtimes"] == ["plain/1", 'we"ird/1\\2']
    assert sorted(_calls(log)) == ["df", "id", "nproc", "python3", "sed", "tr", "uname"]


def _agent(prefix: Path, status: dict[str, object], live: bool) -> subprocess.Popen[bytes]:
    """A `stack-agent` on the host: a status file, a pid file naming a process whose name is
    `stack-agent` (alive or gone), and an executable that logs its own runs."""
    venv_bin = prefix / "agent" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    log = prefix.parent / "calls.log"
    fallback = {"node": "n", "version": "0.1.0", "running": False, "instances": []}
    (venv_bin / "stack-agent").write_text(
        f"#!/bin/sh\necho stack-agent >>'{log}'\n"
        f"[ \"$1\" = status ] && echo '{json.dumps(fallback)}' && exit 0\nsleep 60\n")
    (venv_bin / "stack-agent").chmod(0o755)
    (prefix / "state").mkdir()
    (prefix / "state" / "status.json").write_text(json.dumps(status))
    proc = subprocess.Popen([str(venv_bin / "stack-agent"), "run"])
    deadline = time.monotonic() + 10
    while "stack-agent" not in _calls(log) and time.monotonic() < deadline:
        time.sleep(0.01)  # it has started (and logged its run)
    if not live:
        proc.kill()
        proc.wait()
    (prefix / "state" / "agent.pid").write_text(json.dumps({"pid": proc.pid, "cmdline": []}))
    return proc


@pytest.mark.parametrize("live", [True, False])
def test_a_running_agents_status_is_its_status_file_and_a_stopped_one_is_asked(
        tmp_path: Path, live: bool) -> None:
    env, log = _host(tmp_path, [], nvidia=False)
    status = {"node": "n", "version": "0.1.0", "running": True, "pid": 1,
              "instances": [{"id": "m-0", "model": "m", "state": "ready", "port": 9000,
                             "backend": "llama.cpp"}]}
    proc = _agent(Path(env["STACK_PREFIX"]), status, live)
    try:
        done = subprocess.run(["/bin/sh", str(SCRIPT)], env=env, capture_output=True,
                              text=True, check=True)
    finally:
        proc.kill()
        proc.wait()
    agent = node_facts_from(json.loads(done.stdout)).agent
    calls = _calls(log)
    if live:  # cat and the encoder instead of a Python start
        assert agent.running and [i.id for i in agent.instances] == ["m-0"]
        assert calls.count("stack-agent") == 1  # the one `run` started above
        assert sorted(calls) == ["base64", "cat", "df", "id", "nproc", "python3",
                                 "stack-agent", "timeout", "tr", "uname"]
    else:  # the pid is gone: `stack-agent status --json` says what is left
        assert not agent.running and agent.instances == []
        assert calls.count("stack-agent") == 2


def test_the_agent_only_mode_prints_the_status_alone_and_starts_no_probe(
        tmp_path: Path) -> None:
    """What `stack apply` polls while instances start: no uname, df, id or vendor tool."""
    env, log = _host(tmp_path, [], nvidia=True)
    status = {"node": "n", "version": "0.1.0", "running": True, "pid": 1, "instances": []}
    proc = _agent(Path(env["STACK_PREFIX"]), status, live=True)
    try:
        done = subprocess.run(["/bin/sh", "-c", facts_command(env["STACK_PREFIX"],
                                                              agent_only=True)],
                              env=env, capture_output=True, text=True, check=True)
    finally:
        proc.kill()
        proc.wait()
    raw = json.loads(done.stdout)
    assert list(raw) == ["agent_status"] and agent_status_body(raw) == status
    assert sorted(_calls(log)) == ["base64", "cat", "stack-agent", "timeout", "tr"]


def test_the_command_sent_prints_what_the_script_file_prints(tmp_path: Path) -> None:
    env, _ = _host(tmp_path, ["llama.cpp/b6700", "x y/ü"], nvidia=True)
    prefix = env.pop("STACK_PREFIX")
    from_file = subprocess.run(["/bin/sh", str(SCRIPT)], env={**env, "STACK_PREFIX": prefix},
                               capture_output=True, text=True, check=True).stdout
    sent = subprocess.run(["/bin/sh", "-c", facts_command(prefix)], env=env,
                          capture_output=True, text=True, check=True).stdout
    strip = [json.loads(x) for x in (from_file, sent)]
    for facts in strip:  # the only value that may move between two runs
        facts.pop("disk_free_bytes")
    assert strip[0] == strip[1]
    assert "#" not in "".join(line[:1] for line in facts_command(prefix).splitlines())


def _sessions(fleet: Fleet) -> list[int]:
    listeners = {h.pid for h in fleet.hosts.values()}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in listeners and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_gather_closes_its_ssh_sessions_and_hosts_skip_the_machines_bashrc() -> None:
    with Fleet(n=2, gpu_tools={"gpu-01": H100}) as fleet:
        observed = gather(load_text(fleet.inventory_toml()), fleet.root)
        assert all(node.reachable for node in observed.nodes.values())
        deadline = time.monotonic() + 5
        while _sessions(fleet) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sessions(fleet) == []
        home = fleet.ssh("node-01", "echo $HOME")
        assert home.stdout.strip() == str(fleet.hosts["node-01"].path / "home")


def test_the_ascend_nic_addresses_of_hccn_conf_are_read_without_a_process(
        tmp_path: Path) -> None:
    env, log = _host(tmp_path, [], nvidia=False)
    env["STACK_HCCN_CONF"] = str(Path(__file__).parent / "hccn" / "hccn.conf")
    done = subprocess.run(["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          check=True)
    sent = json.loads(done.stdout)["hccn_conf"]
    assert sent.split() == [f"address_{n}=192.168.10{n % 4}.10{1 - n // 4}" for n in range(8)]
    assert sorted(_calls(log)) == ["df", "id", "nproc", "python3", "uname"]
