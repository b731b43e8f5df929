"""Token counts of a request: estimated before it is sent (for `tpm`), read from the
replica's answer after (a JSON body's `usage`, or the usage chunk of an SSE stream).

Pure: bytes and documents in, counts and the bytes to pass on out (or a 400 for a
`max_tokens` that is no token count).
"""

from __future__ import annotations

from typing import Any

import orjson

from router.errors import bad_request

DEFAULT_MAX_TOKENS = 256
"""Completion tokens reserved against `tpm` when the request does not say `max_tokens`."""
TOKEN_LIMIT = 2**31 - 1
"""More tokens than this in one request or answer is absurd (no model comes near it): a
`max_tokens` above it is refused, a usage count above it ignored. It also keeps the
shared int64 counters far from overflowing."""


def _count(value: Any) -> int | None:
    """`value` if it is a token count: an int from 0 to TOKEN_LIMIT (not a bool)."""
    return value if type(value) is int and 0 <= value <= TOKEN_LIMIT else None


class Usage:
    """The tokens one request used, as the replica reported them."""

    __slots__ = ("completion_tokens", "drop", "prompt_tokens")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.drop = False
        """The router asked for the stream's usage chunk on the client's behalf: keep it
        from the client (see `ask_for_usage`)."""

    def add(self, usage: dict[str, Any]) -> None:
        """Count one `usage` object (`completion_tokens` may be missing: total - prompt).
        A stream's usage objects are running totals (vLLM's continuous usage, Anthropic's
        `message_start` then `message_delta`): the largest count of each kind is kept. A
        count that is negative, absurd or not an integer is ignored, so a replica's answer
        never makes a counter go back."""
        # the checks of `_count` written out: this runs for every answer. The Responses
        # and Messages APIs say `input_tokens` and `output_tokens`
        prompt = usage.get("prompt_tokens")
        if prompt is None:
            prompt = usage.get("input_tokens")
        if type(prompt) is int and 0 <= prompt <= TOKEN_LIMIT:
            if prompt > self.prompt_tokens:
                self.prompt_tokens = prompt
        else:
            prompt = None
        completion = usage.get("completion_tokens")
        if completion is None:
            completion = usage.get("output_tokens")
        if not (type(completion) is int and 0 <= completion <= TOKEN_LIMIT):
            total = _count(usage.get("total_tokens"))
            completion = total - prompt if prompt is not None and total is not None \
                and total >= prompt else 0
        if completion > self.completion_tokens:
            self.completion_tokens = completion

    def count(self, body: bytes) -> None:
        """Count the usage of a whole JSON response body, if it has one."""
        usage = find_usage(body)
        if usage is not None:
            self.add(usage)

    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def estimate_tokens(body_size: int, doc: dict[str, Any], generates: bool) -> int:
    """Tokens to reserve against `tpm` at admission: about 4 bytes a prompt token, plus
    the completion's `max_tokens` (DEFAULT_MAX_TOKENS when a `generates` endpoint
    does not say). A `max_tokens` that is no token count is refused with a 400: a
    negative one would reserve negative tokens, freeing the key's budget."""
    if doc.get("max_tokens") is None and doc.get("max_completion_tokens") is None \
            and doc.get("max_output_tokens") is None:
        return body_size // 4 + (DEFAULT_MAX_TOKENS if generates else 0)
    max_tokens = None
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = doc.get(field)
        if value is not None:
            max_tokens = _count(value)
            if max_tokens is None:
                raise bad_request(f"`{field}` must be a whole number from 0 to {TOKEN_LIMIT}, "
                                  f"got {str(value)[:40]}; leave it out for the default",
                                  field)
    if max_tokens is not None:
        return body_size // 4 + max_tokens
    return body_size // 4 + (DEFAULT_MAX_TOKENS if generates else 0)


def ask_for_usage(doc: dict[str, Any]) -> bool:
    """Make a streamed request end with a usage chunk; True when the client had not asked
    for it (so the router must drop it again)."""
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    doc["stream_options"] = {**(options if isinstance(options, dict) else {}),
                             "include_usage": True}
    return True


def find_usage(body: bytes) -> dict[str, Any] | None:
    """The last non-null `"usage": {...}` object in a JSON body, without parsing all of it."""
    pos = len(body)
    while True:
        pos = body.rfind(b'"usage"', 0, pos)
        if pos < 0:
            return None
        start = body.find(b"{", pos + 7, pos + 64)
        if start >= 0 and body[pos + 7:start].strip(b" \t\r\n:") == b"":
            return _object_at(body, start)


def _object_at(body: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object starting at `body[start]` (at most 4 KiB), if it is one: it ends at
    the first `}` where as many `{` as `}` were seen (found with `find` and `count`, not
    a loop over the bytes: this runs for every answer)."""
    limit = min(len(body), start + 4096)
    opened, closed, pos = 1, 0, start + 1
    while True:
        end = body.find(b"}", pos, limit)
        if end < 0:
            return None
        opened += body.count(b"{", pos, end)
        closed += 1
        if opened == closed:
            try:
                usage = orjson.loads(body[start:end + 1])
            except orjson.JSONDecodeError:
                return None
            return usage if isinstance(usage, dict) else None
        pos = end + 1


def has_usage(events: bytes) -> bool:
    """Does this SSE text carry a non-null usage object?"""
    pos = events.find(b'"usage"')
    while pos >= 0:
        rest = events[pos + 7:pos + 16].lstrip(b" :")
        if rest.startswith(b"{"):
            return True
        pos = events.find(b'"usage"', pos + 7)
    return False


def take_usage(events: bytes, usage: Usage) -> bytes:
    """Count the usage in whole SSE events; the events to pass on (with `usage.drop`,
    without the usage-only chunk, and with `"usage": null` in the others)."""
    kept = []
    for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not has_usage(event):
            kept.append(event)
            continue
        payload = event.partition(b"data:")[2].strip()
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            kept.append(event)
            continue
        found = doc.get("usage") if isinstance(doc, dict) else None
        if found is None:  # nested: a Responses `response.completed` or Messages start
            found = find_usage(payload)
        if isinstance(found, dict):
            usage.add(found)
        if usage.drop and isinstance(doc, dict) and not doc.get("choices"):
            continue
        if usage.drop and isinstance(doc, dict):
            doc["usage"] = None
            event = b"data: " + orjson.dumps(doc)
        kept.append(event)
    return b"\n\n".join(kept)
