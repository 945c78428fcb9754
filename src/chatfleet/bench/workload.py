"""Request sources for the load generator: what to send, and when.

A workload is either open loop (``OpenLoop``: every request has a send time fixed in advance, kept
whatever the server does) or closed loop (``ClosedLoop``: N workers, each sending its next request as
soon as its previous one ends). Open-loop arrivals come from a Poisson process (``poisson``) or from a
recorded trace replayed at a speed factor (``trace_replay``); closed loop from ``closed_loop``.

Request lengths are in tokens. Output length is exact: the load generator sends ``max_tokens`` with
vLLM's ``ignore_eos``. Prompt length is approximate, see ``PromptSynthesizer``.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "ClosedLoop",
    "EmpiricalLengths",
    "FixedLengths",
    "LengthSampler",
    "OpenLoop",
    "PromptSynthesizer",
    "RequestSpec",
    "TraceRow",
    "Workload",
    "closed_loop",
    "load_trace",
    "poisson",
    "trace_replay",
]


TRACE_BLOCK_TOKENS = 512
"""Tokens covered by one of a trace's prompt block ids (Mooncake's ``hash_ids``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSpec:
    """One request to send. ``at_s``: send time in seconds after the run starts (None: closed loop).

    ``prefix_ids``: ids of the prompt's blocks of ``prefix_block_tokens`` tokens (a trace's
    ``TRACE_BLOCK_TOKENS``, fewer when ``trace_replay`` scales prompts down), first to last, as a
    trace records them (Mooncake's ``hash_ids``): prompts share a block's content where they share
    its id and every id before it. Empty: nothing known, the prompt shares nothing.
    """

    index: int
    prompt_tokens: int
    output_tokens: int
    at_s: float | None = None
    prefix_ids: tuple[int, ...] = ()
    prefix_block_tokens: int = TRACE_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                f"request {self.index}: prompt_tokens={self.prompt_tokens} and "
                f"output_tokens={self.output_tokens} must both be at least 1"
            )


class LengthSampler(Protocol):
    """Draws (prompt tokens, output tokens) for the next request."""

    def sample(self, rng: random.Random) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class FixedLengths:
    prompt_tokens: int
    output_tokens: int

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return self.prompt_tokens, self.output_tokens


@dataclass(frozen=True, slots=True)
class EmpiricalLengths:
    """Resamples observed (prompt, output) pairs, e.g. the rows of a trace, keeping their correlation."""

    pairs: Sequence[tuple[int, int]]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("EmpiricalLengths needs at least one (prompt, output) pair")

    @classmethod
    def from_trace(cls, rows: Sequence[TraceRow]) -> EmpiricalLengths:
        return cls([(row.prompt_tokens, row.output_tokens) for row in rows])

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return self.pairs[rng.randrange(len(self.pairs))]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenLoop:
    """Requests sent at their ``at_s`` (non-decreasing), whether or not earlier ones have finished."""

    arrivals: Iterable[RequestSpec]
    description: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosedLoop:
    """``concurrency`` workers share ``requests``; each sends its next one when its last one ends.

    Worker k starts at ``k / concurrency * ramp_s``: spread over about one request's duration, the
    workers of a fixed-length workload do not move in lockstep waves of simultaneous prefills.
    """

    concurrency: int
    requests: Iterable[RequestSpec]
    description: str
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"closed-loop concurrency must be at least 1, got {self.concurrency}")
        if self.ramp_s < 0:
            raise ValueError(f"closed-loop ramp must not be negative, got {self.ramp_s} s")


Workload = OpenLoop | ClosedLoop


def poisson(*, rate_per_s: float, lengths: LengthSampler, seed: int = 0) -> OpenLoop:
    """Poisson arrivals at ``rate_per_s`` (exponential gaps), endless: the run's bounds end it."""
    if rate_per_s <= 0:
        raise ValueError(f"Poisson rate must be positive, got {rate_per_s} requests/s")
    rng = random.Random(seed)

    def arrivals() -> Iterator[RequestSpec]:
        at_s = 0.0
        for index in itertools.count():
            prompt_tokens, output_tokens = lengths.sample(rng)
            yield RequestSpec(
                index=index, prompt_tokens=prompt_tokens, output_tokens=output_tokens, at_s=at_s
            )
            at_s += rng.expovariate(rate_per_s)

    return OpenLoop(arrivals=arrivals(), description=f"poisson {rate_per_s:g} req/s")


