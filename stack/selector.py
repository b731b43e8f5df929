"""Label selectors: which nodes a model may run on, from `models.NAME.selector`.

Grammar (the Kubernetes one, minus set-based extras), one or more requirements per
string, separated by commas outside parentheses; a node must meet all of them:

    zone=a            the label equals the value (`==` works too)
    zone!=a           the label is missing or differs
    zone in (a,b)     the label is one of the values
    zone notin (a,b)  the label is missing or is none of the values
    gpu               the label exists
    !spot             the label does not exist
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Operator = Literal["=", "!=", "in", "notin", "exists", "!exists"]

_KEY = r"[A-Za-z0-9](?:[A-Za-z0-9_./-]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?)?"
_EQUALITY = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\((.*)\)$")
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


class SelectorError(ValueError):
    """A selector string that does not parse; `index` is its position in the list."""

    def __init__(self, index: int, text: str, reason: str) -> None:
        whole = f"`{text.strip()}`" in reason
        super().__init__(reason if whole else f"{reason} in `{text}`")
        self.index = index
        self.text = text
        self.reason = reason
        self.hint = (
            "write `key=value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`, "
            "`key` (exists) or `!key` (does not exist)."
        )


@dataclass(frozen=True)
class Requirement:
    """One condition on one label."""

    key: str
    op: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels meets the condition."""
        value = labels.get(self.key)
        if self.op == "=":
            return value == self.values[0]
        if self.op == "!=":
            return value != self.values[0]
        if self.op == "in":
            return value is not None and value in self.values
        if self.op == "notin":
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        return value is None

    def describe(self) -> str:
        """The requirement written back in selector syntax."""
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return self.key if self.op == "exists" else f"!{self.key}"


@dataclass(frozen=True)
class Selector:
    """All the requirements of a model; the empty selector matches every node."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels meets every requirement."""
        return all(req.matches(labels) for req in self.requirements)

    def describe(self) -> str:
        """Human-readable form, e.g. `zone=a, gpu in (h100,a100)`; `any node` when empty."""
        if not self.requirements:
            return "any node"
        return ", ".join(req.describe() for req in self.requirements)

    def failing(self, labels: Mapping[str, str]) -> tuple[Requirement, ...]:
        """The requirements a node with these labels does not meet (for reasons)."""
        return tuple(req for req in self.requirements if not req.matches(labels))


def _split(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _parse_requirement(index: int, text: str, raw: str) -> Requirement:
    """One requirement `raw` from the selector item `text`."""
    part = raw.strip()
    if not part:
        raise SelectorError(index, text, "empty requirement")
    if match := _SET.match(part):
        values = tuple(v.strip() for v in match.group(3).split(","))
        bad = [v for v in values if not v or not _VALUE_ONLY.match(v)]
        if bad:
            raise SelectorError(index, text, f"bad value `{bad[0]}` in the list")
        op: Operator = "in" if match.group(2) == "in" else "notin"
        return Requirement(match.group(1), op, values)
    if match := _EQUALITY.match(part):
        op = "!=" if match.group(2) == "!=" else "="
        return Requirement(match.group(1), op, (match.group(3),))
    if match := _EXISTS.match(part):
        return Requirement(match.group(2), "!exists" if match.group(1) else "exists")
    raise SelectorError(index, text, f"cannot read the requirement `{part}`")


def parse_selector(items: list[str]) -> Selector:
    """Parse `models.NAME.selector`; raises `SelectorError` naming the bad item."""
    requirements: list[Requirement] = []
    for index, item in enumerate(items):
        for part in _split(item):
            requirements.append(_parse_requirement(index, item, part))
    return Selector(tuple(requirements))
