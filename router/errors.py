"""The router's errors: the ones it prints, and the ones it answers to clients.

    RouterError        `error: ...` + `hint: ...` on stderr (`stack-router` exits 1)
    └── ConfigError    router.json cannot be read or is invalid
    ApiError           an HTTP error answered in OpenAI's shape

The router stands alone, without the controller's package: it keeps its own small tree,
and `stack-router` prints its errors exactly as the controller's CLI does.
"""

from __future__ import annotations

import orjson


class RouterError(Exception):
    """An error with a one-sentence message and a hint that says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The two lines the CLI prints."""
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class ConfigError(RouterError):
    """router.json cannot be read, parsed or validated."""


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, code: str | None,
                 param: str | None = None, retry_after: int = 0, allow: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.retry_after, self.allow = param, retry_after, allow

    def headers(self) -> bytes:
        """The answer's extra header lines: `Retry-After` (429), `Allow` (405)."""
        extra = b"Retry-After: %d\r\n" % self.retry_after if self.retry_after else b""
        return extra + b"Allow: %s\r\n" % self.allow if self.allow else extra

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}})


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 `invalid_request_error`: the client's request is malformed."""
    return ApiError(400, message, "invalid_request_error", None, param)