def closed_loop(
    *, concurrency: int, lengths: LengthSampler, seed: int = 0, ramp_s: float = 0.0
) -> ClosedLoop:
    """``concurrency`` back-to-back workers started over ``ramp_s``, endless: the run's bounds end it."""
    rng = random.Random(seed)

    def requests() -> Iterator[RequestSpec]:
        for index in itertools.count():
            prompt_tokens, output_tokens = lengths.sample(rng)
            yield RequestSpec(index=index, prompt_tokens=prompt_tokens, output_tokens=output_tokens)

    return ClosedLoop(
        concurrency=concurrency, requests=requests(), description=f"closed loop x{concurrency}", ramp_s=ramp_s
    )


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One recorded request. ``prefix_ids``: its prompt's block ids (see ``RequestSpec``), or ()."""

    arrived_at_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_ids: tuple[int, ...] = ()


def load_trace(path: Path) -> list[TraceRow]:
    """Read a trace: a CSV (columns arrived_at, num_prefill_tokens, num_decode_tokens) or Mooncake
    JSON lines (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``; see
    shared/traces). JSON lines are recognised by a ``.jsonl``/``.json`` name or a first character
    ``{``. A file that is neither raises ValueError naming the line and what it holds."""
    if path.suffix.lower() in (".jsonl", ".json"):
        return _load_jsonl(path)
    with path.open(newline="") as handle:
        if handle.read(64).lstrip().startswith("{"):
            return _load_jsonl(path)
    return _load_csv(path)


def _load_csv(path: Path) -> list[TraceRow]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"arrived_at", "num_prefill_tokens", "num_decode_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(sorted(missing))}; a trace needs "
                "arrived_at,num_prefill_tokens,num_decode_tokens"
            )
        rows = []
        for row in reader:
            try:
                rows.append(
                    TraceRow(float(row["arrived_at"]), int(row["num_prefill_tokens"]), int(row["num_decode_tokens"]))
                )
            except (TypeError, ValueError) as exc:  # TypeError: a short row's missing fields are None
                raise ValueError(
                    f"{path}, line {reader.line_num}: {dict(row)!r} is not a trace row (seconds, then "
                    "two whole token counts)"
                ) from exc
        return rows


_JSONL_EXPECTED = (
    'a JSON object {"timestamp": ms, "input_length": tokens, "output_length": tokens, '
    '"hash_ids": [whole numbers, one per 512-token block]}'
)


def _load_jsonl(path: Path) -> list[TraceRow]:
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                hash_ids = record.get("hash_ids", [])
                if not isinstance(hash_ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in hash_ids
                ):
                    raise ValueError("hash_ids")
                fields = (record["timestamp"], record["input_length"], record["output_length"])
                if not all(isinstance(f, int | float) and not isinstance(f, bool) for f in fields):
                    raise ValueError("numbers")
                if fields[1] != int(fields[1]) or fields[2] != int(fields[2]):
                    raise ValueError("whole token counts")
                rows.append(
                    TraceRow(float(fields[0]) / 1000, int(fields[1]), int(fields[2]), tuple(hash_ids))
                )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                shown = line.strip()
                shown = shown if len(shown) <= 120 else shown[:117] + "..."
                raise ValueError(f"{path}, line {number}: {shown!r} is not a trace row; expected {_JSONL_EXPECTED}") from exc
    if not rows:
        raise ValueError(f"{path}: no trace rows; expected one per line, each {_JSONL_EXPECTED}")
    return rows


