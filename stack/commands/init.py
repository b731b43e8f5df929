"""Write a commented starter `stack.toml` and `inventories/` (this machine, and an
example fleet) into DIR (default: the current folder). Existing files are never
overwritten. The starter validates as written: edit it, then `stack plan`.
"""

from __future__ import annotations

import argparse
import re
from importlib import resources
from pathlib import Path

import jinja2

from stack.errors import ConfigError

HELP = "write a starter stack.toml and inventories/"

# file written -> template in stack/templates_init
FILES = {
    Path("stack.toml"): "stack.toml.j2",
    Path("inventories") / "local.py": "inventory-local.py.j2",
    Path("inventories") / "example.py": "inventory-example.py.j2",
    Path(".gitignore"): "gitignore.j2",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=".", help="folder to write into (default: .)")


def starter_files(name: str) -> dict[Path, str]:
    """The starter files and their text, for a stack called `name`."""
    env = jinja2.Environment(keep_trailing_newline=True, autoescape=False,
                             undefined=jinja2.StrictUndefined)
    folder = resources.files("stack.templates_init")
    return {path: env.from_string(folder.joinpath(template).read_text()).render(name=name)
            for path, template in FILES.items()}


def stack_name(folder: Path) -> str:
    """A valid stack name from a folder name (`My Lab` -> `my-lab`)."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", folder.resolve().name.lower()).strip("-._")
    return name or "stack"


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    existing = [str(folder / path) for path in FILES if (folder / path).exists()]
    if existing:
        raise ConfigError(f"`{existing[0]}` already exists; `stack init` never overwrites",
                          hint="run it in an empty folder, or move the existing files away.")
    for path, text in starter_files(stack_name(folder)).items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    print("next: put the model file at models/gemma-3-270m-q4_k_m.gguf (or change "
          "`source`), then `stack validate` and `stack plan`.")
    return 0
