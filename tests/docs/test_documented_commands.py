"""Every `stack ...` command written in the docs is one the CLI accepts.

Lines of code blocks are parsed whole by the real parser; inline mentions (`stack plan
--facts`, `stack estimate SOURCE [--ctx N]`) must name a command and only its options.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from stack.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = {"cli.md", "stack-toml.md"}  # checked against the code by their own tests


def command_lines(text: str) -> list[tuple[str, str]]:
    """(`block` or `inline`, text) of every `stack ...` in code blocks and code spans."""
    found = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            line = re.sub(r"^(\S*/)?stack ", "stack ", line)
            if line.startswith("stack ") or line.startswith("KEY=$(stack "):
                found.append(("block", line))
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)):
        span = re.sub(r"^(\S*/)?stack ", "stack ", span.strip())
        if span.startswith("stack ") and not span.startswith("stack.toml"):
            found.append(("inline", span))
    return found


def argv(line: str) -> list[str]:
    line = re.sub(r"^KEY=\$\((.*)\)$", r"\1", line)
    line = line.split(" && ")[0].split(" | ")[0].split(" > ")[0]
    return shlex.split(line)[1:]


CASES = [(doc.name, kind, line) for doc in DOCS if doc.name not in GENERATED
         for kind, line in command_lines(doc.read_text())]


def test_the_docs_show_commands() -> None:
    assert len(CASES) >= 30


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None


def check_mention(doc: str, line: str, args: list[str]) -> None:
    """A command (and action) that exists, and only options it has."""
    parser = subparser(build_parser(args[0]), args[0])
    assert parser is not None, f"{doc}: `{line}`: no command `{args[0]}`"
    if len(args) > 1 and (nested := subparser(parser, args[1])) is not None:
        parser = nested
    options = {o for a in parser._actions for o in a.option_strings}
    for word in args[1:]:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("-"):
            assert flag in options, f"{doc}: `{line}`: `{flag}` is no option of this command"


@pytest.mark.parametrize(("doc", "kind", "line"), CASES)
def test_documented_command_parses(doc: str, kind: str, line: str) -> None:
    args = argv(line)
    if not args or args[0].isupper():  # `stack COMMAND --help`, `stack CLI` in a diagram
        return
    if kind == "inline":
        check_mention(doc, line, args)
        return
    parser = build_parser(args[0])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            assert exc.code == 0 and "--help" in args, f"{doc}: `{line}`: {err.getvalue()}"


def test_a_wrong_option_or_command_is_caught() -> None:
    with pytest.raises(AssertionError, match="`--nope` is no option"):
        check_mention("x.md", "stack plan --nope", ["plan", "--nope"])
    with pytest.raises(AssertionError, match="auto-aprove"):
        test_documented_command_parses("x.md", "block", "stack apply --auto-aprove")
    with pytest.raises(AssertionError, match="`--models` is no option"):
        check_mention("x.md", "stack keys list --models a", ["keys", "list", "--models", "a"])
