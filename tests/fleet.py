"""A loopback fleet: N test hosts on this machine, each a real `sshd` on its own address.

Every host gets its own random address in 127.0.0.0/8 with a free port, its own folder
(`<root>/<name>/`) holding the sshd config, host key, prefix (`prefix/`), fake sysfs root
(`sysfs/`), PATH folder (`bin/`) and home folder (`home/`). sshd's `SetEnv` gives every SSH
session of a host `PATH=<hostdir>/bin:...`, `HOME=<hostdir>/home`, `STACK_TEST_HOST=<name>`,
`STACK_SYSFS_ROOT=<hostdir>/sysfs` and a unique `STACK_FLEET_HOST` token, so vendor tools and
the facts script see the host's identity even though all hosts are this one machine. The
own home (empty but for this machine's pip.conf) also keeps the login shell from sourcing
this machine's ~/.bashrc in every
session (a developer's rc file, e.g. `pyenv init`, costs ~0.13 s of CPU per session, which a
fleet host of its own would not have and which 16 loopback hosts would share on 2 cores).

GPU hosts get fake vendor tools (`tests/fleet_tools/fake-tool`) that print recorded real
outputs from `tests/facts/fixtures/` (see SOURCES.md there), and fake PCI devices with the
vendor's id under their sysfs root, so the GPUs also show on the PCI bus.

    with Fleet(n=3, gpu_tools={"gpu-01": "nvidia/query-gpu-allfields_csv_h100-...csv"}) as fleet:
        spec_text = fleet.inventory_toml()      # [hosts."gpu-01"] ... for a stack.toml
        fleet.stop_host("gpu-01")               # node failure: sshd and everything it started
        fleet.start_host("gpu-01")
        fleet.require_reboot("gpu-01")          # facts say `reboot_required` until it reboots
        fleet.install_reboot("gpu-01")          # `reboot` on the host = stop, wait, start

A fake reboot (`install_reboot`) is this module run as a script (`fleet.py --dir ROOT reboot
NAME`) by the host's own `reboot`/`shutdown -r`/`systemctl reboot`, detached from the host
and without its session token, so it survives `stop_host`: it logs `down`, stops the host
like `stop_host`, waits, clears the pending-reboot marker, starts it like `start_host` and
logs `up` (`fleet.reboots(name)` reads that log).

Tests import it as `from fleet import Fleet` (tests/ is on sys.path through
tests/conftest.py); the `make_fleet` fixture below stops every fleet at teardown (import it
into a conftest.py: `from fleet import make_fleet  # noqa: F401`). `scripts/fleet up N` /
`scripts/fleet down` start and stop one by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "facts" / "fixtures"
STACK_CLI = ROOT / ".venv" / "bin" / "stack"
# the llama-cpp-python sdist whose vendored llama.cpp scripts/setup-llama-cpp builds
LLAMA_SDIST_VERSION = "0.3.36"
FAKE_TOOL = ROOT / "tests" / "fleet_tools" / "fake-tool"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what a host runs to reboot; on a fleet host each is the fake below (never the real one)
REBOOT_TOOLS = ("reboot", "shutdown", "systemctl")
FAKE_REBOOT = """#!/bin/sh
# A loopback fleet host's `reboot`, `shutdown -r` and `systemctl reboot` (tests/fleet.py):
# the fleet harness stops this host, waits, clears its pending reboot and starts it again,
# from a process outside the host (no session token, its own session) so it survives.
tool=$(basename "$0")
case "$tool $*" in
  "reboot"* | "shutdown "*-r* | "systemctl reboot"*) ;;
  *) echo "$tool: a loopback fleet host fakes only reboots, not: $*" >&2; exit 1 ;;
esac
env -u STACK_FLEET_HOST setsid {python} {script} --dir {root} reboot {name} --down {down} \\
  >>{hostdir}/reboot.log 2>&1 </dev/null &
