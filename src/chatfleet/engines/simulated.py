"""The engine model in real time: an Engine whose tokens come from ``EngineCore`` steps.

One asyncio task runs the core: it takes a step (pure: ``EngineCore.step()``), sleeps for the step's
modelled duration, then hands the step's tokens to the waiting streams. Requests that arrive during
a step join the next one, as in vLLM. When the loop falls behind (a busy CPU), the next step starts
at once rather than trying to catch up, so the modelled rate is an upper bound.

The text is deterministic filler from a seed (the request's ``seed`` when given), plainly not a
language model; the model id is ``chatfleet-sim/<profile>``. Output length: ``max_tokens`` with
``ignore_eos``, else a seeded draw (median about 128 tokens) capped by ``max_tokens``.

Prompts are cut into tokens as ``prompt_tokens`` says (4 characters a token), and the core's prefix
cache (on, as in vLLM) hashes their full blocks: two requests that start with the same system
prompt share its KV blocks, and the second prefills only what follows.

With ``EngineSimMetrics`` it also exports vLLM's metric names, for ``chatfleet engine-sim``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Hashable

from chatfleet.aio import cancel_and_wait
from chatfleet.engines.base import (
    EngineRequestRejected,
    EngineUnavailable,
    GenerationDelta,
    GenerationRequest,
    Usage,
)
from chatfleet.engines.engine_model import EngineCore, EngineProfile, StepOutcome, chain_block_hashes
from chatfleet.telemetry.metrics import CONTENT_TYPE_LATEST, EngineSimMetrics, render

__all__ = ["SimulatedEngine", "count_prompt_tokens", "prompt_block_hashes", "prompt_tokens"]

log = logging.getLogger(__name__)

_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed",
          "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna",
          "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud", "exercitation", "ullamco",
          "laboris", "nisi", "aliquip", "ex", "ea", "commodo", "consequat", "duis", "aute")
_CHARS_PER_TOKEN = 4
_CHAT_TOKENS_PER_MESSAGE = 4
"""Template tokens around each chat message (role markers), as chat templates add."""
_NATURAL_LENGTH_MEDIAN = 128
_NATURAL_LENGTH_SIGMA = 0.8


def count_prompt_tokens(request: GenerationRequest) -> int:
    """Prompt length as the simulated engine counts it: about 4 characters a token."""
    if request.messages is not None:
        return sum(_CHAT_TOKENS_PER_MESSAGE + math.ceil(len(m.content) / _CHARS_PER_TOKEN)
                   for m in request.messages) + 1
    assert request.prompt is not None
    return max(1, math.ceil(len(request.prompt) / _CHARS_PER_TOKEN))


def _pieces(text: str) -> list[Hashable]:
    return [text[i:i + _CHARS_PER_TOKEN] for i in range(0, len(text), _CHARS_PER_TOKEN)]


def prompt_tokens(request: GenerationRequest) -> list[Hashable]:
    """The prompt as the simulated tokenizer cuts it, ``count_prompt_tokens`` tokens: text in pieces
    of 4 characters; a chat message framed by 4 template tokens (its role among them), then one
    that opens the answer. Template tokens are tuples, so no text equals them. A token stands for
    its id: equal text gives equal tokens, which is all the prefix cache needs."""
    if request.messages is None:
        assert request.prompt is not None
        return _pieces(request.prompt) or [("empty",)]
    tokens: list[Hashable] = []
    for message in request.messages:
        tokens += (("start",), ("role", message.role), ("content",))
        tokens += _pieces(message.content)
        tokens.append(("end",))
    tokens.append(("answer",))
    return tokens


def prompt_block_hashes(request: GenerationRequest, block_size: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full blocks of ``block_size`` tokens, for the prefix cache."""
    tokens = prompt_tokens(request)
    return chain_block_hashes(tuple(tokens[i:i + block_size])
                              for i in range(0, len(tokens) - block_size + 1, block_size))


class _Stream:
    """Tokens delivered to one request, and the event that wakes its reader."""

    __slots__ = ("arrived_at", "event", "finished", "generated", "last_token_at")

    def __init__(self, arrived_at: float) -> None:
        self.generated = 0
        self.finished = False
        self.event = asyncio.Event()
        self.arrived_at = arrived_at
        self.last_token_at: float | None = None


