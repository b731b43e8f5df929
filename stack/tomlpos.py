"""Where each key of a TOML document is written: path -> (line, column).

tomlkit keeps comments and layout but no positions, so error messages find the line of
a key here. The text has already been parsed by tomlkit, so this scanner may assume it
is valid TOML; on anything unexpected it stops and keeps what it found.

Paths are tuples of keys and indices, as pydantic reports them: `("models", "qwen",
"replicas")`, `("keys", 0, "hash")` for the first `[[keys]]`, `("models", "q",
"selector", 1)` for the second element of an array.
"""

from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass, field

Path = tuple[str | int, ...]
_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass
class Positions:
    """1-based (line, column) of each key and of each value, by path."""

    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    headers: list[tuple[int, Path]] = field(default_factory=list)  # (line, table) in order

    def of_value(self, path: Path) -> tuple[int, int] | None:
        """The value at `path`, else its key, else the nearest enclosing key found."""
        for end in range(len(path), 0, -1):
            head = path[:end]
            if end == len(path) and head in self.values:
                return self.values[head]
            if head in self.keys:
                return self.keys[head]
        return None

    def of_key(self, path: Path) -> tuple[int, int] | None:
        """The key at `path`, else the nearest enclosing key found."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.keys:
                return self.keys[path[:end]]
        return None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.starts = [0] + [n + 1 for n, c in enumerate(text) if c == "\n"]
        self.out = Positions()

    def pos(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.i : self.i + n]

    def skip(self, newlines: bool) -> None:
        """Skip blanks and comments (and newlines when `newlines`)."""
        while self.i < len(self.text):
            char = self.text[self.i]
            if char in " \t\r" or (newlines and char == "\n"):
                self.i += 1
            elif char == "#":
                end = self.text.find("\n", self.i)
                self.i = len(self.text) if end < 0 else end
            else:
                return

    def key_part(self) -> str:
        start = self.i
        if self.peek() in ('"', "'"):
            self.string()
            value = tomllib.loads("k = " + self.text[start : self.i])["k"]
            return str(value)
        while self.i < len(self.text) and self.text[self.i] in _BARE:
            self.i += 1
        if self.i == start:
            raise ValueError("not a key")
        return self.text[start : self.i]

    def dotted_key(self) -> tuple[str, ...]:
        parts = [self.key_part()]
        self.skip(newlines=False)
        while self.peek() == ".":
            self.i += 1
            self.skip(newlines=False)
            parts.append(self.key_part())
            self.skip(newlines=False)
        return tuple(parts)

    def string(self) -> None:
        quote = self.peek()
        if self.peek(3) == quote * 3:
            self.i += 3
            while not self.text.startswith(quote * 3, self.i):
                self.i += 2 if quote == '"' and self.peek() == "\\" else 1
                if self.i >= len(self.text):
                    raise ValueError("unterminated string")
            self.i += 3
            while self.peek() == quote:  # up to two quotes may end the content
                self.i += 1
            return
        self.i += 1
        while self.peek() != quote:
            self.i += 2 if quote == '"' and self.peek() == "\\" else 1
            if self.i >= len(self.text):
                raise ValueError("unterminated string")
        self.i += 1

    def value(self, path: Path) -> None:
        self.out.values[path] = self.pos(self.i)
        char = self.peek()
        if char in ('"', "'"):
            self.string()
        elif char == "[":
            self.i += 1
            index = 0
            while True:
                self.skip(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                self.out.keys[(*path, index)] = self.pos(self.i)
                self.value((*path, index))
                index += 1
                self.skip(newlines=True)
                if self.peek() == ",":
                    self.i += 1
        elif char == "{":
            self.i += 1
            while True:
                self.skip(newlines=True)
                if self.peek() == "}":
                    self.i += 1
                    return
                self.key_value(path)
                self.skip(newlines=True)
                if self.peek() == ",":
                    self.i += 1
        else:
            while self.i < len(self.text) and self.text[self.i] not in ",]}\n#":
                self.i += 1

    def key_value(self, table: Path) -> None:
        start = self.i
        names = self.dotted_key()
        path = (*table, *names)
        for end in range(1, len(names) + 1):  # `a.b = 1` writes the table `a` here too
            self.out.keys.setdefault((*table, *names[:end]), self.pos(start))
        self.skip(newlines=False)
        if self.peek() != "=":
            raise ValueError("expected =")
        self.i += 1
        self.skip(newlines=False)
        self.value(path)

    def document(self) -> Positions:
        table: Path = ()
        arrays: dict[tuple[str, ...], int] = {}  # [[name]] -> index of its last table
        while True:
            self.skip(newlines=True)
            if self.i >= len(self.text):
                return self.out
            start = self.i
            if self.peek() == "[":
                double = self.peek(2) == "[["
                self.i += 2 if double else 1
                self.skip(newlines=False)
                names = self.dotted_key()
                self.i += 2 if double else 1
                if double:
                    arrays[names] = arrays.get(names, -1) + 1
                table = self._resolve(names, arrays)
                self.out.headers.append((self.pos(start)[0], table))
                for end in range(1, len(table) + 1):  # implicit parents start here too
                    self.out.keys.setdefault(table[:end], self.pos(start))
            else:
                self.key_value(table)

    @staticmethod
    def _resolve(names: tuple[str, ...], arrays: dict[tuple[str, ...], int]) -> Path:
        """`[[a]]` then `[a.b]`: b belongs to the last table of the array a."""
        path: list[str | int] = []
        for end in range(1, len(names) + 1):
            path.append(names[end - 1])
            if names[:end] in arrays:
                path.append(arrays[names[:end]])
        return tuple(path)


def locate(text: str) -> Positions:
    """Positions of every key and value in `text` (what was found before any surprise)."""
    scanner = _Scanner(text)
    try:
        return scanner.document()
    except (ValueError, IndexError, tomllib.TOMLDecodeError):
        return scanner.out
