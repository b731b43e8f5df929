"""Environment for agents and backends: `env` at `[nodes."PATTERN"]` and per model.

A value is a string, or `{ from_env = "NAME" }`: read from the controller's environment
when `stack plan` and `stack apply` run, never written in stack.toml. Such a value never
enters a plan, a log or a message. The plan carries a keyed digest of it (HMAC-SHA256
under a key derived from the stack secret), so a new value shows as a change; apply fills
the values in when it writes each host's assignment.json (mode 0600), after checking that
they still have the digests the plan shows.

A node's `env` is the agent's own (its model downloads see `HF_TOKEN`, `HF_ENDPOINT`,
`HTTPS_PROXY`) and every instance's on that node; a model's `env` is its instances' and
wins over the node's, key by key.

    references(spec)       every `from_env` of stack.toml with its dotted key
    env_problems(...)      located errors: a variable that is not set, or holds a newline
    env_digests(...)       variable -> digest, what the plan carries
    split_env(...)         settings -> (plain values, `SecretEnv` without their values)
    with_env_values(...)   the assignments with the values filled in (apply)
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from agent.assignment import Assignment, SecretEnv
from stack.config.report import Loc, Report, dotted
from stack.errors import ConfigError
from stack.spec import FromEnv, StackSpec
from stack.tomlpos import locate

if TYPE_CHECKING:
    from stack.spec import EnvSetting

FROM_ENV_SHOWN = "from the controller's environment"
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def references(spec: StackSpec) -> list[tuple[Loc, str]]:
    """(dotted key of the value, variable name) of every `from_env` in stack.toml."""
    out: list[tuple[Loc, str]] = []
    tables: list[tuple[Loc, Mapping[str, EnvSetting]]] = [
        *((("nodes", p, "env"), n.env) for p, n in spec.nodes.items()),
        *((("models", m, "env"), model.env) for m, model in spec.models.items())]
    for base, env in tables:
        for key, value in env.items():
            if isinstance(value, FromEnv):
                out.append(((*base, key, "from_env"), value.from_env))
    return out


def env_problems(spec: StackSpec, environ: Mapping[str, str], text: str,
                 filename: str = "stack.toml") -> list[ConfigError]:
    """An error at each `from_env` whose variable is not set on the controller, or holds
    a control character (a newline would not survive the way to the backend); the value
    itself is never shown."""
    report = Report(filename, locate(text))
    for loc, var in references(spec):
        where = f"`{dotted(loc[:-1])}`"
        value = environ.get(var)
        if value is None:
            report.add(loc, f"{where} takes its value from `{var}`, which is not set in "
                       "the controller's environment",
                       f"`export {var}=...` before `stack plan` and `stack apply` (in CI: a "
                       "secret variable); the value never enters stack.toml, plans or logs.")
        elif _CONTROL.search(value):
            report.add(loc, f"{where} takes its value from `{var}`, which holds a control "
                       "character (a newline?)",
                       f"set `{var}` to one line of text, e.g. `export {var}=\"$(printf %s "
                       f"\"${var}\" | tr -d '\\n')\"`.")
    return report.sorted()


def digest_key(secret: bytes) -> bytes:
    """The key of the value digests, derived from the stack secret."""
    return hmac.new(secret, b"modelstack env digest", hashlib.sha256).digest()


def value_digest(key: bytes, var: str, value: str) -> str:
    """`hmac-sha256:HEX` of one value: shows a change, reveals nothing without the key."""
    mac = hmac.new(key, f"{var}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{mac}"


def env_digests(spec: StackSpec, environ: Mapping[str, str], secret: bytes) -> dict[str, str]:
    """Variable -> digest of its value, for every `from_env` whose variable is set."""
    key = digest_key(secret)
    return {var: value_digest(key, var, environ[var])
            for _, var in references(spec) if var in environ}


def split_env(settings: Mapping[str, EnvSetting], digests: Mapping[str, str]
              ) -> tuple[dict[str, str], dict[str, SecretEnv]]:
    """The plain values, and the `from_env` ones as `SecretEnv` (digest, no value)."""
    plain: dict[str, str] = {}
    secret: dict[str, SecretEnv] = {}
    for name, value in settings.items():
        if not isinstance(value, FromEnv):
            plain[name] = value
            continue
        digest = digests.get(value.from_env)
        if digest is None:
            raise ConfigError(f"`{value.from_env}` is not set in the controller's environment, "
                              f"and `env.{name}` takes its value from it",
                              hint=f"`export {value.from_env}=...` and run the command again.")
        secret[name] = SecretEnv(from_env=value.from_env, digest=digest)
    return plain, secret


def shown(plain: Mapping[str, str], secret: Mapping[str, SecretEnv]) -> str:
    """The names of an environment as the plan shows them: `A, HF_TOKEN (from the
    controller's environment)`; no value."""
    names = sorted({*plain, *secret})
    return ", ".join(f"{n} ({FROM_ENV_SHOWN})" if n in secret else n for n in names)


def with_env_values(assignments: Mapping[str, Assignment], environ: Mapping[str, str],
                    secret: bytes) -> dict[str, Assignment]:
    """The plan's assignments with every `from_env` value filled in: what apply writes.
    A variable that is unset, or holds another value than the plan's digest says, is an
    error (the plan would not say what apply does)."""
    key = digest_key(secret)
    filled: dict[tuple[str, str], SecretEnv] = {}

    def fill(items: Mapping[str, SecretEnv]) -> dict[str, SecretEnv]:
        out = {}
        for name, item in items.items():
            if (name, item.digest) not in filled:
                filled[(name, item.digest)] = _filled(key, name, item, environ)
            out[name] = filled[(name, item.digest)]
        return out

    result: dict[str, Assignment] = {}
    for node, a in assignments.items():
        if not a.secret_env and not any(i.secret_env for i in a.instances):
            result[node] = a
            continue
        instances = [i.model_copy(update={"secret_env": fill(i.secret_env)})
                     if i.secret_env else i for i in a.instances]
        result[node] = a.model_copy(update={"secret_env": fill(a.secret_env),
                                            "instances": instances})
    return result


def _filled(key: bytes, name: str, item: SecretEnv, environ: Mapping[str, str]) -> SecretEnv:
    var = item.from_env
    value = environ.get(var)
    if value is None:
        raise ConfigError(f"`{var}` is not set in the controller's environment, and the plan "
                          f"takes `env.{name}` from it",
                          hint=f"`export {var}=...` (the value the plan was made with) and "
                          "apply again.")
    if _CONTROL.search(value):
        raise ConfigError(f"`{var}` holds a control character (a newline?); `env.{name}` "
                          "takes its value from it", hint=f"set `{var}` to one line of text.")
    if not hmac.compare_digest(value_digest(key, var, value), item.digest):
        raise ConfigError(f"`{var}` holds another value than when the plan was made",
                          hint="run `stack plan` again and review it, or restore the value "
                          "the plan was made with.")
    return item.model_copy(update={"value": value})
