"""A tiny, fast OpenAI-shaped upstream with canned answers, for benchmarks and fault tests.

    python bench/router/canned_upstream.py --port 0 [--chunks 100] [--api-key K]

Prints `canned: listening on PORT` once it listens. Answers:
- `POST /v1/chat/completions`, `/v1/completions`: a fixed completion; with `"stream": true`
  an SSE stream of `--chunks` chunks (plus a usage chunk when
  `stream_options.include_usage` is set).
- `POST /v1/embeddings`: a fixed vector; `POST /v1/audio/transcriptions`: the number of
  body bytes received (and two segments when `response_format` is `verbose_json`);
  `POST /v1/audio/speech`: `SPEECH` (audio/mpeg) in 4 chunked pieces, `"canned_gap": S`
  seconds apart; `POST /v1/images/generations`: one image
  whose `b64_json` is `IMAGE_B64`; `POST /v1/images/edits` (multipart): the same, with the
  `response_format` it was asked for; `POST /v1/audio/translations`: as transcriptions;
  `POST /v1/responses` and `/v1/messages`: a Responses / Anthropic Messages answer, with
  `"stream": true` their event streams (usage in `response.completed`, `message_start`
  and `message_delta`); `GET /health`: ok.
`--served-name NAME` answers 404 (as vLLM does) to a request whose `model` (JSON or form
field) is another name.
Faults, per request through extra body fields: `"canned_status": 503` answers that status,
`"canned_die_after": N` kills the connection after N stream chunks, `"canned_delay": S`
waits S seconds before answering, `"canned_usage": {...}` answers that usage (a chat
completion). `--status` and `--delay` set them for every request.
Every answer carries `x-canned-port` (which replica answered) and counts requests in
`GET /stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from typing import cast

import httptools

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
SPEECH = b"ID3canned-audio" + bytes(range(256)) * 64
IMAGE_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
             "AAAABJRU5ErkJggg==")


def completion(model: str, usage: object = None) -> bytes:
    return json.dumps({
        "id": "chatcmpl-canned", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Hello from the canned upstream."}}],
        "usage": USAGE if usage is None else usage,
    }).encode()


def chunk(model: str, i: int, usage: bool) -> bytes:
    doc: dict[str, object] = {
        "id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
    }
    if usage:
        doc["usage"] = None
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def responses(model: str) -> list[dict[str, object]]:
    """The Responses API's stream (its events, `response.completed` last but one) and,
    last, its whole answer."""
    usage = {"input_tokens": 12, "output_tokens": 4, "total_tokens": 16}
    done: dict[str, object] = {
        "id": "resp_canned", "object": "response", "created_at": 1, "status": "completed",
        "model": model, "output": [{"type": "message", "id": "msg_canned", "status":
                                    "completed", "role": "assistant", "content": [
            {"type": "output_text", "text": "Hello from the canned upstream.",
             "annotations": []}]}], "usage": usage}
    return [{"type": "response.created", "sequence_number": 0,
             "response": {**done, "status": "in_progress", "output": [], "usage": None}},
            {"type": "response.output_text.delta", "sequence_number": 1, "item_id":
             "msg_canned", "output_index": 0, "content_index": 0, "delta": "Hello"},
            {"type": "response.completed", "sequence_number": 2, "response": done}, done]


def messages(model: str) -> list[dict[str, object]]:
    """The Anthropic Messages stream (usage in `message_start` and `message_delta`) and,
    last, its whole answer."""
    message: dict[str, object] = {
        "id": "msg_canned", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Hello from the canned upstream."}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6}}
    return [{"type": "message_start", "message": {**message, "content": [],
                                                  "usage": {"input_tokens": 12,
                                                            "output_tokens": 0}}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "Hello"}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 6}},
            {"type": "message_stop"}, message]


class Server(asyncio.Protocol):
    def __init__(self, opts: argparse.Namespace, stats: dict[str, int]) -> None:
        self.opts = opts
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.auth = b""
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body, self.auth = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.auth = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        asyncio.get_running_loop().create_task(self.answer(self.url, b"".join(self.body),
                                                           self.auth))

    def send(self, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\nx-canned-port: %d\r\n"
            b"\r\n%s" % (status, ctype, len(body), self.opts.port_real, body))
        if not self.keep_alive:
            self.transport.close()

    async def answer(self, url: bytes, raw: bytes, auth: bytes) -> None:
        path = url.split(b"?")[0]
        self.stats[path.decode()] = self.stats.get(path.decode(), 0) + 1
        if self.opts.api_key and auth != b"Bearer " + self.opts.api_key.encode():
            self.send(401, b'{"error":{"message":"bad key","type":"auth","code":401}}')
            return
        if path == b"/health":
            self.send(200, b'{"status":"ok"}')
            return
        if path == b"/stats":
            self.send(200, json.dumps(self.stats).encode())
            return
        multipart = path in (b"/v1/audio/transcriptions", b"/v1/audio/translations",
                             b"/v1/images/edits")
        served = self.opts.served_name
        if served and multipart and f'name="model"\r\n\r\n{served}\r\n'.encode() not in raw:
            self.send(404, b'{"error":{"message":"The model does not exist.","code":404}}')
            return
        if path == b"/v1/images/edits":
            how = re.search(rb'name="response_format"\r\n\r\n([^\r]*)\r\n', raw)
            self.send(200, json.dumps({"created": 1, "data": [{"b64_json": IMAGE_B64}],
                                       "asked": how.group(1).decode() if how else None,
                                       "bytes": len(raw)}).encode())
            return
        if multipart:
            answer: dict[str, object] = {"text": "canned", "bytes": len(raw)}
            if b'name="response_format"\r\n\r\nverbose_json\r\n' in raw:
                answer.update(duration=2.5, segments=[
                    {"id": 0, "start": 0.0, "end": 1.25, "text": " canned"},
                    {"id": 1, "start": 1.25, "end": 2.5, "text": " words"}])
            self.send(200, json.dumps(answer).encode())
            return
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            self.send(400, b'{"error":{"message":"bad json"}}')
            return
        delay = doc.get("canned_delay", self.opts.delay)
        if delay:
            await asyncio.sleep(delay)
        status = doc.get("canned_status", self.opts.status)
        if status != 200:
            self.send(status, b'{"error":{"message":"canned failure","type":"server_error"}}')
            return
        model = str(doc.get("model", "canned"))
        if served and model != served:
            self.send(404, json.dumps({"error": {
                "message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                "code": 404}}).encode())
            return
        if path in (b"/v1/responses", b"/v1/messages"):
            events = responses(model) if path == b"/v1/responses" else messages(model)
            if doc.get("stream"):
                await self.events(events[:-1])
            else:
                self.send(200, json.dumps(events[-1]).encode())
            return
        if path == b"/v1/audio/speech":
            await self.speech(float(doc.get("canned_gap", 0)))
        elif path == b"/v1/images/generations":
            self.send(200, json.dumps({"created": 1, "data": [
                {"b64_json": IMAGE_B64, "revised_prompt": doc.get("prompt")}]}).encode())
        elif path == b"/v1/embeddings":
            self.send(200, json.dumps({"object": "list", "model": model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode())
        elif doc.get("stream"):
            await self.stream(model, doc)
        else:
            self.send(200, completion(model, doc.get("canned_usage")))

    async def events(self, events: list[dict[str, object]]) -> None:
        """An SSE stream of named events (`event:` and `data:` lines), as the Responses and
        Messages APIs stream."""
        assert self.transport is not None
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nx-canned-port: %d\r\n\r\n" % self.opts.port_real)
        for event in events:
            data = b"event: %s\ndata: %s\n\n" % (str(event["type"]).encode(),
                                                  json.dumps(event).encode())
            t.write(b"%x\r\n%s\r\n" % (len(data), data))
        t.write(b"0\r\n\r\n")
        if not self.keep_alive:
            t.close()

    async def speech(self, gap: float) -> None:
        assert self.transport is not None
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n"
                b"Transfer-Encoding: chunked\r\nx-canned-port: %d\r\n\r\n" % self.opts.port_real)
        step = len(SPEECH) // 4 + 1
        for i in range(0, len(SPEECH), step):
            piece = SPEECH[i:i + step]
            t.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if gap:
                await asyncio.sleep(gap)
        t.write(b"0\r\n\r\n")
        if not self.keep_alive:
            t.close()

    async def stream(self, model: str, doc: dict[str, object]) -> None:
        assert self.transport is not None
        opts = doc.get("stream_options")
        usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        die = doc.get("canned_die_after")
        die_after = int(die) if isinstance(die, int) else None
        n = int(doc.get("canned_chunks", self.opts.chunks))  # type: ignore[call-overload]
        gap = float(doc.get("canned_gap", 0))  # type: ignore[arg-type]
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nx-canned-port: %d\r\n\r\n" % self.opts.port_real)
        for i in range(n):
            if die_after is not None and i >= die_after:
                t.abort()
                return
            data = chunk(model, i, usage)
            t.write(b"%x\r\n%s\r\n" % (len(data), data))
            if gap:
                await asyncio.sleep(gap)
            elif i % 16 == 15:
                await asyncio.sleep(0)
        tail = b""
        if usage:
            tail += b"data: " + json.dumps({
                "id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": n,
                          "total_tokens": 10 + n}}).encode() + b"\n\n"
        tail += b"data: [DONE]\n\n"
        t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        if not self.keep_alive:
            t.close()


async def serve(opts: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stats: dict[str, int] = {}
    server = await loop.create_server(lambda: Server(opts, stats), opts.host, opts.port,
                                      backlog=1024)
    opts.port_real = server.sockets[0].getsockname()[1]
    print(f"canned: listening on {opts.port_real}", flush=True)
    sys.stdout.flush()
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--served-name", default="")
    opts = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(opts))
    except ImportError:
        asyncio.run(serve(opts))


if __name__ == "__main__":
    main()
