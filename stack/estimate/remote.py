"""Headers of remote files read with HTTP range requests (no weights downloaded).

A GGUF on the hub is copied as its first bytes only (8 MiB, grown until the header parses):
the header reader never reads past the header.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

_FIRST = 8 * 1024 * 1024
_MAX = 256 * 1024 * 1024


def _range(url: str, start: int, end: int) -> bytes:
    import httpx
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}"}
    with httpx.Client(follow_redirects=True, timeout=30) as client:
        response = client.get(url, headers=headers)
        response.raise_for_status()
        return response.content


def hf_header_copy(repo: str, filename: str, revision: str | None) -> Path:
    """A local file whose first bytes are the remote GGUF's header (enough to parse it)."""
    from huggingface_hub import hf_hub_url

    from stack.errors import SourceError
    from stack.estimate.gguf_header import read_gguf_header

    url = hf_hub_url(repo, filename, revision=revision)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"stack-header-{key}.gguf"
    size = _FIRST
    while True:
        path.write_bytes(_range(url, 0, size - 1))
        try:
            read_gguf_header(path)
            return path
        except SourceError:
            if size >= _MAX:
                raise
            size *= 4
