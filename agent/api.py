"""The agent's HTTP API (FastAPI): status, assignment, logs, metrics, healthz.

Every route but `/healthz` needs `Authorization: Bearer TOKEN` (compared in constant
time); anything else gets 401. Every failure, whatever raised it (a route, FastAPI's
routing or validation, an unexpected exception), is answered with one JSON shape,
`{"error": MESSAGE, "hint": WHAT TO DO}`, and never with a traceback. A body is read
only after the token is checked, and at most `MAX_BODY_BYTES` of it.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from agent.assignment import ID_MAX_LENGTH, NAME_PATTERN
from agent.engine_metrics import EngineSample
from agent.engine_scraper import EngineScraper, targets
from agent.errors import AgentError, shown
from agent.gpu_metrics import GpuReader
from agent.json_input import decode_json
from agent.logs import log_path, tail
from agent.metrics import render_metrics
from agent.reconcile import Reconciler, parse_assignment, write_assignment

log = logging.getLogger("agent.api")

# a thousand instances as the controller builds them are about 600 KB of compact JSON
# (800 KB indented)
MAX_BODY_BYTES: Final = 1024 * 1024
ROUTES: Final = ("GET /healthz, GET /v1/status, PUT /v1/assignment, "
                 "GET /v1/instances/ID/logs and GET /metrics")
_ID = re.compile(NAME_PATTERN)
_HINTS = {
    401: "send `Authorization: Bearer TOKEN` with the token in agent.toml's `token_file`.",
    404: f"the agent serves {ROUTES}.",
    405: f"the agent serves {ROUTES}.",
}


class RequestError(AgentError):
    """A request the API refuses; `status` is the HTTP status of the answer."""

    def __init__(self, status: int, message: str, hint: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.headers = headers


def error_response(status: int, message: str, hint: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one shape of every failure the API answers."""
    return JSONResponse({"error": message, "hint": hint}, status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def request_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestError)
        return error_response(exc.status, exc.message, exc.hint, exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # routing's 404 and 405 (with `Allow`), raised by Starlette itself
        assert isinstance(exc, HTTPException)
        message = f"{request.method} {shown(request.url.path, 100)}: {exc.detail}"
        return error_response(exc.status_code, message, _HINTS.get(exc.status_code, ""),
                              exc.headers)

    async def invalid_request(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        reasons = "; ".join(f"`{'.'.join(str(p) for p in e['loc'][1:])}`: {e['msg']}"
                            for e in exc.errors()[:5])
        return error_response(400, f"the request is invalid: {reasons}",
                              "see the API in docs/agent.md.")

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the agent's log (uvicorn prints it), not to the client
        log.error("%s %s failed: %s: %s", request.method, shown(request.url.path, 100),
                  type(exc).__name__, exc)
        return error_response(500, f"internal error: {type(exc).__name__}",
                              "report this with the agent's log (`journalctl -u stack-agent`).")

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)


def _check_json_type(request: Request) -> None:
    """A body without a type is taken as JSON; any other type than JSON is refused."""
    given = request.headers.get("content-type")
    if given is None:
        return
    media = given.partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestError(415, f"the assignment must be JSON, not `{given[:100]}`",
                           hint="send it with `Content-Type: application/json`.")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused with 413 beyond `limit` bytes (before reading it
    when `Content-Length` says so, else as soon as the stream passes it)."""
    too_big = RequestError(413, f"the body is larger than {limit} bytes",
                           hint="a thousand instances are about 600 KB of compact JSON; "
                           "send it without indentation, or check what is sent.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(reconciler: Reconciler, token: str, gpus: GpuReader,
               engines: EngineScraper | None = None) -> FastAPI:
    """The API bound to one running reconciler; `engines` None: no engine metrics."""
    app = FastAPI(title="modelstack agent", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    cfg = reconciler.cfg
    expected = token.encode()

    async def engine_samples() -> dict[str, EngineSample]:
        if engines is None:
            return {}
        return await engines.read(targets((r.inst, r.state) for r in reconciler.runners.values()))

    def authorized(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(errors="replace"), expected):
            raise RequestError(401, "missing or wrong bearer token", _HINTS[401],
                               headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/status", dependencies=auth)
    async def status() -> dict[str, Any]:
        body = reconciler.status()
        samples = await engine_samples()
        for inst in body["instances"]:
            if inst["id"] in samples:
                inst["engine"] = samples[inst["id"]].as_status(inst["backend"])
        body["gpu_source"], body["gpus"], body["gpu_error"] = await run_in_threadpool(gpus.read)
        return body

    @app.put("/v1/assignment", dependencies=auth)
    async def put_assignment(request: Request) -> JSONResponse:
        _check_json_type(request)
        body = await read_body(request)
        try:
            data = decode_json(body)
        except AgentError as exc:
            raise RequestError(400, exc.message, exc.hint) from None
        try:
            assignment = parse_assignment(data, cfg.node)
        except AgentError as exc:
            raise RequestError(422, exc.message, exc.hint) from None
        try:
            write_assignment(cfg, assignment)
        except OSError as exc:
            raise RequestError(
                500, f"the assignment could not be written to {cfg.assignment_file}: "
                f"{exc.strerror or exc}", hint="check the disk and the state folder's "
                "permissions on this host; running instances are unchanged.") from None
        reconciler.wake()
        return JSONResponse({"accepted": True, "instances": len(assignment.instances)})

    @app.get("/v1/instances/{instance_id}/logs", dependencies=auth)
    def logs(instance_id: str, tail_lines: int = Query(100, alias="tail", ge=0, le=100000)
             ) -> PlainTextResponse:
        # ids are checked before they touch the disk: no `..`, NUL, or name too long
        path = log_path(cfg.logs_dir, instance_id) if (
            len(instance_id) <= ID_MAX_LENGTH and _ID.fullmatch(instance_id)) else None
        if path is None or not path.exists():
            raise RequestError(404, f"no log for instance {shown(instance_id)} on {cfg.node}",
                               hint="`stack status` lists the instances of each node.")
        lines = tail(path, tail_lines)
        return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""))

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        status = reconciler.status()
        samples = await engine_samples()
        source, gpu_list, _error = await run_in_threadpool(gpus.read)
        return PlainTextResponse(render_metrics(status, source, gpu_list, samples),
                                 media_type="text/plain; version=0.0.4")

    return app
