"""Check stack.toml without touching the fleet: TOML syntax, the schema, and the
references between sections (pins, aliases, keys, the router's listen address).

Every problem is printed, first in the file first, each with a `hint:`; the exit code
is 1 when there is any, else 0 with a one-line summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stack.config import check_text, read_text

HELP = "check stack.toml and report every problem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options besides `-f/--file`."""


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    spec, problems = check_text(read_text(path), path.name, base_dir=path.parent)
    if problems:
        for problem in problems:
            print(problem.render(), file=sys.stderr)
        return 1
    assert spec is not None
    hosts = (f"hosts from `{spec.stack.inventory}`" if spec.stack.inventory
             else _count(len(spec.hosts), "host"))
    print(f"{path.name} is valid: {_count(len(spec.models), 'model')}, {hosts}")
    return 0
