"""The agent bundle before and after per-target wheelhouses: tarball size and install time.

Builds the bundle of a baseline commit (default: the parent of the commit that made the
bundle per target, in a `git worktree`, with its own `stack.wheelhouse.agent_bundle()`)
and this checkout's bundle for the same target (the controller's: CPython minor version,
arch, glibc; named in its version), then installs each the way apply does on a host: the
`agent-install` step's script of that tree (`deploys.steps.agent_install_step`), run with
`sh` in a fresh prefix on this machine with `python3` from PATH (the loopback fleet's
hosts run the same script over SSH; the upload over loopback is left out). Rounds
alternate old and new; medians. Bundles come from the cache
(`~/.cache/modelstack/wheelhouse`): building them is not timed.

    PATH=/usr/bin:$PATH .venv/bin/python bench/bundle_bench.py --rounds 5

Both bundles are for the controller's own target (the only one the baseline can build),
so `python3` on PATH must be of the controller's minor version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "e3388b6^"  # the commit before the per-target bundle
TARGET_RATIO = 1 / 3

# run in a tree (PYTHONPATH): its bundle for the controller and its install script
BUILD = """
import json, sys
from stack.wheelhouse import agent_bundle
kwargs = {}
if sys.argv[1] != "old":
    from stack.bundle_target import BundleTarget
    from stack.wheelhouse import controller_target
    here = controller_target()
    kwargs["target"] = BundleTarget(sys.argv[1] or here.python, here.os, here.arch, here.libc)
bundle = agent_bundle(**kwargs)
print(json.dumps({"tarball": str(bundle.tarball), "version": bundle.version,
                  "wheel": bundle.wheel_name}))
"""
SCRIPT = """
import json, sys
from pathlib import Path
from deploys.probe import HostState
from deploys.services import Service
from deploys.steps import HostTarget, agent_install_step
from stack.snapshot import NodeFacts
info, prefix = json.loads(sys.argv[1]), sys.argv[2]
target = HostTarget(
    node="bench", prefix=prefix, facts=NodeFacts(), probed=HostState(), drivers=[],
    runtimes=[], runtime_uploads={}, bundle=Path(info["tarball"]),
    bundle_version=info["version"], wheel_name=info["wheel"], agent_toml="",
    agent_token="", models=[], agent_service=Service("agent", "s", prefix, ("a",)),
    router_service=None)
print(json.dumps(agent_install_step(target).commands))
"""


def in_tree(tree: Path, code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, check=True,
                          env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def install_seconds(tree: Path, info: dict[str, str], work: Path) -> float:
    """One install of the bundle into a fresh prefix, as that tree's apply runs it."""
    prefix = work / "prefix"
    shutil.rmtree(prefix, ignore_errors=True)
    commands = json.loads(in_tree(tree, SCRIPT, json.dumps(info), str(prefix)))
    (prefix / "agent").mkdir(parents=True)
    shutil.copy(info["tarball"], prefix / "agent" / Path(info["tarball"]).name)
    start = time.perf_counter()
    for command in commands:
        subprocess.run(["sh", "-c", command], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    agent = prefix / "agent" / "venv" / "bin" / "stack-agent"
    assert agent.exists(), "the install left no stack-agent"
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit before (git rev)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bundle-bench-"))
    old_tree = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach",
                    str(old_tree), args.baseline], check=True)
    try:
        old = json.loads(in_tree(old_tree, BUILD, "old"))
        new = json.loads(in_tree(ROOT, BUILD, ""))
        sizes = {name: Path(b["tarball"]).stat().st_size for name, b in
                 (("before", old), ("after", new))}
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            times["before"].append(install_seconds(old_tree, old, work))
            times["after"].append(install_seconds(ROOT, new, work))
        print(f"baseline {args.baseline}: {old['version']}; after: {new['version']}")
        print(f"{'':8} {'tarball':>12} {'extracted':>12} {'wheels':>7} "
              f"{'install (median)':>17}")
        for name, bundle in (("before", old), ("after", new)):
            listing = [line.split() for line in subprocess.run(
                ["tar", "-tvf", bundle["tarball"]], check=True, capture_output=True,
                text=True).stdout.splitlines()]
            wheels = sum(1 for row in listing if row[-1].endswith(".whl"))
            extracted = sum(int(row[2]) for row in listing)
            median = (f"{statistics.median(times[name]):.1f} s" if times[name] else "-")
            print(f"{name:8} {sizes[name] / 1e6:9.1f} MB {extracted / 1e6:9.1f} MB "
                  f"{wheels:7} {median:>17}")
        ratio = sizes["after"] / sizes["before"]
        print(f"size after/before: {ratio:.3f} (target <= {TARGET_RATIO:.3f}: "
              f"{'met' if ratio <= TARGET_RATIO else 'not met'})")
        if times["after"]:
            print(f"install after/before: "
                  f"{statistics.median(times['after']) / statistics.median(times['before']):.3f}"
                  f" (rounds: before {[round(t, 1) for t in times['before']]}, "
                  f"after {[round(t, 1) for t in times['after']]})")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(old_tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
