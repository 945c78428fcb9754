"""The load generator: sends a workload to an OpenAI-compatible server and times every token.

``run_load(workload, config)`` streams ``POST {url}/chat/completions`` for each request of a
``workload.Workload`` over one pooled ``httpx.AsyncClient`` and returns a ``RunResult``: one
``RequestRecord`` per request sent (send time, TTFT, every inter-token gap, end-to-end time, output
tokens, HTTP status, error class, Retry-After). ``report`` turns that into statistics.

Open loop is really open: each arrival is sent at its scheduled time whatever is outstanding, up to
``max_in_flight`` requests at once; an arrival that finds the cap full waits for a slot and is counted
in ``RunResult.cap_waits`` (its lateness shows as ``sent_s - scheduled_s``).

Only loopback servers are accepted (``NonLocalTargetError``): this is a benchmark tool for this
machine, not a way to load someone else's service.

The client must stay cheap at hundreds of streams on a small machine, so it reads raw bytes, splits
SSE lines itself and recognises a content chunk with one byte-regex; only the rare chunks that carry
``usage`` or an ``error`` are JSON-parsed. One chunk with non-empty ``delta.content`` is one token,
as it is for vLLM and the simulated engine; the final usage, when sent, is the authoritative count.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from array import array
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from chatfleet.bench.workload import (
    ClosedLoop,
    OpenLoop,
    PromptSynthesizer,
    RequestSpec,
    Workload,
)
from chatfleet.http_pools import ShardedTransport

__all__ = [
    "LoadConfig",
    "NonLocalTargetError",
    "RequestRecord",
    "RunResult",
    "discover_model",
    "require_local",
    "run_event_loop",
    "run_load",
]

_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_CONTENT = re.compile(rb'"content":\s*"[^"]')
_USAGE = re.compile(rb'"usage":\s*\{')
_ERROR = re.compile(rb'"error":\s*\{')
_DONE = b"[DONE]"

T = TypeVar("T")


class NonLocalTargetError(ValueError):
    """The target URL is not on this machine's loopback interface."""


def require_local(url: str) -> httpx.URL:
    """Parse ``url`` and refuse anything but http(s) on 127.0.0.1, localhost or ::1."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or parsed.host not in _LOCAL_HOSTS:
        raise NonLocalTargetError(
            f"refusing to send load to {url!r}: the load generator only targets http(s)://127.0.0.1, "
            "localhost or [::1]. Run the server on this machine, or forward it to a local port."
        )
    return parsed


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """Where to send and how long. A run stops at ``max_requests`` sent or ``duration_s``, whichever
    comes first, then waits up to ``drain_timeout_s`` for requests still in flight (cancelling and
    recording the rest as ``cancelled``)."""

    url: str
    """Base URL including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str
    max_requests: int | None = None
    duration_s: float | None = None
    max_in_flight: int = 1024
    """Open loop: most requests outstanding at once (the connection pool is this big)."""
    request_timeout_s: float = 600.0
    """Longest silence allowed while reading one response."""
    drain_timeout_s: float = 120.0
    seed: int = 0
    """Seed of the synthesized prompts."""

    def __post_init__(self) -> None:
        require_local(self.url)
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """What happened to one request. Times are seconds; ``sent_s`` and ``scheduled_s`` count from
    the run's start, the others from this request's send."""

    index: int
    prompt_tokens: int
    """Prompt length asked for (approximate, see ``workload.PromptSynthesizer``)."""
    max_tokens: int
    scheduled_s: float | None
    sent_s: float
    status: int | None = None
    """HTTP status; None when no response arrived."""
    error: str | None = None
    """None for success; else ``http_<status>``, ``stream_error:<type>``, ``incomplete_stream``,
    ``cancelled`` or the httpx exception class (``ConnectError``, ``ReadTimeout``, ...)."""
    retry_after_s: float | None = None
    ttft_s: float | None = None
    itl_s: array[float] = field(default_factory=lambda: array("d"))
    """Gap before each token after the first (0.0 for tokens that arrived in the same read)."""
    e2e_s: float | None = None
    content_chunks: int = 0
    usage_output_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        """Tokens received: the server's usage when it sent one, else the content chunks counted."""
        return self.usage_output_tokens if self.usage_output_tokens is not None else self.content_chunks


