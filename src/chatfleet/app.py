"""The gateway's FastAPI app: ``create_app(settings)`` builds routes, middleware and handlers, and a
lifespan that starts the engine, the admission controller and the readiness poller once.

Route functions find everything on ``app.state``: ``settings``, ``engine``, ``admission``,
``lifecycle``, ``metrics``, ``completions`` (the CompletionService), ``knowledge`` (the
KnowledgeService: knowledge bases and retrieval) and ``started_at``.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from chatfleet import __version__
from chatfleet.api import chatchat, health, knowledge, openai
from chatfleet.api.access_log import AccessLog
from chatfleet.api.auth import ApiKeyAuth
from chatfleet.api.errors import install_error_handlers
from chatfleet.api.knowledge import UPLOAD_PATHS
from chatfleet.api.middleware import AdmissionGate, BodySizeLimit, IngestGate
from chatfleet.api.responses import install_openapi
from chatfleet.engines.base import Engine
from chatfleet.engines.engine_model import load_profile
from chatfleet.engines.openai_compat import OpenAICompatEngine
from chatfleet.engines.simulated import SimulatedEngine
from chatfleet.rag.knowledge import KnowledgeService
from chatfleet.serving.admission import Admission
from chatfleet.serving.admission_metrics import measured_admission
from chatfleet.serving.completions import CompletionService
from chatfleet.serving.engine_metrics import EngineMetricsCache
from chatfleet.serving.lifecycle import Lifecycle
from chatfleet.serving.model_names import ModelNames
from chatfleet.serving.pod_admission import PodAdmission
from chatfleet.settings import EngineKind, Settings
from chatfleet.telemetry.metrics import AuthRejection, GatewayMetrics

__all__ = ["build_engine", "create_app", "startup_fields"]


_NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
"""FastAPI's own OpenTelemetry hooks, off: ChatFleet's telemetry is its Prometheus metrics and
access log, and FastAPI asks the global OpenTelemetry providers (reading the environment) on
every request to learn whether any is configured: about 5 µs of a one-token streamed
completion's 145 µs in-process."""


def build_engine(settings: Settings) -> Engine:
    """The engine the settings ask for (not started)."""
    engine = settings.engine
    if engine.kind is EngineKind.OPENAI:
        assert engine.url is not None
        return OpenAICompatEngine(
            base_url=engine.url,
            api_key=engine.api_key.get_secret_value() if engine.api_key else None,
            connect_timeout_s=engine.connect_timeout_s, read_timeout_s=engine.read_timeout_s,
            max_connections=engine.max_connections)
    return SimulatedEngine(load_profile(engine.profile), model=settings.served_model,
                           seed=engine.seed, max_num_seqs=settings.admission.engine_slots)


