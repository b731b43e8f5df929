"""The agent's errors: a `StackError` with a one-sentence message and a `hint:`.

    StackError (stack.errors)
    └── AgentError          a bad agent.toml, token file or assignment
        └── CommandError    an instance whose backend command cannot be built

Per-instance problems never raise out of the reconcile loop: they become the
instance's `failed` state with the same message and hint.
"""

from __future__ import annotations

from stack.errors import StackError


class AgentError(StackError):
    """The agent's configuration or input is wrong."""


class CommandError(AgentError):
    """A backend command line cannot be built from an instance."""

    def text(self) -> str:
        """Message and hint on one line, for an instance's `last_error`."""
        return f"{self.message} hint: {self.hint}" if self.hint else self.message
