"""docs/cli.md is generated from the argument parser and kept up to date."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

from stack.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = ROOT / "docs" / "cli.md"


def test_generated_docs_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-docs"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def section(text: str, title: str) -> str:
    """The text under a `## `title`` header (up to the next header of the same level)."""
    level = "###" if title.count(" ") > 1 else "##"
    match = re.search(rf"^{level} `{re.escape(title)}`\n(.*?)(?=^#{{2,{len(level)}}} `|\Z)",
                      text, re.M | re.S)
    assert match, f"no section `{title}` in docs/cli.md"
    return match.group(1)


def check_options(text: str, title: str, parser: argparse.ArgumentParser) -> None:
    body = section(text, title)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                check_options(text, f"{title} {name}", sub)
        elif not isinstance(action, argparse._HelpAction):
            for name in action.option_strings:
                assert f"`{name}" in body, f"`{title}`: {name} is not documented"
            if action.help:
                assert action.help.replace("|", "\\|") in body, f"`{title}`: {action.help}"


def test_every_option_of_every_available_command_is_documented() -> None:
    text = CLI_MD.read_text()
    documented = 0
    for name, module in COMMANDS.items():
        try:
            importlib.import_module(f"stack.commands.{module}")
        except ModuleNotFoundError:
            continue
        parser = build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        check_options(text, f"stack {name}", sub.choices[name])
        documented += 1
    assert documented >= 9


def test_every_command_has_its_module_so_none_is_documented_as_unavailable() -> None:
    text = CLI_MD.read_text()
    missing = [name for name in COMMANDS if "Not available in this checkout" in
               section(text, f"stack {name}")]
    assert not missing, f"commands without a module in stack/commands/: {missing}"