exit 0
"""
# RHEL's `needs-restarting -r` (dnf-utils), which deploys/facts.sh asks: exit 1 = reboot due
FAKE_NEEDS_RESTARTING = """#!/bin/sh
# A loopback fleet host's `needs-restarting` (tests/fleet.py): a reboot is due while the
# host's marker file exists (a fake reboot removes it). Messages as dnf-utils prints them.
case "$*" in *-r*) ;; *) exit 0 ;; esac
if [ -f {marker} ]; then
  printf '%s\\n' "Core libraries or services have been updated since boot-up:" "  * kernel" "" \\
    "Reboot is required to fully utilize these updates." \\
    "More information: https://access.redhat.com/solutions/27943"
  exit 1
fi
printf '%s\\n' "No core libraries or services have been updated since boot-up." \\
  "Reboot should not be necessary."
"""

# PCI vendor ids per fixture folder; Apple GPUs are not on a PCI bus.
PCI_VENDOR_IDS: dict[str, str] = {
    "nvidia": "0x10de", "amd": "0x1002", "hygon": "0x1d94", "ascend": "0x19e5",
    "moorethreads": "0x1ed5", "iluvatar": "0x1e3e", "cambricon": "0xcabc",
}

# How a recorded output is served: (fixture folder, file-name prefix) ->
# (tool, `case` pattern on the tool's arguments, exit status). First match wins.
# The exit statuses of the error outputs are not recorded in the fixtures: 9 is what
# nvidia-smi returns when it cannot talk to the driver and 18 on a version mismatch
# (NVML_ERROR_LIB_RM_VERSION_MISMATCH); parsers must not depend on them.
RESPONSE_RULES: tuple[tuple[str, str, str, str, int], ...] = (
    ("nvidia", "error_nvml-driver-library-version-mismatch", "nvidia-smi", "*", 18),
    ("nvidia", "error_", "nvidia-smi", "*", 9),
    ("nvidia", "query-gpu", "nvidia-smi", "*--query-gpu=*", 0),
    ("nvidia", "list-L", "nvidia-smi", "*-L*", 0),
    ("nvidia", "query-q-x", "nvidia-smi", "*-q*-x*", 0),
    ("nvidia", "query-q_", "nvidia-smi", "*-q*", 0),
    ("nvidia", "version", "nvidia-smi", "*--version*", 0),
    ("nvidia", "default-table", "nvidia-smi", "", 0),
    ("amd", "rocm-smi", "rocm-smi", "*", 0),
    ("amd", "amd-smi_version", "amd-smi", "version*", 0),
    ("amd", "amd-smi_static_json", "amd-smi", "static*--json*", 0),
    ("amd", "amd-smi_list", "amd-smi", "list*", 0),
    ("amd", "amd-smi_static_text", "amd-smi", "static*", 0),
    ("amd", "amd-smi_monitor", "amd-smi", "monitor*", 0),
    ("amd", "amd-smi_process", "amd-smi", "process*", 0),
    ("amd", "amd-smi_default", "amd-smi", "", 0),
    ("amd", "rocminfo", "rocminfo", "*", 0),
    ("hygon", "rocm-smi", "hy-smi", "*", 0),
    ("hygon", "rocminfo", "rocminfo", "*", 0),
    ("ascend", "npu-smi-info-m", "npu-smi", "info -m*", 0),
    ("ascend", "npu-smi-info-t-usages", "npu-smi", "info -t usages*", 0),
    ("ascend", "npu-smi-info-t-common", "npu-smi", "info -t common*", 0),
    ("ascend", "npu-smi-info-t-board", "npu-smi", "info -t board*", 0),
    ("ascend", "npu-smi-info_", "npu-smi", "info", 0),
    ("moorethreads", "mthreads-gmi", "mthreads-gmi", "*", 0),
    ("apple", "system_profiler", "system_profiler", "SPDisplaysDataType*", 0),
)


def response_rule(fixture: str) -> tuple[str, str, int]:
    """The (tool, argument pattern, exit status) that serves a fixture like `nvidia/x.csv`."""
    folder, _, filename = fixture.partition("/")
    for rule_folder, prefix, tool, pattern, status in RESPONSE_RULES:
        if folder == rule_folder and filename.startswith(prefix):
            return tool, pattern, status
    raise ValueError(f"no fake tool serves the fixture `{fixture}`; add a RESPONSE_RULES row")


@dataclass
class FleetHost:
    """One test host: where it listens and where its files are."""

    name: str
    address: str
    port: int
    dir: str
    token: str  # STACK_FLEET_HOST: marks every process started over this host's SSH
    pid: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def prefix(self) -> Path:
        """The install prefix of this host (`[nodes."NAME"] prefix`)."""
        return self.path / "prefix"

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def sysfs(self) -> Path:
        return self.path / "sysfs"

    @property
    def reboot_marker(self) -> Path:
        """While this file exists the host reports a pending reboot (`require_reboot`)."""
        return self.path / "reboot-required"


def _sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else "")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"],
                       check=False, capture_output=True, env=env)
        if Path("/usr/sbin/sshd").exists():
            return "/usr/sbin/sshd"
    raise RuntimeError("`sshd` is not installed; hint: apt-get install openssh-server")


def _random_address(used: set[str]) -> str:
    """A random address in 127.0.0.0/8 that this process has not used and that binds."""
    rng = random.SystemRandom()
    for _ in range(200):
        address = f"127.{rng.randint(16, 250)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        if address not in used:
            return address
    raise RuntimeError("no free loopback address found")


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


class Fleet:
    """N loopback SSH hosts; a context manager that stops them all on exit."""

    def __init__(
        self,
        n: int = 3,
        *,
        names: Sequence[str] | None = None,
        gpu_tools: Mapping[str, str | Sequence[str]] | None = None,
        pci: Mapping[str, Sequence[str]] | None = None,
        root: str | Path | None = None,
    ) -> None:
        """Plan the fleet (nothing starts before `start()` / `with`).

        names: host names; default: the `gpu_tools` hosts first, then `node-NN` up to n.
        gpu_tools: host -> fixture(s) under tests/facts/fixtures, e.g. `nvidia/<file>`; each
            becomes a fake tool response (see RESPONSE_RULES) and, unless `pci` says
            otherwise, one fake PCI device of that vendor.
        pci: host -> PCI vendor ids (`0x10de`, ...) of its fake accelerators.
        root: folder for the fleet's files; default a new temp folder, removed at stop.
        """
        self.gpu_tools = {k: [v] if isinstance(v, str) else list(v)
                          for k, v in (gpu_tools or {}).items()}
        self.pci = {k: list(v) for k, v in (pci or {}).items()}
        if names is None:
            picked = list(self.gpu_tools)
            k = 1
            while len(picked) < n:
                if f"node-{k:02d}" not in picked:
                    picked.append(f"node-{k:02d}")
                k += 1
            names = picked
        unknown = (set(self.gpu_tools) | set(self.pci)) - set(names)
        if unknown:
            raise ValueError(f"gpu_tools/pci name hosts that are not in the fleet: {unknown}")
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fleet-"))
        self.user = getpass.getuser()
        self.client_key = self.root / "client_key"
        self.known_hosts = self.root / "known_hosts"
        self.hosts: dict[str, FleetHost] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._names = list(names)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create every host's files and start every sshd (in parallel)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.client_key.exists():
            _keygen(self.client_key, "fleet-client")
        used = {h.address for h in self.hosts.values()}
        for name in self._names:
            if name in self.hosts:
                continue
            address = _random_address(used)
            used.add(address)
            host = FleetHost(name=name, address=address, port=_free_port(address),
                             dir=str(self.root / name), token=secrets.token_hex(8))
            self.hosts[name] = host
            self._write_host(host)
        self._write_known_hosts()
        for name in self.hosts:
            self._spawn(name)
        for name in self.hosts:
            self._wait_ready(name)
        self.save()

    def stop(self) -> None:
        """Stop every host and remove the fleet's folder if the fleet made it."""
        for name in list(self.hosts):
            with contextlib.suppress(Exception):
                self.stop_host(name)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def stop_host(self, name: str) -> None:
        """Node failure: SIGKILL the host's sshd and every process started under it."""
        host = self.hosts[name]
        for _ in range(10):
            pids = self._host_pids(host)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        host.pid = None

    def start_host(self, name: str) -> None:
        """Start a stopped host again (same address, port, keys and files)."""
        if name in self._procs and self._procs[name].poll() is None:
            return
        self._spawn(name)
        self._wait_ready(name)
        self.save()

    def is_running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def free_port(self, name: str) -> int:
        """A port that is free on the host's address now (e.g. for `[router] listen`)."""
        return _free_port(self.hosts[name].address)

    def stack_processes(self) -> dict[int, str]:
        """pid -> command line of every process that belongs to what a stack put on the
        hosts: its command line or environment names a host's prefix, or it carries a
        host's session token (started over SSH) and is not an sshd. What `stack destroy`
        must leave nothing of (agents, supervisors, routers, backends)."""
        prefixes = [str(h.prefix).encode() for h in self.hosts.values()]
        markers = [f"STACK_FLEET_HOST={h.token}".encode() for h in self.hosts.values()]
        me = os.getpid()
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            cmdline = _read(entry / "cmdline")
            if not cmdline or cmdline.startswith(b"sshd"):
                continue  # a kernel thread or zombie, or a fleet host's sshd and sessions
            environ = _read(entry / "environ").split(b"\0")
            if any(p in cmdline for p in prefixes) or any(
                    p in v for v in environ for p in prefixes) or any(
                    m in environ for m in markers):
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
        return found

    # -- what tests use ----------------------------------------------------------------

    def inventory_toml(self, *, prefixes: bool = True) -> str:
        """`[hosts."NAME"]` tables for a stack.toml (and `[nodes."NAME"] prefix` tables)."""
        lines: list[str] = []
        for host in self.hosts.values():
            lines += [
                f'[hosts."{host.name}"]',
                f'address = "{host.address}"',
                f"port = {host.port}",
                f'user = "{self.user}"',
                f'key = "{self.client_key}"',
                f'known_hosts = "{self.known_hosts}"',
                "",
            ]
        if prefixes:
            for host in self.hosts.values():
                lines += [f'[nodes."{host.name}"]', f'prefix = "{host.prefix}"', ""]
        return "\n".join(lines)

    def pyinfra_host_data(self, name: str) -> dict[str, Any]:
        """pyinfra @ssh host data for one host (for an Inventory or an inventory file)."""
        host = self.hosts[name]
        return {
            "ssh_hostname": host.address,
            "ssh_port": host.port,
            "ssh_user": self.user,
            "ssh_key": str(self.client_key),
            "ssh_known_hosts_file": str(self.known_hosts),
        }

    def inventory_py(self) -> str:
        """A pyinfra inventory file (`stack.inventory`) listing every host."""
        items = ",\n    ".join(
            f"({name!r}, {self.pyinfra_host_data(name)!r})" for name in self.hosts
        )
        return f"hosts = [\n    {items},\n]\n"

    def ssh(
        self, name: str, command: str, *, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a host with the OpenSSH client (for debugging and checks)."""
        host = self.hosts[name]
        return subprocess.run(
            ["ssh", "-i", str(self.client_key), "-p", str(host.port),
             "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
             f"{self.user}@{host.address}", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def add_tool_response(self, name: str, tool: str, pattern: str, output: bytes | str,
                          status: int = 0, *, order: str = "50") -> None:
        """Add a response to a fake tool of a host (pattern: `case` glob on its arguments)."""
        host = self.hosts.get(name)
        hostdir = host.path if host else self.root / name
        data = hostdir / "tool-data" / tool
        data.mkdir(parents=True, exist_ok=True)
        base = data / f"{order}-{len(list(data.glob('*.args'))):03d}"
        base.with_suffix(".args").write_text(pattern)
        out = output.encode() if isinstance(output, str) else output
        base.with_suffix(".out").write_bytes(out)
        if status:
            base.with_suffix(".rc").write_text(str(status))
        tool_path = hostdir / "bin" / tool
        tool_path.parent.mkdir(parents=True, exist_ok=True)
        if not tool_path.exists():
            shutil.copy(FAKE_TOOL, tool_path)
            tool_path.chmod(0o755)

    def require_reboot(self, name: str) -> None:
        """Make the host report `reboot_required` (through a fake `needs-restarting`, which
        deploys/facts.sh asks) until it is rebooted."""
        host = self.hosts[name]
        host.reboot_marker.write_text("kernel\n")
        self._write_script(host.bin / "needs-restarting",
                           FAKE_NEEDS_RESTARTING.format(marker=shlex.quote(str(host.reboot_marker))))

    def install_reboot(self, name: str, down_seconds: float = 2.0) -> None:
        """Give the host a fake `reboot` (also `shutdown -r` and `systemctl reboot`): the host
        goes down (sshd and every process started over its SSH are killed, like
        `stop_host`), stays down `down_seconds`, and comes back (like `start_host`) with its
        pending reboot cleared. Needs the fleet's state file (written by `start`)."""
        host = self.hosts[name]
        q = shlex.quote
        script = FAKE_REBOOT.format(python=q(sys.executable), script=q(str(Path(__file__))),
                                    root=q(str(self.root)), name=q(name), down=down_seconds,
                                    hostdir=q(str(host.path)))
        for tool in REBOOT_TOOLS:
            self._write_script(host.bin / tool, script)

    def reboot_host(self, name: str, down_seconds: float = 2.0) -> None:
        """What a fake reboot does: log `down`, stop the host, wait, clear its pending
        reboot, start it, log `up`."""
        host = self.hosts[name]
        self._log_reboot(host, "down")
        self.stop_host(name)
        time.sleep(down_seconds)
        host.reboot_marker.unlink(missing_ok=True)
        self.start_host(name)
        self._log_reboot(host, "up")

    def reboots(self, name: str) -> list[tuple[str, float]]:
        """The host's fake reboots so far: (`down` or `up`, time.time()) in order."""
        text = _read(self.hosts[name].path / "reboots.log").decode()
        return [(event, float(when)) for event, when in
                (line.split() for line in text.splitlines() if line.strip())]

    @staticmethod
    def _log_reboot(host: FleetHost, event: str) -> None:
        with open(host.path / "reboots.log", "a") as log:
            log.write(f"{event} {time.time():.6f}\n")

    @staticmethod
    def _write_script(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)

    # -- state file (scripts/fleet) ------------------------------------------------------

    def save(self) -> None:
        state = {"user": self.user, "hosts": [asdict(h) for h in self.hosts.values()]}
        (self.root / "fleet.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, root: str | Path) -> Fleet:
        """The fleet whose files are in `root` (as written by `scripts/fleet up`)."""
        state = json.loads((Path(root) / "fleet.json").read_text())
        fleet = cls(0, names=[h["name"] for h in state["hosts"]], root=root)
        fleet._own_root = False
        for item in state["hosts"]:
            fleet.hosts[item["name"]] = FleetHost(**item)
        return fleet

    # -- internals -----------------------------------------------------------------------

    def _write_host(self, host: FleetHost) -> None:
        for sub in ("bin", "home", "prefix", "sysfs/bus/pci/devices", "sysfs/module",
                    "tool-data"):
            (host.path / sub).mkdir(parents=True, exist_ok=True)
        _keygen(host.path / "host_key", f"fleet-{host.name}")
        # this machine's pip configuration (its package indexes and wheel folders, e.g. a
        # local wheel of a PyTorch index the machine cannot reach): what pip on a host of
        # its own would be configured with
        pip_conf = Path.home() / ".config" / "pip" / "pip.conf"
        if pip_conf.is_file():
            (host.path / "home" / ".config" / "pip").mkdir(parents=True, exist_ok=True)
            shutil.copy(pip_conf, host.path / "home" / ".config" / "pip" / "pip.conf")
        shutil.copy(self.client_key.with_suffix(".pub"), host.path / "authorized_keys")
        (host.path / "authorized_keys").chmod(0o600)
        env = {
            "PATH": f"{host.bin}:{SYSTEM_PATH}",
            "HOME": str(host.path / "home"),
            "STACK_TEST_HOST": host.name,
            "STACK_SYSFS_ROOT": str(host.sysfs),
            "STACK_FLEET_HOST": host.token,
        }
        config = [
            f"ListenAddress {host.address}:{host.port}",
            f"HostKey {host.path / 'host_key'}",
            f"AuthorizedKeysFile {host.path / 'authorized_keys'}",
            f"PidFile {host.path / 'sshd.pid'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxStartups 200",
            "MaxSessions 100",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
        ]
        (host.path / "sshd_config").write_text("\n".join(config) + "\n")
        fixtures = self.gpu_tools.get(host.name, [])
        for fixture in fixtures:
            tool, pattern, status = response_rule(fixture)
            self.add_tool_response(host.name, tool, pattern, (FIXTURES / fixture).read_bytes(),
                                   status)
        vendor_ids = self.pci.get(host.name)
        if vendor_ids is None:
            folders = dict.fromkeys(f.partition("/")[0] for f in fixtures)
            vendor_ids = [PCI_VENDOR_IDS[f] for f in folders if f in PCI_VENDOR_IDS]
        for k, vendor_id in enumerate(vendor_ids):
            device = host.sysfs / "bus" / "pci" / "devices" / f"0000:{k + 1:02x}:00.0"
            device.mkdir(parents=True, exist_ok=True)
            (device / "vendor").write_text(vendor_id + "\n")
            # 0x0302xx: 3D controller (what datacenter GPUs report); NPUs use 0x12
            pci_class = "0x120000" if vendor_id == PCI_VENDOR_IDS["ascend"] else "0x030200"
            (device / "class").write_text(pci_class + "\n")

    def _write_known_hosts(self) -> None:
        lines = []
        for host in self.hosts.values():
            public = (host.path / "host_key.pub").read_text().split()
            lines.append(f"[{host.address}]:{host.port} {public[0]} {public[1]}\n")
        self.known_hosts.write_text("".join(lines))

    def _spawn(self, name: str) -> None:
        host = self.hosts[name]
        if os.geteuid() == 0:
            # sshd's privilege separation folder (normally made by its service unit)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(host.path / "sshd.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [_sshd_binary(), "-D", "-e", "-f", str(host.path / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        self._procs[name] = proc
        host.pid = proc.pid

    def _wait_ready(self, name: str, timeout: float = 15.0) -> None:
        host = self.hosts[name]
        proc = self._procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with contextlib.suppress(OSError), \
                    socket.create_connection((host.address, host.port), timeout=1) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        log = _read(host.path / "sshd.log").decode(errors="replace")[-2000:]
        raise RuntimeError(f"sshd of fleet host `{name}` did not start; its log:\n{log}")

    def _host_pids(self, host: FleetHost) -> set[int]:
        """The host's sshd, its descendants, and any process marked with its token."""
        marker = f"STACK_FLEET_HOST={host.token}".encode()
        config = str(host.path / "sshd_config").encode()
        me = os.getpid()
        children: dict[int, list[int]] = {}
        found: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid == me:
                continue
            fields = _read(entry / "stat").rsplit(b")", 1)[-1].split()
            if len(fields) < 2 or fields[0] == b"Z":  # gone, or a zombie: nothing to kill
                continue
            children.setdefault(int(fields[1]), []).append(pid)
            if marker in _read(entry / "environ").split(b"\0") or config in _read(
                entry / "cmdline"
            ):
                found.add(pid)
        proc = self._procs.get(host.name)
        if proc is not None and proc.poll() is None:
            found.add(proc.pid)
        elif host.pid is not None and Path(f"/proc/{host.pid}").exists() and config in _read(
            Path(f"/proc/{host.pid}/cmdline")
        ):
            found.add(host.pid)
        stack = list(found)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in found and child != me:
                    found.add(child)
                    stack.append(child)
        return found


@contextlib.contextmanager
def stack_session(fleet: Fleet, work: Path, secret: str) -> Iterator[None]:
    """`STACK_SECRET` set for the `stack` runs inside; on the way out the stack in `work` is
    destroyed, the fleet stopped and `work` removed (the teardown of the fleet tests)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STACK_SECRET", secret)
        try:
            yield
        finally:
            run_stack("destroy", "--auto-approve", cwd=work, timeout=120)
            fleet.stop()
            shutil.rmtree(work, ignore_errors=True)


def run_stack(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The `stack` CLI of this checkout, run in `cwd` (plain output, wide lines)."""
    return subprocess.run([str(STACK_CLI), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def system_runtimes(folder: Path, llama_bin: Path, versions: Iterable[str]) -> Path:
    """`folder/VERSION` -> the `llama_bin` build, one link per version: the folders of a
    `source = "system"` llama.cpp runtime (`path = "FOLDER/{version}"`), cheap to install."""
    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        (folder / version).symlink_to(llama_bin, target_is_directory=True)
    return folder


def router_endpoint(fleet: Fleet, node: str) -> tuple[str, str]:
    """A free `[router] listen` address on `node` and the OpenAI base URL there."""
    address = fleet.hosts[node].address
    port = fleet.free_port(node)
    return f"{address}:{port}", f"http://{address}:{port}/v1"


def llama_sdist(cache: Path) -> Path:
    """The llama-cpp-python sdist (a `build` runtime's archive), fetched once into `cache`
    like scripts/setup-llama-cpp does, so apply reuses that script's build of it."""
    folder = cache / "sdist"
    path = folder / f"llama_cpp_python-{LLAMA_SDIST_VERSION}.tar.gz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "-d", str(folder),
                        f"llama-cpp-python=={LLAMA_SDIST_VERSION}"], check=True, timeout=600)
    return path


def llama_runtime_toml(sdist: Path) -> str:
    """The `[runtimes."llama.cpp"]` table that builds `sdist` with the arguments of
    scripts/setup-llama-cpp (so apply uploads that cached build instead of compiling)."""
    return f'''[runtimes."llama.cpp"]
source = "build"
versions = ["{LLAMA_SDIST_VERSION}"]
url = "local://{sdist}"
subdir = "vendor/llama.cpp"
cmake_args = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DGGML_RPC=ON"]
targets = ["llama-server", "ggml-rpc-server"]
'''


def cpu_stack_toml(fleet: Fleet, name: str, models: str, key_hash: str,
                   router: str | None = None) -> tuple[str, str]:
    """A stack.toml named `name` serving the `models` tables on the hosts' CPUs, one test
    key, a router on `router` (default: the first host); and the router's OpenAI base
    URL."""
    router = router or next(iter(fleet.hosts))
    address = fleet.hosts[router].address
    port = fleet.free_port(router)
    low = random.randint(41000, 59000)
    text = f'''[stack]
name = "{name}"
port_range = [{low}, {low + 40}]

{fleet.inventory_toml()}
[nodes."*"]
cpu_inference = true

{models}
[router]
hosts = ["{router}"]
listen = "{address}:{port}"

[[keys]]
name = "test"
hash = "{key_hash}"
'''
    return text, f"http://{address}:{port}/v1"


def gemma_stack_toml(fleet: Fleet, name: str, model: Path, sdist: Path | None, key_hash: str,
                     router: str | None = None) -> tuple[str, str]:
    """`cpu_stack_toml` serving `model` (the test GGUF) on llama.cpp (one replica, CPU);
    with `sdist`, llama.cpp is built from it (`llama_runtime_toml`), without, the runtime
    catalogue's recipe serves it (no `[runtimes]` table)."""
    models = f'''{llama_runtime_toml(sdist) if sdist else ""}
[models.gemma]
source = "local://{model}"
backend = "llama.cpp"
context = 1024
args = ["-t", "1"]
'''
    return cpu_stack_toml(fleet, name, models, key_hash, router)


@contextlib.contextmanager
def one_host_stack(work: Path, name: str, models: str) -> Iterator[dict[str, Any]]:
    """A started one-host loopback fleet under `work` with `cpu_stack_toml(models)` in
    `work/stack.toml`, inside `stack_session`: yields `fleet`, `dir`, `key` (the test key)
    and `url` (the router's OpenAI base URL); destroyed and stopped on the way out."""
    from stack.secrets import generate_key, hash_key

    fleet = Fleet(1, root=work / "fleet")
    fleet.start()
    key = generate_key()
    text, url = cpu_stack_toml(fleet, name, models, hash_key(key))
    (work / "stack.toml").write_text(text)
    with stack_session(fleet, work, f"{name}-secret-0123456789abcdef"):
        yield {"fleet": fleet, "dir": work, "key": key, "url": url}


@pytest.fixture
def make_fleet() -> Iterator[Any]:
    """A factory `make_fleet(n=..., gpu_tools=...) -> Fleet` (started); all stop at teardown."""
    fleets: list[Fleet] = []

    def factory(n: int = 3, **kwargs: Any) -> Fleet:
        fleet = Fleet(n, **kwargs)
        fleets.append(fleet)
        fleet.__enter__()
        return fleet

    yield factory
    for fleet in fleets:
        fleet.stop()


def main(argv: list[str] | None = None) -> int:
    """`scripts/fleet up N [--gpu NAME=FIXTURE ...]`, `scripts/fleet down` (and `reboot
    NAME`, run by a host's fake `reboot`)."""
    parser = argparse.ArgumentParser(prog="scripts/fleet", description=main.__doc__)
    parser.add_argument("--dir", default=os.environ.get("STACK_FLEET_DIR", "/tmp/modelstack-fleet"),
                        help="folder for the fleet's files (default: /tmp/modelstack-fleet)")
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start N hosts and print their stack.toml tables")
    up.add_argument("n", type=int)
    up.add_argument("--gpu", action="append", default=[], metavar="NAME=FIXTURE",
                    help="give host NAME a fake vendor tool, e.g. gpu-01=nvidia/<file>")
    sub.add_parser("down", help="stop every host and remove the folder")
    sub.add_parser("toml", help="print the stack.toml tables of the running fleet")
    reboot = sub.add_parser("reboot", help="reboot one host (what its fake `reboot` runs)")
    reboot.add_argument("name")
    reboot.add_argument("--down", type=float, default=2.0, metavar="SECONDS",
                        help="how long the host stays down (default 2)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if args.action == "up":
        if (root / "fleet.json").exists():
            print(f"error: a fleet is already up in `{root}`\nhint: run `scripts/fleet down` "
                  "first", file=sys.stderr)
            return 1
        gpu: dict[str, list[str]] = {}
        for item in args.gpu:
            name, _, fixture = item.partition("=")
            gpu.setdefault(name, []).append(fixture)
        fleet = Fleet(args.n, gpu_tools=gpu, root=root)
        fleet.start()
        print(fleet.inventory_toml())
        return 0
    if not (root / "fleet.json").exists():
        print(f"error: no fleet is up in `{root}`", file=sys.stderr)
        return 1 if args.action == "toml" else 0
    fleet = Fleet.load(root)
    if args.action == "toml":
        print(fleet.inventory_toml())
        return 0
    if args.action == "reboot":
        fleet.reboot_host(args.name, args.down)
        return 0
    for name in fleet.hosts:
        fleet.stop_host(name)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
