"""Probes and metrics: /livez (the process answers), /readyz (send it traffic), /metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from chatfleet.api.responses import json_content
from chatfleet.api.schemas import ErrorResponse
from chatfleet.engines.base import Engine, EngineUnavailable
from chatfleet.serving.engine_metrics import EngineMetricsCache
from chatfleet.serving.openai_format import error_body
from chatfleet.telemetry.metrics import CONTENT_TYPE_LATEST, render

__all__ = ["router"]

router = APIRouter(tags=["health"])


class Ready(BaseModel):
    status: Literal["ready"]
    model: str


class NotReady(BaseModel):
    status: Literal["not_ready"]
    reason: str


@router.head("/livez", include_in_schema=False)
@router.get("/livez", summary="Liveness: the process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", summary="Readiness: the engine lists the model and the replica is not draining",
            responses={200: {"model": Ready},
                       503: {"model": NotReady, "description": "Not ready, or draining"}})
async def readyz(request: Request) -> JSONResponse:
    lifecycle = request.app.state.lifecycle
    if lifecycle.ready:
        return JSONResponse({"status": "ready", "model": lifecycle.model})
    reason = "draining: shutting down" if lifecycle.draining else lifecycle.reason
    return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", summary="Prometheus metrics (text exposition)",
            response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(render(request.app.state.metrics.exposition), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/engine", summary="The engine's own Prometheus metrics (vLLM's names), relayed",
            response_class=PlainTextResponse, responses={
                404: {"content": json_content(ErrorResponse),
                      "description": "The engine exports no metrics"},
                503: {"content": json_content(ErrorResponse),
                      "description": "The engine is unavailable"}})
async def engine_metrics(request: Request) -> Response:
    """Lets Prometheus scrape the engine through the gateway's port: in the chart's pod the engine
    port is closed to the network, and vLLM serves its API and its metrics on one port. Needs the
    API key when keys are set (each call reaches the engine); scraped at most once a second
    (``serving/engine_metrics.py``)."""
    engine: Engine = request.app.state.engine
    cache: EngineMetricsCache = request.app.state.engine_metrics
    try:
        exposition = await cache.get()
    except EngineUnavailable as exc:
        return JSONResponse(error_body(exc.message, error_type="engine_unavailable", code=503),
                            status_code=503)
    if exposition is None:
        return JSONResponse(error_body(f"the {engine.kind} engine exports no metrics of its own",
                                       error_type="not_found", code=404), status_code=404)
    body, content_type = exposition
    return Response(body, media_type=content_type)
