"""Facts from N loopback hosts vs from one host (target: 16 hosts take at most 2x one).

    .venv/bin/python bench/facts_bench.py [--hosts 16] [--runs 7] [--no-breakdown]

Starts a loopback fleet (tests/fleet.py: real sshd per host, half of them with a fake
nvidia-smi printing a recorded H100 output), then alternates `stack.observe.gather` over
one host and over all hosts, each from fresh SSH connections and after the previous run's
sessions have ended, and prints the medians and their ratio. gevent is patched first thing,
as the `stack` CLI does. Each run is done twice, alternately: with stack's SSH sockets
(stack.sshtcp: no Nagle, immediate ACKs; what `stack` uses) and with paramiko's default
Transport (the baseline: what pyinfra alone does), so both see the same load.

It also measures where the CPU goes, per host: the controller (this process: paramiko,
pyinfra, parsing) and the host side (sshd, the login shell, the facts script; read from each
fleet sshd's reaped-children CPU time), split into connecting only, a session running
`true`, and the facts script. On a loopback fleet every host's share runs on this machine's
cores, so the N-host time cannot drop below (N x CPU per host) / cores; the report prints
that bound next to the measurement.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fleet import Fleet  # noqa: E402
from paramiko import Transport  # noqa: E402
from pyinfra.context import ctx_host, ctx_state  # noqa: E402

from deploys.facts import facts_command  # noqa: E402
from stack import sshtcp  # noqa: E402
from stack.config import load_text  # noqa: E402
from stack.observe import connect, disconnect, gather  # noqa: E402
from stack.spec import StackSpec  # noqa: E402

H100 = "nvidia/query-gpu-allfields_csv_h100-80gb-hbm3_590.48.01_linux.csv"
TICK = os.sysconf("SC_CLK_TCK")


def _controller_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _host_cpu(fleet: Fleet) -> float:
    """CPU seconds of every fleet sshd and the sessions it has reaped (shell, script, tools)."""
    total = 0
    for host in fleet.hosts.values():
        fields = Path(f"/proc/{host.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def _settle(fleet: Fleet, timeout: float = 5.0) -> None:
    """Wait until no SSH session of the fleet is left (the last run's sshd children exit)."""
    listeners = {h.pid for h in fleet.hosts.values()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in listeners:
                    busy = True
                    break
        if not busy:
            break
        time.sleep(0.05)
    time.sleep(0.2)


def _timed(spec: StackSpec, fleet: Fleet, hosts: list[str] | None) -> tuple[float, float, float]:
    """(wall s, controller CPU s, host CPU s) of one gather."""
    _settle(fleet)
    c0, h0 = _controller_cpu(), _host_cpu(fleet)
    start = time.perf_counter()
    observed = gather(spec, fleet.root, hosts=hosts)
    elapsed = time.perf_counter() - start
    c1 = _controller_cpu()
    _settle(fleet)
    bad = [n for n, node in observed.nodes.items() if not node.reachable]
    assert not bad, f"unreachable: {bad}: {observed.nodes[bad[0]].error}"
    return elapsed, c1 - c0, _host_cpu(fleet) - h0


def _stage(spec: StackSpec, fleet: Fleet, command: str | None) -> tuple[float, float]:
    """(controller, host) CPU s per host to connect to all hosts and run `command` on each."""
    _settle(fleet)
    c0, h0 = _controller_cpu(), _host_cpu(fleet)
    connected = connect(spec, fleet.root)

    def run(node: str) -> None:
        host = connected.nodes[node]
        text = facts_command(str(fleet.hosts[node].prefix)) if command == "facts" else command
        with ctx_state.use(connected.state), ctx_host.use(host):
            ok, output = host.run_shell_command(text, print_output=False, print_input=False)
        assert ok, output.stderr

    if command:
        gevent.joinall([gevent.spawn(run, node) for node in connected.nodes], raise_error=True)
    c1 = _controller_cpu()
    disconnect(connected)
    _settle(fleet)
    n = len(fleet.hosts)
    return (c1 - c0) / n, (_host_cpu(fleet) - h0) / n


def _breakdown(spec: StackSpec, fleet: Fleet, runs: int) -> None:
    print("CPU per host (medians over all hosts; host = sshd + shell + script + tools):")
    previous = (0.0, 0.0)
    for label, command in (("connect (SSH handshake, auth)", None),
                           ("+ one session running `true`", "true"),
                           ("+ the facts script instead", "facts")):
        samples = [_stage(spec, fleet, command) for _ in range(runs)]
        ctl = statistics.median(s[0] for s in samples)
        host = statistics.median(s[1] for s in samples)
        print(f"  {label:32s} controller {ctl * 1000:5.1f} ms  host {host * 1000:5.1f} ms"
              f"   (step: controller {(ctl - previous[0]) * 1000:+5.1f} ms, "
              f"host {(host - previous[1]) * 1000:+5.1f} ms)")
        previous = (ctl, host)


TRANSPORTS = {"stack": sshtcp.transport, "paramiko default": Transport}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-breakdown", action="store_true",
                        help="only the side-by-side timing, not the CPU split per stage")
    args = parser.parse_args()
    gpu = {f"gpu-{k:02d}": H100 for k in range(1, args.hosts // 2 + 1)}
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    ours = sshtcp.transport
    results: dict[str, tuple[list[tuple[float, float, float]], ...]] = {
        name: ([], []) for name in TRANSPORTS}
    with Fleet(n=args.hosts, gpu_tools=gpu) as fleet:
        spec = load_text(fleet.inventory_toml())
        first = next(iter(fleet.hosts))
        _timed(spec, fleet, [first])  # warm up imports and caches
        _timed(spec, fleet, None)
        for _ in range(args.runs):
            for name, factory in TRANSPORTS.items():  # alternated: same load for both
                sshtcp.transport = factory  # what stack.observe hands to paramiko
                results[name][0].append(_timed(spec, fleet, [first]))
                results[name][1].append(_timed(spec, fleet, None))
        sshtcp.transport = ours
        load_after = os.getloadavg()
        print(f"machine: {platform.machine()}, {cores} cores, {platform.system()} "
              f"{platform.release()}, python {platform.python_version()}")
        print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
              "(other processes share the cores)")
        ratio = 0.0
        for name, (one, many) in results.items():
            m1 = statistics.median(r[0] for r in one)
            mn = statistics.median(r[0] for r in many)
            ctl = statistics.median(r[1] for r in many) / args.hosts
            host = statistics.median(r[2] for r in many) / args.hosts
            bound = args.hosts * (ctl + host) / cores
            print(f"[{name} transport]")
            print(f"  1 host:  median {m1:.3f} s  runs {[round(r[0], 3) for r in one]}")
            print(f"  {args.hosts} hosts: median {mn:.3f} s  runs "
                  f"{[round(r[0], 3) for r in many]}")
            print(f"  ratio {args.hosts} hosts / 1 host: {mn / m1:.2f} (target <= 2.0)")
            print(f"  CPU per host: controller {ctl * 1000:.1f} ms, host side "
                  f"{host * 1000:.1f} ms; {args.hosts} hosts on {cores} cores: "
                  f">= {bound:.3f} s, i.e. >= {bound / m1:.2f}x the 1-host time")
            ratio = ratio or mn / m1
        if not args.no_breakdown:
            _breakdown(spec, fleet, max(3, args.runs // 2))
    return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
