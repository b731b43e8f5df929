"""Schema problems in words: a pydantic error on stack.toml -> one sentence naming the
dotted key, with a hint (unknown keys get a did-you-mean)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from datetime import date
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.functional_validators import BeforeValidator

from stack.config.report import Loc, Report, dotted, show, suggest
from stack.spec import (
    ENV_SETTING_ERROR,
    FROM_ENV_ERROR,
    RULES,
    FromEnv,
    StackSpec,
    parse_bytes,
)

NAME_HINT = "use letters, digits, `_`, `.` and `-`, starting with a letter or digit."
SOURCE_SCHEMES = ("hf://", "modelscope://", "local://")

# Hints for a value that breaks a constraint, by field name; the generic hint otherwise.
_FIELD_HINTS: dict[str, str] = {
    "replicas": "remove the model to stop it, or set `replicas = 1`.",
    "hash": "create keys with `stack keys create NAME`: it prints the key once and "
    "writes its hash here.",
    "name": NAME_HINT,
    "versions": 'list at least one version, e.g. `versions = ["0.11.0"]`.',
    "min_compute_capability": 'write it as MAJOR.MINOR, e.g. `min_compute_capability = "8.0"`.',
    "context": "set the context size in tokens, e.g. `context = 8192`.",
    "port_range": "ports are 1 to 65535, e.g. `port_range = [40000, 40999]`.",
}
# ... for a value above the field's upper bound, where that needs other words
_UPPER_BOUND_HINTS: dict[str, str] = {
    "replicas": "split the model into several `[models.NAME]` tables if it really needs "
    "more replicas.",
}
_MESSAGE_HINTS: dict[str, str] = {
    "backend `custom` needs `command`": 'add `command = "my-server --host {host} '
    '--port {port} --model {model_path}"`.',
    ENV_SETTING_ERROR: 'write `HF_ENDPOINT = "https://hf-mirror.example"`, or for a secret '
    '`HF_TOKEN = { from_env = "HF_TOKEN" }` (read from the environment of `stack plan` and '
    "`stack apply`, never written here).",
    FROM_ENV_ERROR: 'use letters, digits and `_`, not starting with a digit, e.g. '
    '`{ from_env = "HF_TOKEN" }`.',
}



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
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_plural(arg) for arg in get_args(tp) if arg is not type(None))
    if tp is FromEnv:
        return '`{ from_env = "NAME" }`'
    if get_origin(tp) is Literal:
        return ", ".join(f"`{v}`" for v in _literal_values(tp))
    words = {str: "strings", int: "integers", float: "numbers"}
    return words.get(tp, "tables" if _is_model(tp) else "values")


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
    guess = suggest(word, allowed)
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
    field = next((step for step in reversed(path) if isinstance(step, str)), "")
    field_hint = _FIELD_HINTS.get(field, "")
    if about_key and kind == "string_pattern_mismatch" and ctx.get("pattern") in RULES:
        words, hint = RULES[ctx["pattern"]]
        return (path, f"`{dotted(path[:-1])}` has a key that is not {words}: "
                f"{show(path[-1])}", hint, True)
    if about_key:
        table = unwrap_type(parent)
        allowed = _literal_values(get_args(table)[0]) if get_origin(table) is dict else []
        guess = suggest(str(path[-1]), allowed)
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
        if name in ("le", "lt"):
            field_hint = _UPPER_BOUND_HINTS.get(field, field_hint)
        return (path, f"`{key}` must be {words} {limit}, got {show(value)}",
                field_hint or f"set `{path[-1]}` to a value {words} {limit}.", False)
    if kind == "too_short" and isinstance(value, list) and not value:
        return path, f"`{key}` must not be empty", field_hint or "add at least one element.", False
    if kind == "too_long" and get_origin(unwrap_type(tp)) is list:
        return (path, f"`{key}` has {ctx['actual_length']} elements, at most "
                f"{ctx['max_length']} are allowed", f"list at most {ctx['max_length']}.", False)
    if kind in ("too_short", "too_long"):
        return (path, f"`{key}` must be {describe_type(tp)}",
                "e.g. `port_range = [40000, 40999]`.", False)
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in RULES:
        words, hint = RULES[ctx["pattern"]]
        return path, f"`{key}` must be {words}, got {show(value)}", hint, False
    if kind == "string_too_long":
        return (path, f"`{key}` must be at most {ctx['max_length']} characters long, got "
                f"{len(value)}", f"shorten `{field}`.", False)
    if kind == "finite_number":
        return (path, f"`{key}` must be a finite number, got {show(value)}",
                field_hint or _type_hint(path, tp), False)
    if kind == "string_pattern_mismatch":
        return (path, f"`{key}` has the wrong form, got {show(value)}",
                field_hint or f"it must match `{ctx['pattern']}`.", False)
    wrong_size = kind == "value_error" and describe_type(tp).startswith("a size")
    if kind == "literal_error" or kind.endswith(("_type", "_parsing")) or wrong_size:
        values = _literal_values(tp)
        guess = suggest(str(value), values) if isinstance(value, str) and values else None
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


def schema_problems(exc: ValidationError, report: Report) -> None:
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
