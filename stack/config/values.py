"""Rules on the text and on every value of stack.toml, before the schema looks at it.

No value reaches a host as text a reviewer cannot see: strings and keys hold no control
characters (a newline would start a new line in a script or a unit file) and none of the
invisible or direction-changing characters that make text read differently than it runs.
Strings are at most `MAX_STRING` characters, and arrays and inline tables nest at most
`MAX_DEPTH` deep (deeper would exhaust the parser's stack, not hold a setting).
"""

from __future__ import annotations

import json
import re
from typing import Any

from stack.config.report import Loc, Report, dotted
from stack.errors import ConfigError

MAX_DEPTH = 32
MAX_STRING = 4096
# C0 and C1 controls, DEL; zero-width and bidirectional marks, overrides and isolates
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff]")
# a custom backend's command is split into words, never run by a shell: it may be written
# over several lines
_MULTILINE: tuple[tuple[str | None, ...], ...] = (("models", None, "command"),)


def nesting_problem(text: str, filename: str) -> ConfigError | None:
    """An error at the first bracket that opens more than `MAX_DEPTH` arrays or inline
    tables (strings and comments skipped), else None."""
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif char in "\"'":
            i = _string_end(text, i)
            continue
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, i) + 1
                col = i - (text.rfind("\n", 0, i) + 1) + 1
                return ConfigError(
                    f"`{filename}` nests arrays and inline tables more than {MAX_DEPTH} deep "
                    f"({filename}:{line}:{col})",
                    hint="no key of stack.toml needs more than three levels; check the "
                    "brackets on that line.")
        elif char in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None


def _string_end(text: str, start: int) -> int:
    """The index after the string that starts at `start` (the end of the text if it is
    not closed: the TOML parser reports that)."""
    quote = text[start]
    if text.startswith(quote * 3, start):
        end = start + 3
        while end < len(text) and not text.startswith(quote * 3, end):
            end += 2 if quote == '"' and text[end] == "\\" else 1
        end += 3
        while end < len(text) and text[end] == quote:  # up to two quotes end the content
            end += 1
        return min(end, len(text))
    end = start + 1
    while end < len(text) and text[end] not in (quote, "\n"):
        end += 2 if quote == '"' and text[end] == "\\" else 1
    return min(end + 1, len(text))


def value_problems(data: Any, report: Report) -> None:
    """Report every key and string with a hidden character, and every string too long."""
    _walk(data, (), report)


def _walk(value: Any, path: Loc, report: Report) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            hidden_key = _HIDDEN.search(key)
            if hidden_key:
                report.add((*path, key), f"`{dotted(path) or 'the top level'}` has a key with "
                           f"{_which(hidden_key.group())}: {_escaped(key)}", _HINT, at_key=True)
            _walk(item, (*path, key), report)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _walk(item, (*path, index), report)
    elif isinstance(value, str):
        allowed = "\n\t" if any(_matches(path, p) for p in _MULTILINE) else ""
        hidden = [c for c in _HIDDEN.findall(value) if c not in allowed]
        if hidden:
            report.add(path, f"`{dotted(path)}` holds {_which(hidden[0])}: "
                       f"{_escaped(value)}", _HINT)
        elif len(value) > MAX_STRING:
            report.add(path, f"`{dotted(path)}` must be at most {MAX_STRING} characters "
                       f"long, got {len(value)}", f"shorten `{path[-1]}`.")


_HINT = ("write it on one line with visible characters only: values end up in paths, "
         "scripts and unit files on the hosts.")


def _matches(path: Loc, pattern: tuple[str | None, ...]) -> bool:
    return len(path) == len(pattern) and all(p is None or p == s for s, p in zip(path, pattern,
                                                                               strict=True))


def _which(char: str) -> str:
    kind = "a control character" if ord(char) < 0xA0 else "an invisible character"
    return f"{kind} (U+{ord(char):04X})"


def _escaped(text: str) -> str:
    """The string as TOML would write it, with every hidden character escaped."""
    shown = json.dumps(text[:60], ensure_ascii=False)
    shown = _HIDDEN.sub(lambda m: f"\\u{ord(m.group()):04X}", shown)
    return shown + (" (and more)" if len(text) > 60 else "")