def trace_replay(
    rows: Sequence[TraceRow],
    *,
    speed: float = 1.0,
    start_s: float = 0.0,
    max_rows: int | None = None,
    prompt_scale: float = 1.0,
    max_prompt_tokens: int | None = None,
) -> OpenLoop:
    """Replay ``rows`` from trace time ``start_s``: a row arriving at t is sent at (t - start_s) / speed.

    For engines smaller than the trace's: ``prompt_scale`` multiplies every prompt length and the
    tokens of each prefix block alike, so the block ids and the share of each prompt that repeats
    are kept (a 512-token block becomes ``round(512 * prompt_scale)`` tokens, at least 1). Then
    ``max_prompt_tokens`` cuts longer prompts, dropping their trailing blocks: what they share
    with others stays a leading prefix, so cache hits are kept up to the cut.
    """
    if speed <= 0:
        raise ValueError(f"trace speed must be positive, got {speed}")
    if not 0 < prompt_scale <= 1:
        raise ValueError(f"prompt scale must be in (0, 1], got {prompt_scale}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max prompt tokens must be at least 1, got {max_prompt_tokens}")
    selected = [row for row in rows if row.arrived_at_s >= start_s]
    if max_rows is not None:
        selected = selected[:max_rows]
    if not selected:
        raise ValueError(f"the trace has no rows at or after start offset {start_s} s")
    block_tokens = max(1, round(TRACE_BLOCK_TOKENS * prompt_scale))
    arrivals = []
    for index, row in enumerate(selected):
        prompt_tokens = max(1, round(row.prompt_tokens * prompt_scale))
        prefix_ids = row.prefix_ids
        if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
            prompt_tokens = max_prompt_tokens
            prefix_ids = prefix_ids[: math.ceil(prompt_tokens / block_tokens)]
        arrivals.append(RequestSpec(
            index=index,
            prompt_tokens=prompt_tokens,
            output_tokens=row.output_tokens,
            at_s=(row.arrived_at_s - start_s) / speed,
            prefix_ids=prefix_ids,
            prefix_block_tokens=block_tokens,
        ))
    shaped = "" if prompt_scale == 1 else f", prompts x{prompt_scale:g}"
    if max_prompt_tokens is not None:
        shaped += f", prompts cut at {max_prompt_tokens} tokens"
    return OpenLoop(
        arrivals=arrivals, description=f"trace x{speed:g}, {len(arrivals)} rows from {start_s:g} s{shaped}"
    )


class PromptSynthesizer:
    """Deterministic prompts of about N tokens.

    The text is made of common three-letter English words, each with a leading space: four characters
    per word. A BPE tokenizer (Llama 3, GPT) encodes each such word as one token, and the simulated
    engine counts four characters as one token, so both see about N tokens for N words. It stays an
    approximation: the chat template adds a few tokens of its own, and a real tokenizer may merge or
    split the odd pair. Each request starts at a different place in a seeded word sequence, so no two
    prompts share a prefix that an engine's prefix cache could reuse.

    A request with ``prefix_ids`` (a trace's prompt block ids) is instead the concatenation of its
    blocks' texts, each drawn from the seed and the block's id alone: equal ids give equal text, so
    prompts that share leading ids share a leading text prefix, and the last block is cut to the
    request's length. Every block is its own random draw of words (not a slice of the corpus), so
    two different ids do not give the same text.
    """

    # fmt: off
    _WORDS = (
        "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one",
        "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old", "see", "two",
        "way", "who", "boy", "did", "its", "let", "put", "say", "she", "too", "use", "act", "add", "age",
        "ago", "air", "arm", "art", "ask", "bad", "bag", "bed", "big", "bit", "box", "bus", "buy", "car",
        "cat", "cup", "cut", "dog", "dry", "ear", "eat", "egg", "end", "eye", "far", "few", "fit", "fly",
        "fun", "gas",
    )
    # fmt: on
    _CORPUS_WORDS = 8192

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        words = rng.choices([" " + word for word in self._WORDS], k=self._CORPUS_WORDS)
        self._corpus = "".join(words)
        self._doubled = self._corpus * 2
        self._seed = seed

    def prompt(self, index: int, tokens: int, prefix_ids: Sequence[int] = (),
               block_tokens: int = TRACE_BLOCK_TOKENS) -> str:
        """The prompt of request ``index``: ``tokens`` words, i.e. ``4 * tokens`` characters."""
        if prefix_ids:
            used = prefix_ids[: -(-tokens // block_tokens)]
            text = "".join(_block_text(self._seed, ident, block_tokens) for ident in used)
            own = tokens - len(used) * block_tokens  # a prompt longer than its blocks: its own tail
            return text[: tokens * 4] + (self._own(index, own) if own > 0 else "")
        return self._own(index, tokens)

    def _own(self, index: int, tokens: int) -> str:
        start = random.Random(self._seed * 1_000_003 + index).randrange(self._CORPUS_WORDS) * 4
        whole, rest = divmod(tokens, self._CORPUS_WORDS)
        return (
            self._doubled[start : start + self._CORPUS_WORDS * 4] * whole
            + self._doubled[start : start + rest * 4]
        )


@functools.lru_cache(maxsize=8192)
def _block_text(seed: int, ident: int, tokens: int) -> str:
    """The text of prefix block ``ident``: ``tokens`` words drawn from ``seed`` and ``ident`` only."""
    rng = random.Random(f"{seed}:{ident}")
    return "".join(rng.choices([" " + word for word in PromptSynthesizer._WORDS], k=tokens))
