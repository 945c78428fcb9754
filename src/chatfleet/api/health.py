"""Probes and metrics: /livez (the process answers), /readyz (send it traffic), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from chatfleet.telemetry.metrics import CONTENT_TYPE_LATEST, render

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: the engine lists the model and the replica is not draining")
async def readyz(request: Request) -> JSONResponse:
    lifecycle = request.app.state.lifecycle
    if lifecycle.ready:
        return JSONResponse({"status": "ready", "model": lifecycle.model})
    reason = "draining: shutting down" if lifecycle.draining else lifecycle.reason
    return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics (text exposition)")
async def metrics(request: Request) -> Response:
    return Response(render(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
