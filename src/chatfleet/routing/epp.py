"""``chatfleet epp``: the Gateway API Inference Extension's endpoint picker, as an Envoy
external-processing (ext_proc) gRPC service.

The proxy (Envoy, or a Gateway implementation built on it) calls the picker once per request,
one gRPC stream each: it sends the request's headers and, with the body mode BUFFERED the
Inference Extension configures, then the whole body. The picker answers the headers with
"continue" and, once the body is in, names a pod in the ``x-gateway-destination-endpoint``
header and in the dynamic metadata ``envoy.lb``; the proxy's ORIGINAL_DST cluster connects to
that address. A request without a body, or on a route whose body the proxy does not send first
(body mode NONE, as deploy/envoy/epp-envoy.yaml sets for knowledge-base uploads larger than
Envoy's buffer), is picked at its headers, on the priority header alone. When no pod is eligible it answers 503, and when every pod would refuse, 429
with Retry-After, as an immediate response: the request never reaches a pod. The protocol:
docs/proposals/004-endpoint-picker-protocol in kubernetes-sigs/gateway-api-inference-extension.

A proxy-side subset (filter metadata ``envoy.lb.subset_hint`` /
``x-gateway-destination-endpoint-subset``) limits the choice. The choice itself is
routing/scoring.py's, on the load routing/pool_load.py keeps.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import partial

import grpc
import aiohttp
import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chatfleet.routing.kube_pool import PoolRef, watch_objectives, watch_pool
from chatfleet.routing.pool_load import PoolLoad
from chatfleet.routing.request_facts import PRIORITY_HEADER, RequestFacts, request_facts
from chatfleet.routing.scoring import Pick, Refusal, RoutingSpec, Tier, pick
from chatfleet.telemetry.metrics import EppMetrics, PickOutcome

__all__ = ["EppConfig", "EndpointPicker", "run"]

log = logging.getLogger(__name__)

DESTINATION = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET = "x-gateway-destination-endpoint-subset"
MAX_BODY_BYTES = 16 * 1024 * 1024
"""The most request body the picker reads (the proxy's own buffer limit is normally lower)."""

_TIER_OUTCOME = {Tier.SLOT: PickOutcome.SLOT, Tier.QUEUE: PickOutcome.QUEUE,
                 Tier.DISPLACE: PickOutcome.DISPLACE}
_BODY_SENT = (ProcessingMode.BUFFERED, ProcessingMode.BUFFERED_PARTIAL)
"""Body modes in which the proxy sends the body before it needs the pick. In others (NONE: a route
that streams large uploads past the picker) the pick is made at the headers."""
_HEALTH_SERVICES = ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")


@dataclass(frozen=True, slots=True)
class EppConfig:
    host: str
    port: int
    metrics_host: str
    metrics_port: int
    endpoints: tuple[str, ...]
    spec: RoutingSpec = RoutingSpec()
    poll_interval_s: float = 0.05
    poll_timeout_s: float = 1.0
    forget_pick_after_s: float = 1.0
    engine_metrics_port: int | None = None
    prefix_chars: int = 0
    pool_ref: PoolRef | None = None
    """The InferencePool whose ready pods are the endpoints (then ``endpoints`` is empty)."""


class EndpointPicker(pb_grpc.ExternalProcessorServicer):
    """One ext_proc stream per HTTP request; each answered from the pool's current load."""

    def __init__(self, pool: PoolLoad, metrics: EppMetrics, *, spec: RoutingSpec, prefix_chars: int) -> None:
        self._pool = pool
        self._metrics = metrics
        self._spec = spec
        self._prefix_chars = prefix_chars
        self._turn = 0
        self.objectives: dict[str, int] = {}
        """The pool's InferenceObjectives' priorities by name (kept current by their watch)."""

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        headers: dict[str, str] = {}
        subset: frozenset[str] | None = None
        body = bytearray()
        picked = False
        body_buffered = True  # a proxy that does not say otherwise sends the body (ext_proc's default)
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if request.HasField("metadata_context"):
                hint = _subset(request.metadata_context.filter_metadata)
                subset = subset if hint is None else hint
            if request.HasField("protocol_config"):  # on the first message only
                body_buffered = request.protocol_config.request_body_mode in _BODY_SENT
            if kind == "request_headers":
                headers = _header_map(request.request_headers.headers.headers)
                if request.request_headers.end_of_stream or not body_buffered:
                    picked = True
                    yield self._answer(headers, b"", subset, phase="request_headers")
                else:
                    yield _continue(kind)
            elif kind == "request_body":
                if picked:  # a body the proxy streams after the pick: pass it on
                    yield _continue(kind)
                    continue
                body += request.request_body.body
                if len(body) > MAX_BODY_BYTES:
                    yield _immediate(413, None, f"the request body is over {MAX_BODY_BYTES} bytes")
                    return
                if request.request_body.end_of_stream:
                    picked = True
                    yield self._answer(headers, bytes(body), subset, phase="request_body")
                else:
                    yield _continue(kind)
            elif kind is not None:  # a phase the Inference Extension's configuration skips
                yield _continue(kind)

    def _answer(self, headers: dict[str, str], body: bytes, subset: frozenset[str] | None, *,
                phase: str) -> pb.ProcessingResponse:
        started = time.perf_counter()
        facts = request_facts(headers, body, prefix_chars=self._prefix_chars, objectives=self.objectives)
        pods = self._pool.snapshot()
        self._turn += 1
        result = pick(pods, batch=facts.batch, spec=self._spec, subset=subset, prefix_key=facts.prefix_key,
                      turn=self._turn)
        if isinstance(result, Pick):
            self._metrics.load_age_seconds.observe(
                next(pod.age_s for pod in pods if pod.endpoint == result.endpoint))
        response = self._route(result, facts, phase)
        self._metrics.decision_seconds.observe(time.perf_counter() - started)
        return response

    def _route(self, result: Pick | Refusal, facts: RequestFacts, phase: str) -> pb.ProcessingResponse:
        priority = "batch" if facts.batch else "interactive"
        if isinstance(result, Refusal):
            outcome = PickOutcome.REFUSED_FULL if result.status == 429 else PickOutcome.REFUSED_UNAVAILABLE
            self._metrics.picks_total.labels(priority=priority, outcome=outcome.value).inc()
            return _immediate(result.status, result.retry_after_s, result.message)
        self._pool.sent(result.endpoint, batch=facts.batch)
        self._metrics.picks_total.labels(priority=priority, outcome=_TIER_OUTCOME[result.tier].value).inc()
        return _destination(result.endpoint, phase, priority if facts.priority_from_objective else None)


def _header_map(headers: Iterable[HeaderValue]) -> dict[str, str]:
    """Envoy sends names in lower case, values in ``raw_value`` (``value`` from older proxies)."""
    return {h.key.lower(): h.raw_value.decode("latin-1") if h.raw_value else h.value for h in headers}


def _subset(filter_metadata: object) -> frozenset[str] | None:
    """The proxy's subset hint, or None when it sent none (then any pod of the pool may serve)."""
    namespace = filter_metadata.get(SUBSET_NAMESPACE)  # type: ignore[attr-defined]
    if namespace is None or SUBSET not in namespace.fields:
        return None
    value = namespace.fields[SUBSET]
    if value.HasField("list_value"):
        return frozenset(v.string_value for v in value.list_value.values if v.string_value)
    return frozenset(filter(None, (part.strip() for part in value.string_value.split(","))))


def _destination(endpoint: str, phase: str, priority: str | None) -> pb.ProcessingResponse:
    """The pick, as the header the ORIGINAL_DST cluster routes on and as ``envoy.lb`` metadata
    (the same value in both, as the protocol requires); with ``priority``, the priority the
    request's objective gave it, for the pod's admission."""
    headers = [_header(DESTINATION, endpoint)]
    if priority is not None:
        headers.append(_header(PRIORITY_HEADER, priority))
    common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=headers), clear_route_cache=True)
    metadata = Struct()
    metadata.get_or_create_struct(DESTINATION_NAMESPACE)[DESTINATION] = endpoint
    if phase == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common),
                                     dynamic_metadata=metadata)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)


