"""The manifest (`state/managed`): what this apply put in place on each host, written last."""

from __future__ import annotations

from deploys.steps import sha256_text
from stack import remote
from stack.apply.hosts import Node
from stack.apply.report import HostReport
from stack.errors import StackError
from stack.hostfiles import MANIFEST, HostFile, manifest_text
from stack.plan import Plan


def write_manifests(plan: Plan, nodes: list[Node], reports: dict[str, HostReport]) -> None:
    """Record on each host what this apply put in place (`state/managed`): the plan's
    fingerprint and the sha256 of the bytes written, for each file it wrote or found up to
    date; a file it did not get to (the host failed first) keeps its old line, or gets
    none, so the next plan shows it again."""
    for node in nodes:
        managed = node.facts.managed or {}
        lines: list[HostFile] = []
        written: dict[str, str] = {}
        for f in plan.files.get(node.name, ()):
            if f.path in node.written or (f.kind == "upload" and node.deployed):
                lines.append(f)
                written[f.path] = node.written.get(f.path, f.fingerprint)
            elif f.path in managed:
                old = managed[f.path]
                lines.append(HostFile(f.address, f.path, old.fingerprint, old.kind))
                written[f.path] = old.written
        text = manifest_text(lines, written)
        path = f"{node.prefix}/{MANIFEST}"
        if node.probed.files.get(path) == sha256_text(text.encode()):
            continue
        try:
            remote.write(node.host, path, text.encode(), "600")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