def _stop_this_worker() -> None:
    """The pod's coordinator is gone, so is the pod: drain this worker and exit (SIGTERM is what
    ``server.py`` drains on)."""
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings, *, engine: Engine | None = None,
               pod_admission_socket: str | None = None) -> FastAPI:
    """The gateway app. ``pod_admission_socket``: this process is one of the pod's workers, and
    takes its engine slots (and the API keys' rate limits) from the coordinator listening there
    (``serving/pod_coordinator.py``) instead of owning them."""
    engine = engine if engine is not None else build_engine(settings)
    model = settings.served_model
    metrics = GatewayMetrics(model=model, engine_kind=engine.kind, version=__version__)
    metrics.engine_slots.labels(model).set(settings.admission.engine_slots)
    store_kind = settings.kb.store.value
    ingest_chunks = metrics.ingest_chunks_total.labels(store_kind)
    knowledge_service = KnowledgeService(
        settings.kb,
        on_retrieval=lambda mode, seconds: metrics.retrieval_seconds.labels(
            store_kind, mode.value).observe(seconds),
        on_chunks=ingest_chunks.inc)
    metrics.retrieval_seconds.labels(store_kind, knowledge_service.mode.value)
    for outcome in ("ok", "rejected", "failed"):
        metrics.ingest_files_total.labels(store_kind, outcome)

    def lifecycle_changed(lifecycle: Lifecycle) -> None:
        metrics.ready.set(1 if lifecycle.ready else 0)
        metrics.draining.set(1 if lifecycle.draining else 0)

    slots = settings.admission.engine_slots
    pod = (PodAdmission(slots=slots, batch_slots=slots - settings.admission.reserved_for_interactive,
                        max_queue=settings.admission.max_queue, on_lost=_stop_this_worker)
           if pod_admission_socket else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        admission: Admission
        if pod is not None:
            assert pod_admission_socket is not None
            await pod.connect(pod_admission_socket)
            admission = pod
        else:
            admission = measured_admission(settings.admission, metrics)
        lifecycle = Lifecycle(engine=engine, admission=admission, model=model,
                              health_interval_s=settings.engine.health_interval_s,
                              on_change=lifecycle_changed,
                              background=[knowledge_service.ingestor])
        app.state.admission = admission
        app.state.lifecycle = lifecycle
        app.state.completions = CompletionService(
            engine=engine, admission=admission, metrics=metrics, model=model,
            heartbeat_interval_s=settings.admission.heartbeat_interval_s)
        await knowledge_service.start()
        await engine.start()
        await lifecycle.check_engine()
        lifecycle.start()
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full scans, which otherwise stall the event loop for tens of ms under load. (No
        # gc.collect() first: a full collection here held the loop for 50 ms; freeze is O(1).)
        gc.freeze()
        try:
            yield
        finally:
            await lifecycle.stop()
            await engine.aclose()
            await knowledge_service.aclose()
            if pod is not None:
                await pod.aclose()

    app = FastAPI(
        title="ChatFleet",
        version=__version__,
        summary="OpenAI-compatible chat gateway with a measured, bounded admission queue",
        lifespan=lifespan,
        telemetry=_NO_FASTAPI_TELEMETRY,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.engine_metrics = EngineMetricsCache(engine)
    app.state.metrics = metrics
    app.state.knowledge = knowledge_service
    app.state.model_names = ModelNames(served=model, aliases=tuple(settings.engine.model_aliases))
    app.state.started_at = int(time.time())
    for api in (openai, chatchat, knowledge, health):
        # The routes themselves, not ``include_router``: FastAPI (0.16x) keeps an included
        # router as a branch that every request walks through again (its candidates, scope keys
        # and handler), about 9 µs of a one-token streamed completion's 145 µs in-process; the
        # API modules define their routes without prefix, dependencies or other include options.
        app.router.routes.extend(api.router.routes)
    install_error_handlers(app)
    install_openapi(app, api_keys=bool(settings.api_keys),
                    rate_limited=bool(settings.api_keys) and (settings.auth.rate_limit_rps > 0
                                                              or settings.auth.failed_keys_per_s > 0))
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes,
                       upload_paths=UPLOAD_PATHS, max_upload_bytes=settings.kb.max_upload_bytes)
    app.add_middleware(AdmissionGate)  # a certain 429 costs the least
    app.add_middleware(IngestGate, upload_paths=UPLOAD_PATHS)  # so does a certain upload 429
    if settings.api_keys:  # outermost of ours: no key, no other work (nor a queue-state hint)
        rejections = {reason: metrics.auth_rejections_total.labels(reason=reason.value)
                      for reason in AuthRejection}
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys,
                           rate_limit_rps=settings.auth.rate_limit_rps,
                           rate_limit_burst=settings.auth.rate_limit_burst,
                           failed_keys_per_s=settings.auth.failed_keys_per_s,
                           failed_keys_burst=settings.auth.failed_keys_burst,
                           on_reject=lambda reason: rejections[reason].inc(), pod=pod)
    if settings.log.access:  # outermost: it logs what the others refuse, with their status
        app.add_middleware(AccessLog)
    return app


def _without_credentials(url: str) -> str:
    """``url`` without user, password, query or fragment, where a secret could be
    (``http://user:pass@host:8001/v1?key=x`` -> ``http://host:8001/v1``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def startup_fields(app: FastAPI) -> dict[str, str | int | None]:
    """What the gateway serves, for its start-up line (``server.py``): engine kind, model, the
    upstream's URL (credentials removed; its API key is never shown), slots and queue bound,
    the knowledge-base store and retrieval mode."""
    settings: Settings = app.state.settings
    upstream = settings.engine.url if settings.engine.kind is EngineKind.OPENAI else None
    return {"engine": app.state.engine.kind, "model": settings.served_model,
            "upstream": _without_credentials(upstream) if upstream else None,
            "engine_slots": settings.admission.engine_slots,
            "max_queue": settings.admission.max_queue, "kb_store": settings.kb.store.value,
            "retrieval": app.state.knowledge.mode.value}
