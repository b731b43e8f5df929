"""The one exception tree of the controller.

    StackError                 any error the CLI reports as `error: ...` + `hint: ...`
    ├── ConfigError            stack.toml (syntax or schema), plan files, facts files
    ├── SourceError            a model source that cannot be read or understood
    │   └── MetadataUnavailable  ... right now (hub unreachable, gated, timeout)
    ├── EstimateError          a model the estimator cannot size
    ├── ConnectionError_       a host that does not answer or refuses us
    ├── ApplyError             apply failed on one or more hosts
    └── LockError              another apply holds the lock

Third-party errors (pyinfra, httpx, paramiko, pydantic) are translated into these at one
boundary with `raise ... from exc`; the CLI prints `str(err)` and `hint: {err.hint}`.

A problem that is reported rather than raised (a host that did not answer, a replica that
cannot be placed) is a `Problem`: the same message and hint, kept apart until rendered.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One sentence naming the file, key, host or flag, and what to do about it."""

    message: str
    hint: str = ""

    def render(self, prefix: str = "error: ") -> str:
        """`error: MESSAGE` and, on the next line, `hint: HINT`."""
        return f"{prefix}{self.message}" + (f"\nhint: {self.hint}" if self.hint else "")


class StackError(Exception):
    """An error with a one-sentence message and a hint that says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def problem(self) -> Problem:
        return Problem(self.message, self.hint)

    def render(self) -> str:
        """The two lines the CLI prints."""
        return self.problem.render()


class ConfigError(StackError):
    """stack.toml, a plan file or a facts file is wrong."""


class SourceError(StackError):
    """A model source cannot be resolved or read."""


class MetadataUnavailable(SourceError):
    """A model's metadata cannot be read right now (the hub does not answer, the model is
    gated and no token is set, a timeout): unknown, not wrong. Its running replicas stay."""


class EstimateError(StackError):
    """A model's memory cannot be estimated."""


class ConnectionError_(StackError):  # the builtin name is taken
    """A host does not answer or refuses the connection."""


class ApplyError(StackError):
    """Apply did not converge on every host."""


class LockError(StackError):
    """Another apply holds the stack's lock."""
