"""Reading stack.toml: text -> `StackSpec`, or a `ConfigError` that says where and what to do.

Three layers of checks, each error naming the dotted key and `stack.toml:LINE:COL`:
1. TOML syntax (tomlkit's parser).
2. The schema (`stack.spec`, pydantic): types, ranges, unknown keys with a did-you-mean.
3. References between sections: pins name hosts, aliases are unique, keys name models,
   selectors parse, a listen address off loopback has keys, and so on.

`check_text` returns every problem found (sorted by position); `load`/`load_text` raise
the first. `node_settings` merges the `[nodes."PATTERN"]` tables that apply to a host.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import tomlkit
import tomlkit.exceptions
from pydantic import BaseModel, ValidationError
from pydantic.functional_validators import BeforeValidator

from router.config import is_loopback, parse_listen
from stack.errors import ConfigError
from stack.selector import SelectorError, parse_selector
from stack.spec import NodeSpec, StackSpec, parse_bytes
from stack.tomlpos import Positions, locate

Loc = tuple[str | int, ...]
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_HINT = "use letters, digits, `_`, `.` and `-`, starting with a letter or digit."
SOURCE_SCHEMES = ("hf://", "modelscope://", "local://")

# Hints for a value that breaks a constraint, by field name; the generic hint otherwise.
_FIELD_HINTS: dict[str, str] = {
    "replicas": "remove the model to stop it, or set `replicas = 1`.",
    "hash": "create keys with `stack keys create NAME`: it prints the key once and "
    "writes its hash here.",
    "name": _NAME_HINT,
    "versions": 'list at least one version, e.g. `versions = ["0.11.0"]`.',
    "min_compute_capability": 'write it as MAJOR.MINOR, e.g. `min_compute_capability = "8.0"`.',
    "context": "set the context size in tokens, e.g. `context = 8192`.",
}
_MESSAGE_HINTS: dict[str, str] = {
    "backend `custom` needs `command`": 'add `command = "my-server --host {host} '
    '--port {port} --model {model_path}"`.',
}


# ---------------------------------------------------------------------------- public


def load(path: Path) -> StackSpec:
    """Read and check the stack file at `path`; raises `ConfigError` on the first problem."""
    return load_text(read_text(path), path.name, base_dir=path.parent)


def read_text(path: Path) -> str:
    """The text of the stack file, or a `ConfigError` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
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
    try:
        data = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.TOMLKitError as exc:
        return None, [_syntax_error(exc, text, filename)]
    report = _Report(filename, locate(text))
    try:
        spec = StackSpec.model_validate(data)
    except ValidationError as exc:
        _schema_problems(exc, report)
        return None, report.sorted()
    _reference_problems(spec, report)
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


def node_settings(spec: StackSpec, node_name: str) -> NodeSpec:
    """The settings of one host: every `[nodes."PATTERN"]` whose glob matches, merged.

    Patterns apply from the least to the most specific (the number of characters that
    are not `*`, `?` or `[...]`), so `"gpu-01"` beats `"gpu-*"` beats `"*"`; between
    equally specific patterns the later one in the file wins. A key set in a pattern
    overrides the same key from the ones before; `labels` and `drivers` merge key by key.
    Last, an inline `[hosts.NAME]` table applies its `labels`, `user`, `port` and `key`.
    """
    matching = [(pattern, spec.nodes[pattern]) for pattern in spec.nodes
                if fnmatch.fnmatchcase(node_name, pattern)]
    order = {pattern: n for n, (pattern, _) in enumerate(matching)}
    matching.sort(key=lambda item: (_specificity(item[0]), order[item[0]]))
    merged: dict[str, Any] = {}
    labels: dict[str, str] = {}
    drivers: dict[Any, Any] = {}
    for _, node in matching:
        for name in node.model_fields_set:
            merged[name] = getattr(node, name)
        labels.update(node.labels)
        drivers.update(node.drivers)
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
    return NodeSpec.model_validate(merged)


# ---------------------------------------------------------------------------- report


@dataclass
class _Report:
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


# ---------------------------------------------------------------------------- schema errors


