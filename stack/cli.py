"""The `stack` command: parses arguments and hands each subcommand to its module.

Each module in `stack.commands` defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Errors from the `StackError` tree become `error:` + `hint:` and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# command name -> module in stack.commands
COMMANDS: dict[str, str] = {
    "init": "init",
    "validate": "validate",
    "schema": "schema",
    "facts": "facts",
    "estimate": "estimate",
    "runtimes": "runtimes",
    "plan": "plan",
    "apply": "apply",
    "status": "status",
    "destroy": "destroy",
    "keys": "keys",
    "hosts": "hosts",
    "logs": "logs",
    "monitoring": "monitoring",
    "force-unlock": "force_unlock",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"stack.commands.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `only`, imports just that command's module."""
    parser = argparse.ArgumentParser(
        prog="stack",
        description="Serve AI models on a GPU fleet from a declarative stack.toml.",
    )
    parser.add_argument("--version", action="version", version="modelstack 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help="")
            continue
        module = _load(name)
        doc = (module.__doc__ or "").strip()
        command = sub.add_parser(name, help=module.HELP, description=doc or module.HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        # `stack logs` takes `-f` for follow (as tail, kubectl) or for the file before MODEL
        command.add_argument(*getattr(module, "FILE_FLAGS", ("-f", "--file")),
                             dest="file", default="stack.toml",
                             help="the stack file (default: ./stack.toml)")
        module.add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `stack` console script: gevent patched first thing, then `run`."""
    # pyinfra's SSH connections only run in parallel with gevent patched, first thing.
    from gevent import monkey

    monkey.patch_all()
    return run(argv)


def run(argv: list[str] | None = None) -> int:
    """Run one `stack` command line (tests call this: it patches nothing)."""
    from stack.errors import StackError

    args_list = sys.argv[1:] if argv is None else argv
    first = next((a for a in args_list if a in COMMANDS), None)
    parser = build_parser(first)
    args = parser.parse_args(args_list)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if args.command is None else 1
    try:
        return int(args._module.run(args))
    except StackError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
