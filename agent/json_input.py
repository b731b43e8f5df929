"""JSON from outside the agent (an API body, the assignment file), read within bounds.

`decode_json` refuses, with an `AgentError`, what `json.loads` would take or choke on:
text that is not JSON or not UTF-8, `NaN`/`Infinity` and numbers too large for a float
(they are not JSON, and would reach the schema as non-finite floats), integers of more
than `MAX_DIGITS` digits, a key given twice
in one object (two readers could take different ones), and nesting deeper than
`MAX_DEPTH` (the parser recurses per level: 100,000 levels end in a `RecursionError`;
no assignment needs more than five).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from agent.errors import AgentError

MAX_DEPTH: Final = 32
MAX_DIGITS: Final = 20  # 2**64 has 20; no field of the agent's holds more
_HINT = "send the JSON that `stack apply` writes."


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"integer {text[:24]}... has more than {MAX_DIGITS} digits")
    return int(text)


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {json.dumps(key[:40])} appears twice in one object")
        result[key] = value
    return result


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, (dict, list)))
    return False


def decode_json(raw: bytes, what: str = "the assignment") -> Any:
    """The JSON value in `raw`; `AgentError` (message and hint) when it is not one."""
    too_deep = AgentError(f"{what} nests arrays and objects more than {MAX_DEPTH} deep",
                          hint=_HINT)
    try:
        value = json.loads(raw, parse_float=_finite, parse_int=_integer,
                           parse_constant=_not_a_number, object_pairs_hook=_object)
    except RecursionError:  # deeper than the interpreter's stack: far beyond MAX_DEPTH
        raise too_deep from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the checks above
        raise AgentError(f"{what} is not valid JSON: {exc}", hint=_HINT) from None
    if _too_deep(value, MAX_DEPTH):
        raise too_deep
    return value