def unwrap_type(tp: Any) -> Any:
    """Strip `Annotated[...]` and `X | None`."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _descend(tp: Any, step: str | int) -> Any:
    """The type one step down from `tp`, or None when `step` is not a path step there."""
    tp = unwrap_type(tp)
    origin = get_origin(tp)
    if _is_model(tp) and isinstance(step, str):
        field = tp.model_fields.get(step)
        return None if field is None else field.rebuild_annotation()
    if origin is dict and isinstance(step, str):
        return get_args(tp)[1]
    if origin is list and isinstance(step, int):
        return get_args(tp)[0]
    if origin is tuple and isinstance(step, int):
        args = get_args(tp)
        return args[min(step, len(args) - 1)] if args else None
    return None


def _walk(loc: Loc) -> tuple[Loc, Any, Any, bool]:
    """Key path of a pydantic `loc`, its type, its parent's type, and whether the error
    is about a table key (`[key]`). Union member tags in `loc` are dropped."""
    path: list[str | int] = []
    tp: Any = StackSpec
    parent: Any = None
    for step in loc:
        if step == "[key]":
            return tuple(path), tp, parent, True
        below = _descend(tp, step)
        if below is None:
            if _is_model(unwrap_type(tp)) and isinstance(step, str):  # an unknown field
                path.append(step)
                parent, tp = tp, None
            break
        path.append(step)
        parent, tp = tp, below
    return tuple(path), tp, parent, False


def _literal_values(tp: Any) -> list[str]:
    tp = unwrap_type(tp)
    if get_origin(tp) is Literal:
        return [str(arg) for arg in get_args(tp)]
    return []


def describe_type(tp: Any) -> str:
    """How a value of this type is described to a user: `an integer`, `a table`, ..."""
    if get_origin(tp) in (Union, types.UnionType):
        members = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(members) == 1:  # `X | None`: describe X, keeping its annotations
            return describe_type(members[0])
    if get_origin(tp) is Annotated and any(
        isinstance(m, BeforeValidator) and m.func is parse_bytes for m in get_args(tp)[1:]
    ):
        return 'a size such as "24GiB" or a number of bytes'
    tp = unwrap_type(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in get_args(tp) if arg is not type(None))
    if origin is Literal and len(get_args(tp)) == 1:
        return f"`{get_args(tp)[0]}`"
    if origin is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in _literal_values(tp))
    if origin is list:
        return "an array of " + _plural(get_args(tp)[0])
    if origin is tuple:
        return f"an array of {len(get_args(tp))} numbers"
    if origin is dict and not _is_model(unwrap_type(get_args(tp)[1])):
        return "a table of " + _plural(get_args(tp)[1])
    if origin is dict or _is_model(tp):
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             date: "a date (YYYY-MM-DD)"}
    return names.get(tp, "a valid value")


def _plural(tp: Any) -> str:
    tp = unwrap_type(tp)
    if get_origin(tp) is Literal:
        return ", ".join(f"`{v}`" for v in _literal_values(tp))
    words = {str: "strings", int: "integers", float: "numbers"}
    return words.get(tp, "tables" if _is_model(tp) else "values")


def show(value: Any) -> str:
    """A value as it would be written in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _suggest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _all_models(tp: Any = StackSpec) -> Iterator[tuple[type[BaseModel], str]]:
    """Every model class in the schema with the table that holds it (for misplaced keys)."""
    seen: set[type[BaseModel]] = set()
    stack: list[tuple[Any, str]] = [(tp, "")]
    while stack:
        current, where = stack.pop()
        current = unwrap_type(current)
        if get_origin(current) is dict:
            name = '."PATTERN"' if where == "nodes" else ".NAME"
            stack.append((get_args(current)[1], where + name))
        elif get_origin(current) is list:
            stack.append((get_args(current)[0], f"[{where}]" if where else where))
        elif _is_model(current) and current not in seen:
            seen.add(current)
            yield current, where
            for name, field in current.model_fields.items():
                stack.append((field.annotation, f"{where}.{name}" if where else name))