@dataclass(slots=True, kw_only=True)
class RunResult:
    """All records of one run, in send order, plus what the run itself observed."""

    label: str
    workload: str
    url: str
    model: str
    started_at_unix: float
    wall_s: float
    """From the run's start to its last request's end (drain included)."""
    send_end_s: float
    """When the run stopped sending: ``duration_s`` if it ran that long, else its last send."""
    max_in_flight: int
    cap_waits: int
    """Open-loop arrivals that found ``max_in_flight`` requests outstanding and had to wait."""
    records: list[RequestRecord]


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop when it is installed (cheaper per event), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def discover_model(url: str, *, timeout_s: float = 10.0) -> str:
    """The first model id the server at ``url`` lists on ``GET /models``."""
    base = require_local(url)
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.get(f"{str(base).rstrip('/')}/models")
        response.raise_for_status()
        models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{url}/models lists no model; pass the model id explicitly")
    return str(models[0]["id"])


async def run_load(workload: Workload, config: LoadConfig, *, label: str = "") -> RunResult:
    """Send ``workload`` as ``config`` says and return every request's record."""
    finite = isinstance(workload, OpenLoop) and isinstance(workload.arrivals, Sequence)
    if config.max_requests is None and config.duration_s is None and not finite:
        raise ValueError("an endless workload needs a bound: set max_requests or duration_s")
    return await _Run(workload, config, label).execute()


