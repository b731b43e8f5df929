"""Manage the API keys clients use with the router.

  stack keys create NAME [--models a,b] [--owner X] [--rpm N] [--tpm N] [--expires DATE]
  stack keys list [--json]
  stack keys revoke NAME

`create` prints the new key once (on stdout, alone, so `KEY=$(stack keys create ci)`
works) and writes only its hash into stack.toml as a `[[keys]]` table; the rest of the
file, comments and layout included, is left as it was. `revoke` removes the table.
Run `stack apply` afterwards so the routers load the change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import tomlkit

from stack.config import NAME, check_text, load_text, read_text
from stack.errors import ConfigError
from stack.secrets import generate_key, hash_key
from stack.spec import KeySpec, StackSpec
from stack.tomlpos import locate

HELP = "create, list and revoke API keys"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key, print it once, store its hash")
    create.add_argument("name", help="name of the key (letters, digits, _ . -)")
    create.add_argument("--models", help="comma-separated models it may use (default: all)")
    create.add_argument("--owner", help="who holds the key")
    create.add_argument("--user", help="the [users.NAME] it belongs to (shares its quotas)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--expires", help="last day the key works, YYYY-MM-DD")
    listing = actions.add_parser("list", help="show the keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--user", help="only the keys of this [users.NAME]")
    revoke = actions.add_parser("revoke", help="remove a key from stack.toml")
    revoke.add_argument("name", help="name of the key")
    for action in (create, listing, revoke):  # `-f` also after the action
        action.add_argument("-f", "--file", default=argparse.SUPPRESS,
                            help="the stack file (default: ./stack.toml)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if args.keys_action == "create":
        return _create(path, args)
    if args.keys_action == "list":
        return _list(path, args.json, date.today(), args.user)
    return _revoke(path, args.name)


# ---------------------------------------------------------------------------- create


def _create(path: Path, args: argparse.Namespace) -> int:
    text = read_text(path)
    spec = load_text(text, path.name, base_dir=path.parent)
    entry = _new_entry(spec, args, date.today())
    key = generate_key()
    entry["hash"] = hash_key(key)
    updated = add_key_table(text, entry)
    _, problems = check_text(updated, path.name)
    if problems:
        raise problems[0]
    _write(path, updated)
    print(key)
    print(f"Created key `{entry['name']}`; only its hash is in {path.name}. The key is shown "
          "only this once: store it now, then run `stack apply`.", file=sys.stderr)
    return 0


def _new_entry(spec: StackSpec, args: argparse.Namespace, today: date) -> dict[str, Any]:
    """The `[[keys]]` values from the command line, checked (hash added by the caller)."""
    name: str = args.name
    if not NAME.match(name):
        raise ConfigError(f"`{name}` is not a valid key name",
                          hint="use letters, digits, `_`, `.` and `-`, starting with a letter "
                          "or digit.")
    if any(k.name == name for k in spec.keys):
        raise ConfigError(f"a key named `{name}` already exists in stack.toml",
                          hint=f"choose another name, or `stack keys revoke {name}` first.")
    entry: dict[str, Any] = {"name": name, "hash": ""}  # the caller sets the hash
    if args.owner:
        entry["owner"] = args.owner
    if args.user:
        entry["user"] = _user(spec, args.user)
    if args.models:
        entry["models"] = _models(spec, args.models)
    for flag in ("rpm", "tpm"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ConfigError(f"`--{flag}` must be at least 1, got {value}",
                                  hint=f"leave `--{flag}` out for no limit.")
            entry[flag] = value
    if args.expires:
        entry["expires"] = _expiry(args.expires, today)
    return entry


def _models(spec: StackSpec, text: str) -> list[str]:
    import difflib

    known = list(spec.models) + [a for m in spec.models.values() for a in m.aliases]
    models = [m.strip() for m in text.split(",") if m.strip()]
    for model in models:
        if model not in known:
            close = difflib.get_close_matches(model, known, n=1)
            raise ConfigError(f"`--models`: `{model}` is not a model in stack.toml",
                              hint=f"did you mean `{close[0]}`?" if close else
                              "give model names or aliases from `[models]`, separated by commas.")
    return models


def _user(spec: StackSpec, name: str) -> str:
    if name not in spec.users:
        known = ", ".join(f"`{u}`" for u in sorted(spec.users)) or "there are none"
        raise ConfigError(f"`--user`: `{name}` is not a `[users.NAME]` table in stack.toml",
                          hint=f"add `[users.{name}]` first (users: {known}).")
    return name


def _expiry(text: str, today: date) -> date:
    try:
        expires = date.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"`--expires` must be a date YYYY-MM-DD, got `{text}`",
                          hint="e.g. `--expires 2027-01-31` (the last day the key works).") from exc
    if expires < today:
        raise ConfigError(f"`--expires` {text} is in the past",
                          hint="give the last day the key should work.")
    return expires


def add_key_table(text: str, entry: dict[str, Any]) -> str:
    """stack.toml text with one more `[[keys]]` table; everything else stays byte-identical.

    The table goes right after the last `[[keys]]` table's values (comments that lead
    into the next table stay with it), else at the end of the file; tomlkit renders it
    and checks the result means the same as appending the key.
    """
    doc = tomlkit.parse(text)
    existing = doc.get("keys")
    if existing is not None and not isinstance(existing, tomlkit.items.AoT):
        inline = tomlkit.inline_table()  # `keys = [...]` written inline
        inline.update(entry)
        existing.append(inline)
        return doc.as_string()
    block = tomlkit.document()
    block.append("keys", tomlkit.aot())
    block["keys"].append(tomlkit.table())
    for field, value in entry.items():
        block["keys"][0].add(field, value)
    rendered = "\n" + block.as_string()
    if existing is None:
        updated = text + ("" if text.endswith("\n") or not text else "\n") + rendered
    else:
        lines = text.splitlines(keepends=True)
        _, end = _table_span(text, len(existing) - 1)
        if not lines[end - 1].endswith("\n"):
            lines[end - 1] += "\n"
        updated = "".join(lines[:end]) + rendered + "".join(lines[end:])
    expected = doc.unwrap()
    expected.setdefault("keys", []).append(entry)
    if tomlkit.parse(updated).unwrap() != expected:  # pragma: no cover - a layout we missed
        raise ConfigError("stack.toml is laid out in a way `stack keys` cannot edit safely",
                          hint="add the `[[keys]]` table by hand.")
    return updated


def _table_span(text: str, index: int) -> tuple[int, int]:
    """Lines [start, end) of the `index`-th `[[keys]]` table: its header to its last value."""
    headers = locate(text).headers
    start = next(line for line, table in headers if table == ("keys", index)) - 1
    lines = text.splitlines(keepends=True)
    later = [line for line, _ in headers if line - 1 > start]
    end = (later[0] - 1) if later else len(lines)
    # comments and blank lines that lead into the next table belong to it
    while end > start + 1 and (not lines[end - 1].strip()
                               or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return start, end


# ---------------------------------------------------------------------------- revoke


def _revoke(path: Path, name: str) -> int:
    text = read_text(path)
    spec = load_text(text, path.name, base_dir=path.parent)
    names = [k.name for k in spec.keys]
    if name not in names:
        raise ConfigError(f"no key named `{name}` in stack.toml",
                          hint="`stack keys list` shows the keys: "
                          + (", ".join(f"`{n}`" for n in names) if names else "there are none")
                          + ".")
    updated = remove_key_table(text, names.index(name))
    _, problems = check_text(updated, path.name)
    if problems:  # e.g. the router listens off loopback and this was the last key
        raise ConfigError(f"revoking `{name}` would leave stack.toml invalid: "
                          f"{problems[0].message}", hint=problems[0].hint)
    _write(path, updated)
    print(f"Revoked key `{name}`; run `stack apply` so the routers stop accepting it.")
    return 0


def remove_key_table(text: str, index: int) -> str:
    """stack.toml text without the `index`-th key; the rest of the text stays byte-identical.

    A `[[keys]]` table is cut out of the text from its header to its last value (with
    the blank line before it); tomlkit checks the result means the same as removing the
    key, and does the removal itself when the text is laid out otherwise (inline keys).
    """
    doc = tomlkit.parse(text)
    keys = doc["keys"]
    del keys[index]
    if not keys:
        del doc["keys"]
    expected = doc.unwrap()
    cut = _cut_table(text, index)
    if cut is not None and tomlkit.parse(cut).unwrap() == expected:
        return cut
    return doc.as_string()


def _cut_table(text: str, index: int) -> str | None:
    try:
        start, end = _table_span(text, index)
    except StopIteration:
        return None
    lines = text.splitlines(keepends=True)
    if start > 0 and not lines[start - 1].strip():
        start -= 1  # the blank line that separated it from what came before
    return "".join(lines[:start] + lines[end:])


# ---------------------------------------------------------------------------- list


def _list(path: Path, as_json: bool, today: date, user: str | None = None) -> int:
    spec = load_text(read_text(path), path.name, base_dir=path.parent)
    if user is not None:
        _user(spec, user)
    rows = [_row(key, today) for key in spec.keys if user is None or key.user == user]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"No keys of the user `{user}`." if user else
              "No keys. Create one with `stack keys create NAME`.")
        return 0
    columns = ["name", "owner", "user", "models", "rpm", "tpm", "expires", "expired"]
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _row(key: KeySpec, today: date) -> dict[str, Any]:
    return {
        "name": key.name, "owner": key.owner, "user": key.user, "models": key.models,
        "rpm": key.rpm, "tpm": key.tpm,
        "expires": key.expires.isoformat() if key.expires else None,
        "expired": key.expires is not None and key.expires < today,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(value) or "all"
    return str(value)


def _write(path: Path, text: str) -> None:
    """Replace the file atomically, keeping its mode."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
