"""The prompt a request starts with, as a key for `balancing = "prefix"`.

A replica's prompt cache (llama-server's slots and `--cache-ram`, vLLM's and SGLang's
prefix caches) saves the prefill of a prompt whose start it has already seen. Sending
requests that start alike to the same replica (`router.balance`: the key's home, learned
per worker, bounded by load) keeps those caches warm and makes them add up rather than each hold the
same prompts.

The key is a hash of the prompt's first PREFIX_BLOCK characters in a canonical form: for
chat (and Anthropic messages) each message's role and text in order (text parts' text, an
image part by its URL, other parts as a bare separator), for completions the prompt, for
responses the `instructions` then the `input`. One block and no more: requests sharing a
system prompt of at least a block get the same key whatever follows, a conversation keeps
its key as it grows, and the key itself needs no state (every worker and every router host
computes the same one). A prompt shorter than a block has no key and is balanced by load.

Pure and bounded: every step but a message's first part adds at least one character, so
at most 2 * PREFIX_BLOCK steps and PREFIX_BLOCK characters are read whatever the document
holds. `tools` and other fields that chat
templates render into the prompt are not read: requests that differ only there share a key
(the cost is a weaker cache hit, never a wrong answer).
"""

from __future__ import annotations

import hashlib
from typing import Any

PREFIX_BLOCK = 1024
"""Characters of canonical prompt text in the key: about 250 tokens of English. A system
prompt at least this long maps every conversation using it to one replica. Shorter
prompts take a few milliseconds of prefill on a GPU, so balancing them by load is worth
more than a cache hit; a larger block would split conversations whose shared system
prompt is shorter than the block (the key would reach into their differing messages). A
conversation with a shorter system prompt still gets one key once it passes a block."""

_MESSAGE, _PART = "\x1e", "\x1f"
"""Separators of the canonical text: before each message (then its role), between parts."""


class _Block:
    """The canonical text read so far, up to PREFIX_BLOCK characters."""

    __slots__ = ("left", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.left = PREFIX_BLOCK

    def add(self, text: str) -> bool:
        """Append `text` (cut at the block's end); True once the block is full."""
        piece = text[:self.left]
        self.parts.append(piece)
        self.left -= len(piece)
        return self.left <= 0


def prefix_key(endpoint: str, doc: dict[str, Any]) -> str | None:
    """A key for the first block of the request's prompt, or None when the prompt is
    shorter than a block or `endpoint` has none (embeddings, audio, images)."""
    block = _Block()
    if endpoint == "chat":
        _messages(block, doc.get("messages"))
    elif endpoint == "completions":
        _prompt(block, doc.get("prompt"))
    elif endpoint == "responses":
        _content(block, doc.get("instructions"))
        _messages(block, doc.get("input"))
    elif endpoint == "messages":
        _content(block, doc.get("system"))
        _messages(block, doc.get("messages"))
    else:
        return None
    if block.left > 0:
        return None
    text = "".join(block.parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def _messages(block: _Block, messages: object) -> None:
    """Each message's role and content, in order; a string is one user message (as the
    Responses API's `input` may be)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list):
        return
    for message in messages:
        if block.left <= 0:
            return
        role = message.get("role") if isinstance(message, dict) else None
        if block.add(_MESSAGE + role if isinstance(role, str) else _MESSAGE):
            return
        if isinstance(message, dict):
            _content(block, message.get("content"))


def _content(block: _Block, content: object) -> None:
    """A string, or a list of parts: text parts by their text, images by their URL. A
    separator comes between parts, so one text part is the same as its string."""
    if isinstance(content, str):
        block.add(content)
        return
    if not isinstance(content, list):
        return
    for i, part in enumerate(content):
        if block.left <= 0 or (i and block.add(_PART)):
            return
        if not isinstance(part, dict):
            continue
        text = part.get("text")
        if isinstance(text, str):
            block.add(text)
            continue
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if isinstance(url, str):
            block.add(url)


def _prompt(block: _Block, prompt: object) -> None:
    """A completion's prompt: a string, token ids, or a batch of either (its first)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        block.add(prompt)
        return
    if not isinstance(prompt, list):
        return
    for token in prompt:
        if block.add(f"{token}," if isinstance(token, int) else _PART):
            return