def _immediate(status: int, retry_after_s: int | None, message: str) -> pb.ProcessingResponse:
    """A refusal the proxy answers itself, in the OpenAI error shape the gateway uses."""
    kind = {429: "rate_limit_exceeded", 503: "service_unavailable", 413: "request_too_large"}[status]
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}})
    headers = [_header("content-type", "application/json")]
    if retry_after_s is not None:
        headers.append(_header("retry-after", str(retry_after_s)))
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=HttpStatus(code=status), headers=pb.HeaderMutation(set_headers=headers), body=body,
        details=f"chatfleet_epp_{kind}"))


def _header(key: str, value: str) -> HeaderValueOption:
    """A header to set, its value in ``raw_value`` (where Envoy reads it; ``value`` is legacy)."""
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()))


def _continue(kind: str) -> pb.ProcessingResponse:
    """Go on unchanged, in the answer type of the message's phase."""
    if kind in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
    if kind in ("request_body", "response_body"):
        return pb.ProcessingResponse(**{kind: pb.BodyResponse()})
    return pb.ProcessingResponse(**{kind: pb.TrailersResponse()})


async def _report_states(pool: PoolLoad, metrics: EppMetrics, spec: RoutingSpec, every_s: float) -> None:
    while True:
        for state, count in pool.count_states(spec.stale_after_s).items():
            metrics.endpoints.labels(state=state).set(count)
        await asyncio.sleep(every_s)


