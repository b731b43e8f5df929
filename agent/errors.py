"""The agent's errors: a one-sentence message and a `hint:` that says what to do.

    AgentError              a bad agent.toml, token file or assignment
    ├── CommandError        an instance whose backend command cannot be built
    └── RequestError        (agent.api) a request the API refuses, with its HTTP status

The agent stands alone (it imports nothing of the controller), so its root is its own;
`render()` prints the same two lines as the controller's errors.

Per-instance problems never raise out of the reconcile loop: they become the
instance's `failed` state with the same message and hint. The API answers every
failure as `{"error": message, "hint": hint}`.
"""

from __future__ import annotations

import json
from typing import Any


class AgentError(Exception):
    """The agent's configuration or input is wrong."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The two lines `stack-agent` prints: `error: ...` and, if there is one, `hint: ...`."""
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class CommandError(AgentError):
    """A backend command line cannot be built from an instance."""

    def text(self) -> str:
        """Message and hint on one line, for an instance's `last_error`."""
        return f"{self.message} hint: {self.hint}" if self.hint else self.message


def shown(value: Any, limit: int = 40) -> str:
    """A value from outside the agent, for a message: JSON (escaped), cut to `limit`."""
    text = json.dumps(value) if isinstance(value, (bool, int, float, str)) or value is None \
        else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."
