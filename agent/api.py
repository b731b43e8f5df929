"""The agent's HTTP API (FastAPI): status, assignment, logs, metrics, healthz.

Every route but `/healthz` needs `Authorization: Bearer TOKEN` (compared in constant
time); anything else gets 401.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from agent.errors import AgentError
from agent.gpu_metrics import GpuReader
from agent.logs import log_path, tail
from agent.metrics import render_metrics
from agent.reconcile import Reconciler, parse_assignment, write_assignment


def create_app(reconciler: Reconciler, token: str, gpus: GpuReader) -> FastAPI:
    """The API bound to one running reconciler."""
    app = FastAPI(title="modelstack agent", docs_url=None, redoc_url=None, openapi_url=None)
    cfg = reconciler.cfg
    expected = token.encode()

    def authorized(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                  expected):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/status", dependencies=auth)
    def status() -> dict[str, Any]:
        body = reconciler.status()
        body["gpu_source"], body["gpus"], body["gpu_error"] = gpus.read()
        return body

    @app.put("/v1/assignment", dependencies=auth)
    async def put_assignment(request: Request) -> JSONResponse:
        try:
            data = json.loads(await request.body())
        except ValueError as exc:
            return JSONResponse({"error": f"the assignment is not valid JSON: {exc}",
                                 "hint": "send the JSON that `stack apply` writes."}, 400)
        try:
            assignment = parse_assignment(data, cfg.node)
        except AgentError as exc:
            return JSONResponse({"error": exc.message, "hint": exc.hint}, 422)
        write_assignment(cfg, assignment)
        reconciler.wake()
        return JSONResponse({"accepted": True, "instances": len(assignment.instances)})

    @app.get("/v1/instances/{instance_id}/logs", dependencies=auth)
    def logs(instance_id: str, tail_lines: int = Query(100, alias="tail", ge=0, le=100000)
             ) -> PlainTextResponse:
        path = log_path(cfg.logs_dir, instance_id)
        if "/" in instance_id or instance_id.startswith(".") or not path.exists():
            raise HTTPException(404, f"no log for instance `{instance_id}` on {cfg.node}")
        lines = tail(path, tail_lines)
        return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""))

    @app.get("/metrics", dependencies=auth)
    def metrics() -> PlainTextResponse:
        source, gpu_list, _error = gpus.read()
        return PlainTextResponse(render_metrics(reconciler.status(), source, gpu_list),
                                 media_type="text/plain; version=0.0.4")

    return app
