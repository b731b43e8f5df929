"""Reading stack.toml: text -> `StackSpec`, or a `ConfigError` that says where and what to do.

Three layers of checks, each error naming the dotted key and `stack.toml:LINE:COL`:
1. TOML syntax (tomlkit's parser), after a nesting depth check; then every key and string
   is free of control and invisible characters and not too long (values.py).
2. The schema (`stack.spec`, pydantic): types, ranges, unknown keys with a did-you-mean.
3. References between sections: pins name hosts, aliases are unique, keys name models,
   selectors parse, a listen address off loopback has keys, and so on.

`check_text` returns every problem found (sorted by position); `load`/`load_text` raise
the first. `node_settings` merges the `[nodes."PATTERN"]` tables that apply to a host.

    report.py      where a problem is (dotted key, file:line:col) and how they are collected
    messages.py    schema problems (pydantic errors) in words, with hints
    references.py  references between sections
    values.py      nesting depth, hidden characters and lengths of every value
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from pydantic import ValidationError

from stack.config.messages import describe_type, schema_problems, unwrap_type
from stack.config.references import NAME, check_pins_against, reference_problems
from stack.config.report import Report, dotted
from stack.config.values import nesting_problem, value_problems
from stack.errors import ConfigError
from stack.spec import NodeSpec, StackSpec
from stack.tomlpos import locate

__all__ = ["NAME", "check_pins_against", "check_text", "describe_type", "dotted", "load",
           "load_text", "node_settings", "read_text", "unwrap_type"]




def load(path: Path) -> StackSpec:
    """Read and check the stack file at `path`; raises `ConfigError` on the first problem."""
    return load_text(read_text(path), path.name, base_dir=path.parent)


def read_text(path: Path) -> str:
    """The text of the stack file, or a `ConfigError` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM from some editors is not TOML
    except FileNotFoundError as exc:
        raise ConfigError(
            f"`{path}` does not exist",
            hint="run `stack init` to write a starter stack.toml, or pass `-f FILE`.",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"`{path}` cannot be read: {exc}",
                          hint="check the file's permissions and that it is UTF-8.") from exc


def load_text(text: str, filename: str = "stack.toml", base_dir: Path | None = None) -> StackSpec:
    """Parse and check stack.toml text; raises `ConfigError` on the first problem."""
    spec, problems = check_text(text, filename, base_dir)
    if problems:
        raise problems[0]
    assert spec is not None
    return spec


def check_text(
    text: str, filename: str = "stack.toml", base_dir: Path | None = None
) -> tuple[StackSpec | None, list[ConfigError]]:
    """Every problem in stack.toml text, first in the file first; the spec when there is none.

    With `base_dir` (the folder of stack.toml), files it names (the inventory) must exist.
    """
    too_deep = nesting_problem(text, filename)
    if too_deep is not None:
        return None, [too_deep]
    try:
        data = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.TOMLKitError as exc:
        return None, [_syntax_error(exc, text, filename)]
    report = Report(filename, locate(text))
    value_problems(data, report)
    if report.problems:
        return None, report.sorted()
    try:
        spec = StackSpec.model_validate(data)
    except ValidationError as exc:
        schema_problems(exc, report)
        return None, report.sorted()
    reference_problems(spec, report)
    inventory = spec.stack.inventory
    if base_dir is not None and inventory is not None and not (base_dir / inventory).is_file():
        report.add(("stack", "inventory"), f"`stack.inventory` names `{inventory}`, which "
                   "does not exist", "give the path of a pyinfra inventory file relative to "
                   "stack.toml, e.g. `inventories/lab.py`.")
    problems = report.sorted()
    return (None if problems else spec), problems


def _syntax_error(exc: Exception, text: str, filename: str) -> ConfigError:
    """A TOML error with `file:line:col`; tomllib locates what tomlkit does not (duplicates)."""
    reason = str(exc).rsplit(" at line ", 1)[0].rstrip(".")
    reason = reason.replace("Unexpected character: '\\x00'", "unexpected end of file")
    where = ""
    if isinstance(exc, tomlkit.exceptions.ParseError):  # tomlkit counts columns from 0
        where = f" ({filename}:{exc.line}:{exc.col + 1})"
    try:  # tomllib places duplicates and the end of the file better
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as located:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(located))
        if match:
            line, col = int(match.group(1)), int(match.group(2))
            duplicate = re.match(r'Key "(.+)" already exists', reason)
            if duplicate:  # point at the repeated key, not past its value
                found = text.split("\n")[line - 1].find(duplicate.group(1))
                col = found + 1 if found >= 0 else col
            where = f" ({filename}:{line}:{col})"
        elif "end of document" in str(located):
            lines = text.split("\n")
            where = f" ({filename}:{len(lines)}:{len(lines[-1]) + 1})"
    return ConfigError(
        f"`{filename}` is not valid TOML: {reason}{where}",
        hint="check the quotes, brackets and `=` on that line; strings need quotes, "
        'e.g. `backend = "vllm"`; a key or table may appear only once.',
    )


def node_settings(spec: StackSpec, node_name: str) -> NodeSpec:
    """The settings of one host: every `[nodes."PATTERN"]` whose glob matches, merged.

    Patterns apply from the least to the most specific (the number of characters that
    are not `*`, `?` or `[...]`), so `"gpu-01"` beats `"gpu-*"` beats `"*"`; between
    equally specific patterns the later one in the file wins. A key set in a pattern
    overrides the same key from the ones before; `labels`, `drivers` and `env` merge key
    by key.
    Last, an inline `[hosts.NAME]` table applies its `labels`, `user`, `port` and `key`.
    """
    matching = [(pattern, spec.nodes[pattern]) for pattern in spec.nodes
                if fnmatch.fnmatchcase(node_name, pattern)]
    order = {pattern: n for n, (pattern, _) in enumerate(matching)}
    matching.sort(key=lambda item: (_specificity(item[0]), order[item[0]]))
    merged: dict[str, Any] = {}
    labels: dict[str, str] = {}
    drivers: dict[Any, Any] = {}
    env: dict[str, Any] = {}
    for _, node in matching:
        for name in node.model_fields_set:
            merged[name] = getattr(node, name)
        labels.update(node.labels)
        drivers.update(node.drivers)
        env.update(node.env)
    host = spec.hosts.get(node_name)
    if host is not None:
        labels.update(host.labels)
        for ours, theirs in (("ssh_user", "user"), ("ssh_port", "port"), ("ssh_key", "key")):
            if theirs in host.model_fields_set:
                merged[ours] = getattr(host, theirs)
    if labels:
        merged["labels"] = labels
    if drivers:
        merged["drivers"] = drivers
    if env:
        merged["env"] = env
    return NodeSpec.model_validate(merged)


def _specificity(pattern: str) -> int:
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))