async def serve(config: EppConfig, metrics: EppMetrics, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; then stop taking streams and finish the open ones (5 s)."""
    connector = aiohttp.TCPConnector(limit=0, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as client:
        pool = PoolLoad(client, metrics, interval_s=config.poll_interval_s, timeout_s=config.poll_timeout_s,
                        engine_metrics_port=config.engine_metrics_port,
                        kv_stale_after_s=config.spec.stale_after_s,
                        forget_pick_after_s=config.forget_pick_after_s)
        if config.pool_ref is None:
            pool.set_endpoints(config.endpoints)
        server = grpc.aio.server()
        picker = EndpointPicker(pool, metrics, spec=config.spec, prefix_chars=config.prefix_chars)
        pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        for service in (*_HEALTH_SERVICES[1:], ""):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        if not server.add_insecure_port(address):
            raise OSError(f"cannot listen on {address}")
        await server.start()
        reporter = asyncio.create_task(_report_states(pool, metrics, config.spec, 1.0))
        # Readiness waits for ``pool.polled``, set only once endpoints are given: with a pool
        # from the API, after its pods were first listed (the protocol's "datastore synced").
        watchers = [] if config.pool_ref is None else [
            asyncio.create_task(watch_pool(config.pool_ref, pool.set_endpoints), name="watch the InferencePool"),
            asyncio.create_task(watch_objectives(config.pool_ref, partial(setattr, picker, "objectives")),
                                name="watch the InferenceObjectives")]
        log.info("epp: listening on %s (gRPC ext_proc), endpoints: %s", address,
                 len(config.endpoints) if config.pool_ref is None
                 else f"InferencePool {config.pool_ref.namespace}/{config.pool_ref.name}")
        try:
            polled = asyncio.create_task(pool.polled.wait())
            await asyncio.wait([polled, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if polled.done():
                for service in (*_HEALTH_SERVICES[1:], ""):
                    await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
            await stop.wait()
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace=5.0)
        finally:
            reporter.cancel()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await pool.aclose()


def run(config: EppConfig) -> None:
    """Blocking entry point of ``chatfleet epp``: serve until SIGTERM or SIGINT."""
    from prometheus_client import start_http_server

    metrics = EppMetrics()
    http_server, _thread = start_http_server(config.metrics_port, addr=config.metrics_host,
                                             registry=metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, metrics, stop)

    try:
        asyncio.run(main())
    finally:
        http_server.shutdown()
