"""Where a stack.toml problem is (a dotted key, `file:line:col`) and how problems are
collected: `Report`, `dotted`, `show`, `suggest`."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

from stack.errors import ConfigError
from stack.tomlpos import Positions

Loc = tuple[str | int, ...]
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dotted(path: Loc) -> str:
    """`("models", "qwen2.5", "selector", 0)` -> `models."qwen2.5".selector[0]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            shown = part if _BARE_KEY.match(part) else json.dumps(part)
            out += ("." if out else "") + shown
    return out



@dataclass
class Report:
    """The problems found so far, each at its place in the file."""

    filename: str
    positions: Positions
    problems: list[tuple[tuple[int, int], ConfigError]] | None = None

    def add(self, path: Loc, message: str, hint: str, at_key: bool = False) -> None:
        where = self.positions.of_key(path) if at_key else self.positions.of_value(path)
        if where is not None:
            message += f" ({self.filename}:{where[0]}:{where[1]})"
        if self.problems is None:
            self.problems = []
        self.problems.append((where or (10**9, 0), ConfigError(message, hint=hint)))

    def sorted(self) -> list[ConfigError]:
        return [err for _, err in sorted(self.problems or [], key=lambda item: item[0])]


def show(value: Any) -> str:
    """A value as it would be written in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value)
        return shown if len(shown) <= 80 else shown[:60] + f'..." ({len(value)} characters)'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def suggest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None