def _unknown_key(path: Loc, parent: Any) -> tuple[str, str]:
    word = str(path[-1])
    allowed = list(unwrap_type(parent).model_fields)
    guess = _suggest(word, allowed)
    if guess:
        return f"unknown key `{dotted(path)}`", f"did you mean `{guess}`?"
    homes = [where for model, where in _all_models() if word in model.model_fields and where]
    if homes:
        return (f"unknown key `{dotted(path)}`",
                f"`{word}` belongs in `[{homes[0]}]`; here the keys are: "
                + ", ".join(f"`{k}`" for k in allowed) + ".")
    return (f"unknown key `{dotted(path)}`",
            "the keys allowed here are: " + ", ".join(f"`{k}`" for k in allowed) + ".")


def _schema_problem(error: Any) -> tuple[Loc, str, str, bool] | None:
    """(path, message, hint, at_key) for one pydantic error."""
    path, tp, parent, about_key = _walk(tuple(error["loc"]))
    key = dotted(path)
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    field_hint = _FIELD_HINTS.get(str(path[-1]) if path else "", "")
    if about_key:
        table = unwrap_type(parent)
        allowed = _literal_values(get_args(table)[0]) if get_origin(table) is dict else []
        guess = _suggest(str(path[-1]), allowed)
        return (path, f"`{dotted(path[:-1])}` has an unknown entry `{path[-1]}`",
                f"did you mean `{guess}`?" if guess else
                "the entries allowed are: " + ", ".join(f"`{v}`" for v in allowed) + ".", True)
    if kind == "extra_forbidden":
        message, hint = _unknown_key(path, parent)
        return path, message, hint, True
    if kind == "missing":
        if get_origin(unwrap_type(parent)) is tuple:
            return (path[:-1], f"`{dotted(path[:-1])}` must be {describe_type(parent)}",
                    "e.g. `port_range = [40000, 40999]`.", False)
        description = unwrap_type(parent).model_fields[path[-1]].description or ""
        table = dotted(path[:-1]) or "the top level"
        return (path[:-1], f"`{table}` has no `{path[-1]}`",
                f"add `{path[-1]} = ...`: {description}", True)
    bounds = {"greater_than_equal": ("at least", "ge"), "greater_than": ("more than", "gt"),
              "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, name = bounds[kind]
        limit = ctx[name]
        return (path, f"`{key}` must be {words} {limit}, got {show(value)}",
                field_hint or f"set `{path[-1]}` to a value {words} {limit}.", False)
    if kind == "too_short" and isinstance(value, list) and not value:
        return path, f"`{key}` must not be empty", field_hint or "add at least one element.", False
    if kind in ("too_short", "too_long"):
        return (path, f"`{key}` must be {describe_type(tp)}",
                "e.g. `port_range = [40000, 40999]`.", False)
    if kind == "string_pattern_mismatch":
        return (path, f"`{key}` has the wrong form, got {show(value)}",
                field_hint or f"it must match `{ctx['pattern']}`.", False)
    wrong_size = kind == "value_error" and describe_type(tp).startswith("a size")
    if kind == "literal_error" or kind.endswith(("_type", "_parsing")) or wrong_size:
        values = _literal_values(tp)
        guess = _suggest(str(value), values) if isinstance(value, str) and values else None
        hint = f"did you mean `{guess}`?" if guess else _type_hint(path, tp)
        return path, f"`{key}` must be {describe_type(tp)}, got {show(value)}", hint, False
    if kind == "value_error":
        reason = str(ctx.get("error", error["msg"]))
        return (path, f"`{key}`: {reason}",
                _MESSAGE_HINTS.get(reason, "see docs/stack-toml.md for this key."), False)
    return path, f"`{key}`: {error['msg']}", "see docs/stack-toml.md for this key.", False


def _type_hint(path: Loc, tp: Any) -> str:
    name = str(path[-1]) if path else "key"
    kind = describe_type(tp)
    examples = {"an integer": f"{name} = 2", "a number": f"{name} = 0.9",
                "a string": f'{name} = "text"', "true or false": f"{name} = true",
                "an array of strings": f'{name} = ["a", "b"]',
                "an array of integers": f"{name} = [0, 1]",
                "a table of strings": f'{name} = {{ key = "value" }}',
                "a date (YYYY-MM-DD)": f"{name} = 2027-01-31",
                "a table": f"[{dotted(path)}]"}
    if kind.startswith("a size"):
        return f'write `{name} = "24GiB"` (units: B, KB, MB, GB, KiB, MiB, GiB, TiB).'
    if kind.startswith("one of"):
        return "use one of the values listed."
    if get_origin(unwrap_type(tp)) is dict:
        return f"write `[{dotted(path)}.NAME]` tables."
    if kind == "an integer or `auto`":
        return f'write it as `{name} = 2` or `{name} = "auto"`.'
    example = examples.get(kind)
    return f"write it as `{example}`." if example else "see docs/stack-toml.md for this key."


def _schema_problems(exc: ValidationError, report: _Report) -> None:
    seen: set[Loc] = set()
    for error in exc.errors():
        problem = _schema_problem(error)
        if problem is None:
            continue
        path, message, hint, at_key = problem
        if path in seen:  # a union reports one error per member: keep the first
            continue
        seen.add(path)
        report.add(path, message, hint, at_key=at_key)


# ---------------------------------------------------------------------------- references


def _reference_problems(spec: StackSpec, report: _Report) -> None:
    _check_names(spec, report)
    _check_models(spec, report)
    _check_api_names(spec, report)
    _check_runtimes(spec, report)
    _check_router(spec, report)
    _check_keys(spec, report)
    low, high = spec.stack.port_range
    if low > high:
        report.add(("stack", "port_range"), f"`stack.port_range` starts at {low} but ends at "
                   f"{high}", "write the lower port first, e.g. `port_range = [40000, 40999]`.")
    prefix = spec.stack.prefix
    # `~/...` would need expanding on each host; the installers take the path literally
    if not prefix.startswith("/"):
        report.add(("stack", "prefix"), f"`stack.prefix` must be an absolute path, got "
                   f"{show(prefix)}", 'e.g. `prefix = "/opt/stack"`, or a folder the SSH '
                   "user owns to install without root.")
    for pattern, node in spec.nodes.items():
        if node.prefix is not None and not node.prefix.startswith("/"):
            path: Loc = ("nodes", pattern, "prefix")
            report.add(path, f"`{dotted(path)}` must be an absolute path, got "
                       f"{show(node.prefix)}", 'e.g. `prefix = "/opt/stack"`.')
    if spec.stack.inventory is not None and spec.hosts:
        report.add(("stack", "inventory"), "`stack.inventory` and `[hosts]` both list hosts",
                   "keep one: the inventory file or the inline `[hosts.NAME]` tables.")


def _check_names(spec: StackSpec, report: _Report) -> None:
    for section, names in (("hosts", spec.hosts), ("models", spec.models)):
        for name in names:
            if not NAME.match(name):
                report.add((section, name), f"`{dotted((section, name))}` is not a valid "
                           f"{section[:-1]} name", _NAME_HINT, at_key=True)


def _check_models(spec: StackSpec, report: _Report) -> None:
    for name, model in spec.models.items():
        base: Loc = ("models", name)
        if not _valid_source(model.source):
            report.add((*base, "source"), f"`{dotted((*base, 'source'))}` is not a model "
                       f"source: {show(model.source)}",
                       'write `hf://ORG/NAME`, `modelscope://ORG/NAME`, `local://models/x.gguf` '
                       '(beside stack.toml) or an absolute path on the hosts.')
        try:
            parse_selector(model.selector)
        except SelectorError as exc:
            report.add((*base, "selector", exc.index),
                       f"`{dotted((*base, 'selector', exc.index))}`: {exc}", exc.hint)
        if model.pin is not None:
            _check_pin(spec, base, model.pin.node, model.pin.gpus, model.gpus_per_replica,
                       report)


def _valid_source(source: str) -> bool:
    for scheme in ("hf://", "modelscope://"):
        if source.startswith(scheme):
            repo = source[len(scheme):].split("@", 1)[0].split("/")
            return len(repo) >= 2 and all(repo[:2])
    if source.startswith("local://"):
        return len(source) > len("local://")
    return source.startswith("/")


def _check_pin(spec: StackSpec, base: Loc, node: str, gpus: list[int],
               per_replica: int | str, report: _Report) -> None:
    if spec.hosts and node not in spec.hosts:
        guess = _suggest(node, list(spec.hosts))
        report.add((*base, "pin", "node"), f"`{dotted((*base, 'pin', 'node'))}` names "
                   f"`{node}`, which is not in `[hosts]`",
                   f"did you mean `{guess}`?" if guess else
                   "pin to one of: " + ", ".join(f"`{h}`" for h in spec.hosts) + ".")
    if gpus and isinstance(per_replica, int) and len(gpus) != per_replica:
        count = f"{len(gpus)} GPU" + ("s" if len(gpus) != 1 else "")
        report.add((*base, "pin", "gpus"), f"`{dotted((*base, 'pin', 'gpus'))}` lists "
                   f"{count} but `gpus_per_replica` is {per_replica}",
                   "list as many GPUs as each replica uses, or drop `gpus_per_replica`.")
    if len(set(gpus)) != len(gpus) or any(g < 0 for g in gpus):
        report.add((*base, "pin", "gpus"), f"`{dotted((*base, 'pin', 'gpus'))}` must list "
                   "distinct GPU indices", "e.g. `gpus = [0, 1]`.")


def check_pins_against(spec: StackSpec, hosts: list[str]) -> None:
    """Pins name hosts of the inventory file (only known once it is loaded: `stack plan`)."""
    for name, model in spec.models.items():
        if model.pin is None or model.pin.node in hosts:
            continue
        guess = _suggest(model.pin.node, hosts)
        raise ConfigError(
            f"`models.{name}.pin.node` names `{model.pin.node}`, which is not a host of the "
            f"inventory file `{spec.stack.inventory}`",
            hint=f"did you mean `{guess}`?" if guess else
            "pin to one of: " + ", ".join(f"`{h}`" for h in hosts) + ".")


def _check_api_names(spec: StackSpec, report: _Report) -> None:
    """Each name a client may send (model names and aliases) leads to one model."""
    owner: dict[str, str] = {name: name for name in spec.models}
    for name, model in spec.models.items():
        for index, alias in enumerate(model.aliases):
            path: Loc = ("models", name, "aliases", index)
            if not alias.strip() or any(c.isspace() for c in alias):
                report.add(path, f"`{dotted(path)}` must be a name without spaces, got "
                           f"{show(alias)}", "e.g. `aliases = [\"gpt-4o-mini\"]`.")
                continue
            if alias in owner and alias != name:
                what = ("the name of a model" if alias in spec.models
                        else f"an alias of `{owner[alias]}`")
                report.add(path, f"`{dotted(path)}` is `{alias}`, already {what}",
                           "each name in the API must lead to one model: rename or remove "
                           "one of them.")
                continue
            owner[alias] = name


def _check_runtimes(spec: StackSpec, report: _Report) -> None:
    from stack.spec import BACKENDS

    for name, runtime in spec.runtimes.items():
        if runtime.backend is None and name not in BACKENDS:
            guess = _suggest(name, list(BACKENDS))
            report.add(("runtimes", name), f"`{dotted(('runtimes', name))}` is not a backend "
                       "name and has no `backend`",
                       (f'did you mean `[runtimes."{guess}"]`? Otherwise set ' if guess
                        else "set ") + "`backend` to one of: "
                       + ", ".join(f"`{b}`" for b in BACKENDS) + ".", at_key=True)
        needs = {"pip": "package", "archive": "url", "build": "url", "system": "path"}
        field = needs[runtime.source]
        if field == "url" and runtime.package is not None:
            field = "package"  # the archive is that package's sdist
        if getattr(runtime, field) is None:
            report.add(("runtimes", name, "source"), f"`{dotted(('runtimes', name))}` has "
                       f"`source = \"{runtime.source}\"` but no `{field}`",
                       f"add `{field} = ...`: "
                       f"{type(runtime).model_fields[field].description}"
                       + (" Or name the package whose sdist is the archive: "
                          "`package = \"NAME=={version}\"`." if field == "url" else ""))
    versions: dict[str, set[str]] = {}
    for name, runtime in spec.runtimes.items():
        versions.setdefault(runtime.backend or name, set()).update(runtime.versions)
    for name, model in spec.models.items():
        if model.backend and model.backend_version and model.backend in versions \
                and model.backend_version not in versions[model.backend]:
            path: Loc = ("models", name, "backend_version")
            report.add(path, f"`{dotted(path)}` is `{model.backend_version}`, which no "
                       f"`[runtimes]` table of `{model.backend}` installs",
                       "add it to that runtime's `versions`, or use one of: "
                       + ", ".join(f"`{v}`" for v in sorted(versions[model.backend])) + ".")


def _check_router(spec: StackSpec, report: _Report) -> None:
    router = spec.router
    _check_listen(spec, report)
    if (router.tls_cert is None) != (router.tls_key is None):
        missing = "tls_key" if router.tls_key is None else "tls_cert"
        report.add(("router",), "`router` has only one of `tls_cert` and `tls_key`",
                   f"add `{missing}`, or remove both to serve plain HTTP.", at_key=True)
    if spec.hosts:
        for index, pattern in enumerate(router.hosts):
            if not any(fnmatch.fnmatchcase(h, pattern) for h in spec.hosts):
                guess = _suggest(pattern, list(spec.hosts))
                path: Loc = ("router", "hosts", index)
                report.add(path, f"`{dotted(path)}` is `{pattern}`, which matches no host "
                           "in `[hosts]`", f"did you mean `{guess}`?" if guess else
                           "hosts are: " + ", ".join(f"`{h}`" for h in spec.hosts) + ".")


def _check_listen(spec: StackSpec, report: _Report) -> None:
    """`router.listen` in the router's own grammar (router.config), so the router.json
    that `stack apply` writes from it is one the router accepts."""
    listen = spec.router.listen
    try:
        host, port = parse_listen(listen)
        if port == 0:  # any free port: fine for testing the router alone, not for a fleet
            raise ValueError("port 0 means any free port, and clients need to know it")
    except ValueError as exc:
        report.add(("router", "listen"), f"`router.listen` must be HOST:PORT, got "
                   f"{show(listen)}: {exc}", 'e.g. `listen = "127.0.0.1:8080"`.')
        return
    if not spec.keys and not is_loopback(host):
        report.add(("router", "listen"), f"`router.listen` is `{listen}`, not a "
                   "loopback address, and stack.toml has no `[[keys]]`",
                   "create a key with `stack keys create NAME` so that only key holders "
                   f'can call the models, or listen on `"127.0.0.1:{port}"`.')


def _check_keys(spec: StackSpec, report: _Report) -> None:
    names: set[str] = set()
    hashes: set[str] = set()
    api_names = set(spec.models) | {a for m in spec.models.values() for a in m.aliases}
    for index, key in enumerate(spec.keys):
        if key.name in names:
            report.add(("keys", index, "name"), f"`keys[{index}].name`: two keys are named "
                       f"`{key.name}`", "key names must be unique: rename one, or "
                       f"`stack keys revoke {key.name}`.")
        if key.hash in hashes:
            report.add(("keys", index, "hash"), f"`keys[{index}].hash` is the same as an "
                       "earlier key's", "remove the copy; a key must have one name.")
        names.add(key.name)
        hashes.add(key.hash)
        for m_index, model in enumerate(key.models):
            if model not in api_names:
                path: Loc = ("keys", index, "models", m_index)
                guess = _suggest(model, sorted(api_names))
                report.add(path, f"`{dotted(path)}` is `{model}`, which is not a model",
                           f"did you mean `{guess}`?" if guess else
                           "list model names or aliases from `[models]`.")


def _specificity(pattern: str) -> int:
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))

