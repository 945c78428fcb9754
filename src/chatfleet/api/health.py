"""Probes and metrics: /livez (the process answers), /readyz (send it traffic), /load (the pod's
slots and queue, for the endpoint picker), /metrics."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from chatfleet.api.responses import json_content
from chatfleet.api.schemas import ErrorResponse
from chatfleet.engines.base import Engine, EngineUnavailable
from chatfleet.serving.admission import Admission, Load, LoadUnavailable
from chatfleet.serving.engine_metrics import EngineMetricsCache
from chatfleet.serving.openai_format import error_body
from chatfleet.telemetry.metrics import CONTENT_TYPE_LATEST, render

__all__ = ["router"]

router = APIRouter(tags=["health"])


_LOAD_FIELDS = tuple(field.name for field in fields(Load))
"""``Load``'s fields, read one by one: ``dataclasses.asdict`` took 7 µs (it deep-copies), this 0.7."""


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


@router.get("/load", summary="The pod's engine slots and queue now, for the endpoint picker",
            responses={200: {"model": Load},
                       503: {"content": json_content(ErrorResponse),
                             "description": "The pod's admission cannot be read (it is going away)"}})
async def load(request: Request) -> JSONResponse:
    """Counted over the whole pod, whichever worker answers. Polled many times a second per pod:
    no key needed, no access-log line at INFO, no request metric; no engine call."""
    admission: Admission = request.app.state.admission
    try:
        now = await admission.load()
    except LoadUnavailable as exc:
        return JSONResponse(error_body(exc.message, error_type="load_unavailable", code=503),
                            status_code=503)
    return JSONResponse({name: getattr(now, name) for name in _LOAD_FIELDS})


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
