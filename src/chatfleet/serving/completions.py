"""The completion service: admission, the engine call, OpenAI shapes and the request's metrics.

Routes hand it a ``CompletionJob`` and get back either the whole answer (``complete``) or a stream of
SSE payloads (``open_stream``). Rejections before a response starts raise ``AdmissionRejected``
(the route answers 429/503 with Retry-After); once a stream has started, failures become an SSE
error event in OpenAI's error shape, which the openai SDK raises as ``APIError``.

Every request ends in exactly one ``chatfleet_requests_total`` outcome, also when the client goes
away: cancellation (a disconnect) releases the slot, aborts the engine request and is counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from chatfleet.engines.base import (
    Engine,
    EngineError,
    EngineRequestRejected,
    GenerationRequest,
    Usage,
)
from chatfleet.serving.admission import (
    Admission,
    AdmissionRejected,
    Priority,
    Ticket,
)
from chatfleet.serving.admission_record import AdmissionRecord, current_admission
from chatfleet.serving.openai_format import (
    Answer,
    ChunkFormatter,
    PayloadRenderer,
    Payloads,
    StreamFormatter,
    collect,
    completion_response,
    last_payloads,
)
from chatfleet.telemetry.metrics import GatewayMetrics, HistogramTally, Outcome

__all__ = ["HEARTBEAT", "ROUTES", "CompletionJob", "CompletionService"]

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/chat/chat/completions", "/chat/kb_chat",
          "/knowledge_base/{mode}/{param}/chat/completions", "/chat/file_chat")
"""The routes whose requests this service serves: the ``route`` label's values."""

HEARTBEAT = object()
"""Yielded by ``open_stream`` while the request waits in the queue: the route sends an SSE comment."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CompletionJob:
    request: GenerationRequest
    route: str
    """Route template, the ``route`` label: /v1/chat/completions or /v1/completions."""
    priority: Priority
    include_usage: bool = False
    arrived_at: float
    """time.perf_counter() when the request reached the gateway."""
    retrieved_at: float | None = None
    """time.perf_counter() when a knowledge-base request's retrieval finished (it then queues);
    its TTFT is recorded split into retrieval, queue and engine time. None for plain chat."""
    formatter: ChunkFormatter | None = None
    """Renders the streamed payloads; None: OpenAI's chunks (``StreamFormatter``)."""

    @property
    def queued_at(self) -> float:
        return self.arrived_at if self.retrieved_at is None else self.retrieved_at


class _Series:
    """The metric children one service writes, resolved once (``labels()`` per token is costly)."""

    def __init__(self, metrics: GatewayMetrics, routes: tuple[str, ...]) -> None:
        model = metrics.model
        self.metrics = metrics
        self.itl = metrics.itl_seconds.labels(model)
        self.ttft = {r: metrics.ttft_seconds.labels(model, r) for r in routes}
        self.duration = {r: metrics.request_duration_seconds.labels(model, r) for r in routes}
        self.queue_wait = {p: metrics.queue_wait_seconds.labels(model, p.value) for p in Priority}
        self.kb_phases = tuple(metrics.knowledge_chat_ttft_seconds.labels(model, phase)
                               for phase in ("retrieval", "queue", "engine"))
        self.prompt_tokens = metrics.prompt_tokens_total.labels(model)
        self.completion_tokens = metrics.completion_tokens_total.labels(model)

    def finished(self, route: str, outcome: Outcome) -> None:
        self.metrics.requests_total.labels(self.metrics.model, route, outcome.value).inc()


