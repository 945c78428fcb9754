"""The completion service: admission, the engine call, OpenAI shapes and the request's metrics.

Routes hand it a ``CompletionJob`` and get back either the whole answer (``complete``) or a stream of
SSE payloads (``open_stream``). Rejections before a response starts raise ``AdmissionRejected``
(the route answers 429/503 with Retry-After); once a stream has started, failures become an SSE
error event in OpenAI's error shape, which the openai SDK raises as ``APIError``.

Every request ends in exactly one ``chatfleet_requests_total`` outcome, also when the client goes
away: cancellation (a disconnect) releases the slot, aborts the engine request and is counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from chatfleet.engines.base import Engine, EngineError, EngineRequestRejected, GenerationRequest, Usage
from chatfleet.serving.admission import AdmissionController, AdmissionRejected, Priority, Waiter
from chatfleet.serving.openai_format import (
    Answer,
    StreamFormatter,
    collect,
    completion_response,
    error_body,
    stream_payloads,
)
from chatfleet.telemetry.metrics import GatewayMetrics, Outcome

__all__ = ["HEARTBEAT", "CompletionJob", "CompletionService"]

log = logging.getLogger(__name__)

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


class _Tracker:
    """Per-request bookkeeping for the latency and token metrics."""

    __slots__ = ("job", "metrics", "outcome", "last_token_at", "completion_tokens", "admitted")

    def __init__(self, job: CompletionJob, metrics: GatewayMetrics) -> None:
        self.job = job
        self.metrics = metrics
        self.outcome = Outcome.CLIENT_DISCONNECTED
        self.last_token_at: float | None = None
        self.completion_tokens = 0
        self.admitted = False

    def granted(self, waiter: Waiter) -> None:
        self.admitted = True
        self.metrics.queue_wait_seconds.labels(self.metrics.model, waiter.priority.value).observe(
            time.perf_counter() - self.job.arrived_at)

    def rejected(self, exc: AdmissionRejected) -> None:
        self.outcome = Outcome(exc.reason)
        self.metrics.queue_wait_seconds.labels(self.metrics.model, self.job.priority.value).observe(
            time.perf_counter() - self.job.arrived_at)

    def failed(self, exc: EngineError) -> None:
        refused = isinstance(exc, EngineRequestRejected)
        self.outcome = Outcome.INVALID if refused else Outcome.ENGINE_ERROR

    def token(self, tokens: int) -> None:
        now = time.perf_counter()
        m = self.metrics
        if self.last_token_at is None:
            m.ttft_seconds.labels(m.model, self.job.route).observe(now - self.job.arrived_at)
        else:
            m.itl_seconds.labels(m.model).observe(now - self.last_token_at)
        self.last_token_at = now
        self.completion_tokens += tokens

    def done(self, usage: Usage | None) -> None:
        m = self.metrics
        m.requests_total.labels(m.model, self.job.route, self.outcome.value).inc()
        if self.admitted:
            m.request_duration_seconds.labels(m.model, self.job.route).observe(
                time.perf_counter() - self.job.arrived_at)
            completion = usage.completion_tokens if usage is not None else self.completion_tokens
            m.completion_tokens_total.labels(m.model).inc(completion)
            if usage is not None:
                m.prompt_tokens_total.labels(m.model).inc(usage.prompt_tokens)


async def _prepend(first: str | object, rest: AsyncIterator[str | object]) -> AsyncIterator[str | object]:
    yield first
    async with aclosing(rest):
        async for item in rest:
            yield item


class CompletionService:
    def __init__(self, *, engine: Engine, admission: AdmissionController, metrics: GatewayMetrics,
                 model: str, heartbeat_interval_s: float) -> None:
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.model = model
        self.heartbeat_interval_s = heartbeat_interval_s

    def record_invalid(self, route: str) -> None:
        """Count a request refused before admission (bad body, unknown model)."""
        self.metrics.requests_total.labels(self.model, route, Outcome.INVALID.value).inc()

    async def _admit(self, job: CompletionJob, tracker: _Tracker, timeout: float | None) -> tuple[Waiter, bool]:
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
        tracker = _Tracker(job, self.metrics)
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

    async def open_stream(self, job: CompletionJob) -> AsyncIterator[str | object]:
        """Admit the request (waiting up to one heartbeat interval) and return its SSE payloads.

        Raises AdmissionRejected, or EngineError, when the request fails before the response
        starts; the returned iterator yields JSON strings, ``HEARTBEAT`` while still queued, and
        ``[DONE]``; later failures are an error payload in the stream.
        """
        tracker = _Tracker(job, self.metrics)
        waiter, granted = await self._admit(job, tracker, self.heartbeat_interval_s)
        events = self._events(job, tracker, waiter, granted)
        # Run the generator to its first payload now: once started, its ``finally`` (which frees the
        # slot) runs on close, cancellation or garbage collection, even if the response never starts.
        first = await anext(events)
        return _prepend(first, events)

    async def _events(self, job: CompletionJob, tracker: _Tracker, waiter: Waiter,
                      granted: bool) -> AsyncIterator[str | object]:
        answer = Answer()
        responded = False
        try:
            while not granted:
                responded = True
                yield HEARTBEAT
                try:
                    granted = await waiter.wait(self.heartbeat_interval_s)
                except AdmissionRejected as exc:
                    tracker.rejected(exc)
                    body = error_body(exc.message, error_type=exc.reason, code=exc.status)
                    body["error"]["retry_after"] = exc.retry_after_s
                    yield json.dumps(body)
                    yield "[DONE]"
                    return
                if granted:
                    tracker.granted(waiter)
            fmt = StreamFormatter(request_id=job.request.request_id, model=self.model,
                                  chat=job.request.is_chat, include_usage=job.include_usage)
            async with aclosing(stream_payloads(fmt, self.engine.generate(job.request),
                                                tracker.token, answer)) as payloads:
                async for payload in payloads:
                    responded = True
                    yield payload
            tracker.outcome = Outcome.OK
        except EngineError as exc:
            tracker.failed(exc)
            if not responded:
                raise  # nothing sent yet: the route answers with the engine's HTTP status
            log.warning("engine failed request %s mid-stream: %s", job.request.request_id, exc.message)
            yield json.dumps(error_body(exc.message, error_type=exc.error_type, code=exc.status))
            yield "[DONE]"
        finally:
            waiter.release()
            tracker.done(answer.usage)
