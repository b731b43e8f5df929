"""Finding one field of a multipart/form-data body from its first bytes only.

The router reads the head of an upload until the `model` field is complete, then streams
the rest upstream without buffering it.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def boundary(content_type: bytes) -> bytes | None:
    """The boundary parameter of a multipart content type."""
    match = _BOUNDARY.search(content_type)
    return match.group(1).strip() if match else None


def find_field(head: bytes, boundary: bytes, name: bytes) -> bytes | None:
    """The value of form field `name` if `head` holds it whole, else None (read more)."""
    delimiter = b"--" + boundary
    pos = head.find(delimiter)
    while pos >= 0:
        start = pos + len(delimiter)
        if head[start:start + 2] == b"--":
            return None  # closing delimiter: the field is not there
        end_headers = head.find(b"\r\n\r\n", start)
        if end_headers < 0:
            return None
        part_headers = head[start:end_headers]
        value_end = head.find(b"\r\n" + delimiter, end_headers + 4)
        match = _NAME.search(part_headers)
        if match and match.group(1) == name:
            return head[end_headers + 4:value_end] if value_end >= 0 else None
        if value_end < 0:
            return None
        pos = value_end + 2
    return None
