"""List the runtime catalogue (a recipe per backend and accelerator) with the versions
this stack.toml pins, and, from a facts snapshot or the hosts, what each node would get:
the runtime folder per backend the stack's models use, chosen by the node's devices.

A model that names a backend needs no `[runtimes]` table: the catalogue installs the
backend's default version, built or installed for each node's accelerator in its own
folder, `PREFIX/runtimes/NAME/VERSION-VARIANT`. Examples:

  stack runtimes
  stack runtimes --facts facts.json
  stack runtimes --hosts --json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stack.catalog import (
    Entry,
    Recipe,
    catalogue,
    default_version,
    from_catalogue,
    recipe,
)
from stack.snapshot import NodeFacts, Observed
from stack.spec import StackSpec

HELP = "list the runtime catalogue and the runtime each node would get"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stack import hostkeys

    parser.add_argument("--facts", metavar="F", help="show what each node of this facts "
                        "snapshot (`stack facts --out F`) would get")
    parser.add_argument("--hosts", action="store_true",
                        help="read the hosts over SSH and show what each would get")
    parser.add_argument("--json", action="store_true", help="print JSON")
    hostkeys.add_trust_flag(parser)


def _how(entry: Entry, variant: str) -> str:
    """One line saying how a variant installs."""
    v = entry.variants[variant]
    if entry.source == "pip":
        package = v.package or entry.package or ""
        more = [*entry.requirements, *v.requirements]
        index = v.extra_index_url or entry.extra_index_url
        return (f"pip {package}" + (f" + {', '.join(more)}" if more else "")
                + (f" from {index}" if index else "")).replace("{version}", "VERSION")
    if entry.source == "build":
        flags = " ".join(v.cmake_args) or "no extra flags"
        return f"cmake build of {(entry.package or entry.url or '').split('==')[0]}: {flags}"
    return f"{entry.source} {entry.path or entry.url or ''}".replace("{version}", "VERSION")


def catalogue_rows(spec: StackSpec) -> list[dict[str, Any]]:
    """Per catalogue runtime and variant: the vendors this stack gives it, those that may
    take it by `[runtimes.NAME] variant`, the version this stack installs, how."""
    rows = []
    for name, entry in catalogue().items():
        table = spec.runtimes.get(name)
        for variant, v in entry.variants.items():
            if table is not None and table.source is not None:
                versions = "replaced by [runtimes] in stack.toml"
            elif table is not None:
                versions = ", ".join(table.versions) + " (pinned in stack.toml)"
            else:
                versions = (v.default or entry.default) + " (default)"
            # `[runtimes.NAME] variant` moves a vendor from its default to another
            picked = dict(table.variant) if table is not None and table.source is None \
                else {}
            uses = [x for x in v.vendors if picked.get(x, variant) == variant]
            uses += [x for x, c in picked.items() if c == variant and x not in uses]
            rows.append({"runtime": name, "variant": variant, "vendors": uses,
                         "chosen_by": [x for x in v.chosen_by if x not in uses],
                         "versions": versions, "how": _how(entry, variant)})
    return rows


def _backends(spec: StackSpec) -> list[str]:
    """The runtimes the stack's models name (every catalogue runtime when none does)."""
    named: list[str] = sorted({m.backend for m in spec.models.values() if m.backend and
                               m.backend != "custom"})
    return named or list(catalogue())


def _devices(spec: StackSpec, name: str, facts: NodeFacts) -> list[str]:
    from stack.nodes import node_settings

    vendors: list[str] = sorted({g.vendor for g in facts.gpus})
    if node_settings(spec, name).cpu_inference or not vendors:
        vendors.append("cpu")
    return vendors


def node_rows(spec: StackSpec, observed: Observed) -> list[dict[str, Any]]:
    """Per reachable node and kind of device it has: the folder each runtime would use."""
    rows = []
    for name, facts in sorted(observed.nodes.items()):
        if not facts.reachable:
            rows.append({"node": name, "devices": "unreachable", "runtimes": {}})
            continue
        for vendor in _devices(spec, name, facts):
            got: dict[str, str] = {}
            for backend in _backends(spec):
                table = spec.runtimes.get(backend)
                version = table.versions[-1] if table else default_version(backend, vendor)
                if version is None:
                    got[backend] = f"no [runtimes] entry for `{backend}`"
                    continue
                found = recipe(spec, backend, version, vendor)
                got[backend] = found.folder if isinstance(found, Recipe) else found
            rows.append({"node": name, "devices": vendor, "runtimes": got})
    return rows


def run(args: argparse.Namespace) -> int:
    from stack import hostkeys
    from stack.config import load
    from stack.pipeline import gather_facts, read_facts

    path = Path(args.file)
    spec = load(path)
    observed: Observed | None = None
    if args.facts:
        observed = read_facts(Path(args.facts))
    elif args.hosts:
        observed = gather_facts(spec, path.resolve().parent,
                                trust_new=hostkeys.trust_new(args, os.environ))
    rows = catalogue_rows(spec)
    nodes = node_rows(spec, observed) if observed is not None else None
    own = {n: "own recipe" if not from_catalogue(spec, n) else "catalogue"
           for n in spec.runtimes}
    if args.json:
        print(json.dumps({"catalogue": rows, "stack_runtimes": own,
                          **({"nodes": nodes} if nodes is not None else {})}, indent=2))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    table = Table("runtime", "variant", "vendors", "versions", "how it installs",
                  title="Runtime catalogue", title_justify="left")
    for row in rows:
        vendors = ", ".join(row["vendors"])
        if row["chosen_by"]:
            vendors += ("; " if vendors else "") + "by `variant`: " + ", ".join(row["chosen_by"])
        table.add_row(row["runtime"], row["variant"], vendors,
                      row["versions"], row["how"])
    console.print(table)
    if nodes is not None:
        backends = _backends(spec)
        per_node = Table("node", "devices", *backends, title="What each node would get "
                         "(folders under PREFIX/runtimes/NAME/)", title_justify="left")
        for row in nodes:
            per_node.add_row(row["node"], row["devices"],
                             *(row["runtimes"].get(b, "") for b in backends))
        console.print(per_node)
    return 0