class SimulatedEngine:
    kind = "simulated"

    def __init__(self, profile: EngineProfile, *, model: str, seed: int = 0,
                 max_num_seqs: int | None = None, metrics: EngineSimMetrics | None = None) -> None:
        self.profile = profile
        self.model = model
        self.seed = seed
        self.core = EngineCore(profile, max_num_seqs=max_num_seqs)
        self.metrics = metrics
        self._prefix_counted = (0, 0)
        """The core's (prefix cache queries, hits) already added to the metrics."""
        self._streams: dict[str, _Stream] = {}
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def max_num_seqs(self) -> int:
        return self.core.max_num_seqs

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatfleet-sim-engine")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def list_models(self) -> list[str]:
        if self._task is None or self._task.done():
            raise EngineUnavailable("the simulated engine is not running")
        return [self.model]

    # -- the step loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_start = loop.time()
        while True:
            if not self.core.has_work():
                self._wake.clear()
                await self._wake.wait()
                next_start = loop.time()
                continue
            outcome = self.core.step()
            end = max(next_start, loop.time()) + outcome.duration_s
            await asyncio.sleep(max(0.0, end - loop.time()))
            next_start = end
            self._deliver(outcome)

    def _deliver(self, outcome: StepOutcome) -> None:
        now = time.perf_counter()
        metrics = self.metrics
        for request_id, generated in outcome.emitted:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if metrics is not None:
                if stream.last_token_at is None:
                    metrics.time_to_first_token_seconds.observe(now - stream.arrived_at)
                else:
                    metrics.inter_token_latency_seconds.observe(now - stream.last_token_at)
                metrics.generation_tokens_total.inc(generated - stream.generated)
            stream.last_token_at = now
            stream.generated = generated
            stream.event.set()
        for request_id in outcome.finished:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.finished = True
                stream.event.set()
        if metrics is not None:
            self._update_gauges(outcome)

    def _update_gauges(self, outcome: StepOutcome | None = None) -> None:
        assert self.metrics is not None
        self.metrics.num_requests_running.set(self.core.num_running)
        self.metrics.num_requests_waiting.set(self.core.num_waiting)
        self.metrics.kv_cache_usage_perc.set(self.core.kv_usage)
        if outcome is not None and outcome.preempted:
            self.metrics.num_preemptions_total.inc(len(outcome.preempted))
        core = self.core
        counted_queries, counted_hits = self._prefix_counted
        if core.prefix_cache_queries != counted_queries:
            self.metrics.prefix_cache_queries_total.inc(core.prefix_cache_queries - counted_queries)
            self.metrics.prefix_cache_hits_total.inc(core.prefix_cache_hits - counted_hits)
            self._prefix_counted = (core.prefix_cache_queries, core.prefix_cache_hits)

    # -- one request --------------------------------------------------------------------------

    async def metrics_exposition(self) -> tuple[bytes, str] | None:
        if self.metrics is None:
            return None
        return render(self.metrics.registry), CONTENT_TYPE_LATEST

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self._task is None or self._task.done():
            raise EngineUnavailable("the simulated engine is not running")
        prompt_tokens = count_prompt_tokens(request)
        room = self.profile.max_model_len - prompt_tokens
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            asked = request.max_tokens if request.max_tokens is not None else 1
            raise EngineRequestRejected(
                f"This model's maximum context length is {self.profile.max_model_len} tokens. "
                f"However, you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the "
                f"messages, {asked} in the completion). Please reduce the length of the messages "
                "or completion.")
        seed = request.sampling.get("seed")
        rng = random.Random(f"{self.seed}:{seed if seed is not None else next(self._counter)}")
        limit = request.max_tokens if request.max_tokens is not None else room
        if request.sampling.get("ignore_eos"):
            output_tokens = limit
        else:
            natural = round(rng.lognormvariate(math.log(_NATURAL_LENGTH_MEDIAN), _NATURAL_LENGTH_SIGMA))
            output_tokens = max(1, min(limit, natural))
        block_size = self.profile.block_size
        block_hashes = (prompt_block_hashes(request, block_size)
                        if self.core.enable_prefix_caching and prompt_tokens >= block_size else ())
        stream = _Stream(time.perf_counter())
        try:
            self.core.add_request(request.request_id, prompt_tokens=prompt_tokens,
                                  output_tokens=output_tokens, block_hashes=block_hashes)
        except ValueError as exc:
            raise EngineRequestRejected(str(exc)) from exc
        self._streams[request.request_id] = stream
        if self.metrics is not None:
            self.metrics.prompt_tokens_total.inc(prompt_tokens)
            self._update_gauges()
        self._wake.set()
        sent = 0
        try:
            while True:
                await stream.event.wait()
                stream.event.clear()
                new = stream.generated - sent
                if new:
                    yield GenerationDelta("".join(" " + rng.choice(_WORDS) for _ in range(new)), new)
                    sent += new
                if stream.finished and sent == stream.generated:
                    break
            reason = "length" if output_tokens == limit else "stop"
            self._finished(stream, reason)
            yield GenerationDelta("", 0, reason, Usage(prompt_tokens, sent))
        finally:
            del self._streams[request.request_id]
            if not stream.finished:
                self.core.abort_request(request.request_id)
                self._finished(stream, "abort")
                if self.metrics is not None:
                    self._update_gauges()

    def _finished(self, stream: _Stream, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.request_success(reason).inc()
            self.metrics.e2e_request_latency_seconds.observe(time.perf_counter() - stream.arrived_at)