class _Run:
    """State of one run: the client, the clock, the records, and the tasks in flight."""

    def __init__(self, workload: Workload, config: LoadConfig, label: str) -> None:
        self._workload = workload
        self._config = config
        self._label = label or workload.description
        self._endpoint = f"{str(require_local(config.url)).rstrip('/')}/chat/completions"
        self._prompts = PromptSynthesizer(config.seed)
        self._records: list[RequestRecord] = []
        self._cap_waits = 0
        self._start = 0.0
        self._deadline_reached = False
        self._in_flight = config.max_in_flight if isinstance(workload, OpenLoop) else workload.concurrency

    async def execute(self) -> RunResult:
        transport = ShardedTransport(connections=self._in_flight, per_pool=8)
        timeout = httpx.Timeout(self._config.request_timeout_s, connect=30.0, pool=None)
        started_at_unix = time.time()
        async with httpx.AsyncClient(
            transport=transport, timeout=timeout, headers={"accept-encoding": "identity"}
        ) as client:
            self._start = time.perf_counter()
            if isinstance(self._workload, OpenLoop):
                tasks = await self._schedule_open(client, self._workload)
            else:
                tasks = self._start_closed(client, self._workload)
            await self._drain(tasks)
            wall_s = time.perf_counter() - self._start
        return RunResult(
            label=self._label,
            workload=self._workload.description,
            url=self._config.url,
            model=self._config.model,
            started_at_unix=started_at_unix,
            wall_s=wall_s,
            send_end_s=self._send_end_s(),
            max_in_flight=self._in_flight,
            cap_waits=self._cap_waits,
            records=self._records,
        )

    def _bounded(self, specs: Iterable[RequestSpec]) -> Iterator[RequestSpec]:
        return itertools.islice(specs, self._config.max_requests)

    def _deadline(self) -> float:
        duration = self._config.duration_s
        return float("inf") if duration is None else self._start + duration

    def _send_end_s(self) -> float:
        if self._deadline_reached and self._config.duration_s is not None:
            return self._config.duration_s
        return max((record.sent_s for record in self._records), default=0.0)

    async def _schedule_open(self, client: httpx.AsyncClient, workload: OpenLoop) -> set[asyncio.Task[None]]:
        cap = asyncio.Semaphore(self._in_flight)
        tasks: set[asyncio.Task[None]] = set()
        deadline = self._deadline()

        async def send_holding(spec: RequestSpec) -> None:
            try:
                await self._send(client, spec)
            finally:
                cap.release()

        for spec in self._bounded(workload.arrivals):
            assert spec.at_s is not None, "open-loop arrivals carry a send time"
            due = self._start + spec.at_s
            if due >= deadline:
                self._deadline_reached = True
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if cap.locked():
                self._cap_waits += 1
            await cap.acquire()
            task = asyncio.create_task(send_holding(spec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return tasks

    def _start_closed(self, client: httpx.AsyncClient, workload: ClosedLoop) -> set[asyncio.Task[None]]:
        specs = self._bounded(workload.requests)
        deadline = self._deadline()

        async def worker(index: int) -> None:
            await asyncio.sleep(index / workload.concurrency * workload.ramp_s)
            for spec in specs:
                await self._send(client, spec)
                if time.perf_counter() >= deadline:
                    self._deadline_reached = True
                    return

        return {asyncio.create_task(worker(index)) for index in range(workload.concurrency)}

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _, pending = await asyncio.wait(set(tasks), timeout=self._config.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _body(self, spec: RequestSpec) -> bytes:
        return json.dumps(
            {
                "model": self._config.model,
                "messages": [
                    {"role": "user", "content": self._prompts.prompt(
                        spec.index, spec.prompt_tokens, spec.prefix_ids, spec.prefix_block_tokens)}
                ],
                "max_tokens": spec.output_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()

    async def _send(self, client: httpx.AsyncClient, spec: RequestSpec) -> None:
        body = self._body(spec)
        sent = time.perf_counter()
        record = RequestRecord(
            index=spec.index,
            prompt_tokens=spec.prompt_tokens,
            max_tokens=spec.output_tokens,
            scheduled_s=spec.at_s,
            sent_s=sent - self._start,
        )
        self._records.append(record)
        try:
            async with client.stream(
                "POST",
                self._endpoint,
                content=body,
                headers={"content-type": "application/json"},
            ) as response:
                record.status = response.status_code
                if response.status_code != 200:
                    record.error = f"http_{response.status_code}"
                    record.retry_after_s = _retry_after(response.headers.get("retry-after"))
                    await response.aread()
                else:
                    await _read_stream(response, record, sent)
        except httpx.HTTPError as exc:
            record.error = type(exc).__name__
        except asyncio.CancelledError:
            record.error = "cancelled"
            raise
        finally:
            record.e2e_s = time.perf_counter() - sent


async def _read_stream(response: httpx.Response, record: RequestRecord, sent: float) -> None:
    """Time each content chunk of an SSE response; read usage, errors and [DONE] from the rest."""
    itl = record.itl_s
    tokens = 0
    last = sent
    pending = b""
    done = False
    async for chunk in response.aiter_raw():
        now = time.perf_counter()
        lines = (pending + chunk if pending else chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            if _CONTENT.search(line):
                if tokens:
                    itl.append(now - last)
                else:
                    record.ttft_s = now - sent
                last = now
                tokens += 1
            if _USAGE.search(line):
                usage = json.loads(line[5:]).get("usage") or {}
                record.usage_output_tokens = usage.get("completion_tokens")
            elif _ERROR.search(line):
                error = json.loads(line[5:]).get("error") or {}
                record.error = f"stream_error:{error.get('type') or error.get('code') or 'unknown'}"
            elif line[5:].strip() == _DONE:
                done = True
    record.content_chunks = tokens
    if not done and record.error is None:
        record.error = "incomplete_stream"


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delay form; an HTTP date is not used by these servers)."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