class _Tracker:
    """Per-request bookkeeping for the latency and token metrics, and the request's admission
    record (``serving/admission_record.py``) when its recorder set one."""

    __slots__ = ("admitted", "completion_tokens", "granted_at", "itl", "job", "last_token_at",
                 "outcome", "record", "series")

    def __init__(self, job: CompletionJob, series: _Series) -> None:
        self.job = job
        self.series = series
        self.record: AdmissionRecord | None = current_admission.get()
        if self.record is not None:
            self.record.priority = job.priority
        self.outcome = Outcome.CLIENT_DISCONNECTED
        self.last_token_at: float | None = None
        self.completion_tokens = 0
        self.admitted = False
        self.granted_at = 0.0
        self.itl = HistogramTally(series.itl)
        """The answer's inter-token gaps, added to the histogram in batches (at most 0.1 s or 64
        tokens late, and at ``done``)."""

    def granted(self, waiter: Ticket) -> None:
        self.admitted = True
        self.granted_at = time.perf_counter()
        self._waited(waiter.priority, self.granted_at - self.job.queued_at)

    def rejected(self, exc: AdmissionRejected) -> None:
        self.outcome = Outcome(exc.reason)
        self._waited(self.job.priority, time.perf_counter() - self.job.queued_at)

    def _waited(self, priority: Priority, seconds: float) -> None:
        self.series.queue_wait[priority].observe(seconds)
        if self.record is not None:
            self.record.queue_wait_s = seconds

    def failed(self, exc: EngineError) -> None:
        refused = isinstance(exc, EngineRequestRejected)
        self.outcome = Outcome.INVALID if refused else Outcome.ENGINE_ERROR

    def token(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.last_token_at is None:
            job = self.job
            self.series.ttft[job.route].observe(now - job.arrived_at)
            if job.retrieved_at is not None:
                retrieval, queue, engine = self.series.kb_phases
                retrieval.observe(job.retrieved_at - job.arrived_at)
                queue.observe(self.granted_at - job.retrieved_at)
                engine.observe(now - self.granted_at)
        else:
            self.itl.observe(now - self.last_token_at, at=now)
        if tokens > 1:  # relayed together (one event): no gap between them
            self.itl.observe(0.0, at=now, times=tokens - 1)
        self.last_token_at = now
        self.completion_tokens += tokens

    def done(self, usage: Usage | None) -> None:
        series = self.series
        self.itl.flush()
        series.finished(self.job.route, self.outcome)
        if self.admitted:
            series.duration[self.job.route].observe(time.perf_counter() - self.job.arrived_at)
            completion = usage.completion_tokens if usage is not None else self.completion_tokens
            series.completion_tokens.inc(completion)
            if usage is not None:
                series.prompt_tokens.inc(usage.prompt_tokens)


class CompletionService:
    def __init__(self, *, engine: Engine, admission: Admission, metrics: GatewayMetrics,
                 model: str, heartbeat_interval_s: float) -> None:
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.model = model
        self.heartbeat_interval_s = heartbeat_interval_s
        self._series = _Series(metrics, ROUTES)

    def certain_rejection(self, route: str, priority: Priority | None) -> AdmissionRejected | None:
        """A rejection that admission would give this arrival for sure, counted as its outcome.

        Lets the HTTP layer answer 429/503 before reading or validating the body: under a storm of
        arrivals, refusing must cost far less than serving.
        """
        rejection = self.admission.certain_rejection(priority)
        if rejection is not None:
            queued_as = priority or Priority.INTERACTIVE
            self._series.queue_wait[queued_as].observe(0.0)
            self._series.finished(route, Outcome(rejection.reason))
            record = current_admission.get()
            if record is not None:
                record.priority, record.queue_wait_s = queued_as, 0.0
        return rejection

    def record_invalid(self, route: str) -> None:
        """Count a request refused before admission (bad body, unknown model)."""
        self._series.finished(route, Outcome.INVALID)

    async def _admit(self, job: CompletionJob, tracker: _Tracker, timeout: float | None) -> tuple[Ticket, bool]:
        """Enqueue and wait up to ``timeout`` for a slot. Raises AdmissionRejected (counted)."""
        try:
            waiter = self.admission.enqueue(job.priority)
        except AdmissionRejected as exc:
            tracker.rejected(exc)
            tracker.done(None)
            raise
        try:
            granted = await waiter.wait(timeout)
        except AdmissionRejected as exc:
            tracker.rejected(exc)
            tracker.done(None)
            raise
        except BaseException:
            waiter.release()
            tracker.done(None)
            raise
        if granted:
            tracker.granted(waiter)
        return waiter, granted

    async def complete(self, job: CompletionJob) -> dict:
        """The whole answer as an OpenAI response body. Raises AdmissionRejected or EngineError."""
        tracker = _Tracker(job, self._series)
        waiter, _ = await self._admit(job, tracker, None)
        answer = Answer()
        try:
            answer = await collect(self.engine.generate(job.request), tracker.token)
            tracker.outcome = Outcome.OK
        except EngineError as exc:
            tracker.failed(exc)
            raise
        finally:
            waiter.release()
            tracker.done(answer.usage)
        return completion_response(request_id=job.request.request_id, model=self.model,
                                   chat=job.request.is_chat, text=answer.text,
                                   finish_reason=answer.finish_reason, usage=answer.usage)

    async def open_stream(self, job: CompletionJob) -> tuple[Payloads | object, AsyncIterator[Payloads | object]]:
        """Admit the request (waiting up to one heartbeat interval); return its first SSE payload
        and the iterator of the rest, which the caller must close.

        Raises AdmissionRejected, or EngineError, when the request fails before the response
        starts; payloads are JSON strings (``Payloads``: several at once in a tuple, the last ones
        in ``LastPayloads``, ending with ``[DONE]``), ``HEARTBEAT`` while still queued; later
        failures are an error payload in the stream.
        """
        tracker = _Tracker(job, self._series)
        waiter, granted = await self._admit(job, tracker, self.heartbeat_interval_s)
        events = self._events(job, tracker, waiter, granted)
        # Run the generator to its first payload now: once started, its ``finally`` (which frees the
        # slot) runs on close, cancellation or garbage collection, even if the response never starts.
        return await anext(events), events

    async def _events(self, job: CompletionJob, tracker: _Tracker, waiter: Ticket,
                      granted: bool) -> AsyncIterator[Payloads | object]:
        answer = Answer()
        responded = False
        fmt: ChunkFormatter = job.formatter or StreamFormatter(
            request_id=job.request.request_id, model=self.model, chat=job.request.is_chat,
            include_usage=job.include_usage)
        try:
            while not granted:
                responded = True
                yield HEARTBEAT
                try:
                    granted = await waiter.wait(self.heartbeat_interval_s)
                except AdmissionRejected as exc:
                    tracker.rejected(exc)
                    yield last_payloads(fmt.error(exc.message, error_type=exc.reason,
                                                  code=exc.status, retry_after_s=exc.retry_after_s),
                                        fmt.done())
                    return
                if granted:
                    tracker.granted(waiter)
            # The engine's deltas are rendered here, not by another generator: one level less
            # to resume per token on the relay's hot path.
            render = PayloadRenderer(fmt, tracker.token, answer)
            async with aclosing(self.engine.generate(job.request)) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    payload = render.payload(delta)
                    if payload is not None:
                        responded = True
                        yield payload
            yield render.last()
            tracker.outcome = Outcome.OK
        except EngineError as exc:
            tracker.failed(exc)
            if not responded:
                raise  # nothing sent yet: the route answers with the engine's HTTP status
            log.warning("engine failed request %s mid-stream: %s", job.request.request_id, exc.message)
            yield last_payloads(fmt.error(exc.message, error_type=exc.error_type, code=exc.status),
                                fmt.done())
        finally:
            waiter.release()
            tracker.done(answer.usage)
