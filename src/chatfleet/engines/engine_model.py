"""The engine model: a pure, deterministic stand-in for one vLLM replica.

``EngineProfile`` is a latency profile (data, from ``profiles/<name>.json``): a model's size, a GPU's
achieved bandwidth and FLOP/s, fixed overheads and vLLM's scheduler defaults. ``EngineCore`` is
vLLM v1's continuous-batching scheduler as a state machine: ``step()`` runs one engine step and
says how long it took (from the profile's roofline) and which requests emitted a token.

Nothing here reads a clock, sleeps or draws a random number; callers own time. The simulated
engine drives a core in real time (it waits ``duration_s`` after each step), the replay in
``chatfleet.sim.engine_replay`` and the fleet simulator in virtual time (they add it to a counter).
With ``block_hashes`` (``chain_block_hashes`` of the prompt's full blocks) the core keeps vLLM's
automatic prefix cache: blocks computed once are reused by later requests with the same prefix.
docs/engine-model.md explains the model, the profiles' sources and what it leaves out.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from importlib.resources.abc import Traversable
from math import hypot
from typing import Any

__all__ = [
    "EngineCore",
    "EngineProfile",
    "StepOutcome",
    "available_profiles",
    "chain_block_hashes",
    "load_profile",
]

_PROFILES_PACKAGE = "chatfleet.engines"
_PROFILES_DIR = "profiles"


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineProfile:
    """How fast one engine replica runs one model on one GPU, and its scheduler defaults.

    Hardware figures are *achieved* rates (what large copies and GEMMs reach), not datasheet peaks.
    A step's time is the GPU's part (``gpu_step_floor_s``, the weight GEMMs, the KV read and the
    attention FLOPs; see ``step_seconds``) plus the engine's CPU part: ``step_overhead_s`` per step
    and ``per_seq_overhead_s`` per scheduled sequence (scheduling, input preparation, sampling,
    output processing and the API server's share), which no GPU measurement sees.
    """

    name: str
    description: str
    params: float
    """Parameters of the model; a token costs 2 x params FLOPs through the dense layers."""
    weight_bytes: float
    """Bytes read from HBM by every step: the weights."""
    kv_bytes_per_token: int
    """KV-cache bytes per token of context (2 x layers x KV heads x head dim x bytes per value)."""
    layers: int
    hidden: int
    """Attention width (query heads x head dim); sets attention FLOPs per token of context."""
    hbm_bandwidth_bytes_per_s: float
    flops_per_s: float
    step_overhead_s: float
    """Engine CPU time per step (not GPU work); docs/engine-model.md cites where each profile's comes from."""
    per_seq_overhead_s: float
    """Engine CPU time per scheduled sequence per step."""
    gpu_step_floor_s: float = 0.0
    """GPU time of a step beyond its roofline (kernel launches, small kernels): a decode step's floor."""
    dense_efficiency: float = 1.0
    """Share of ``flops_per_s`` that a step's weight GEMMs reach when compute-bound."""
    attention_efficiency: float = 1.0
    """Share of ``flops_per_s`` that attention reaches (a prefill chunk's causal attention)."""
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int
    block_size: int = 16
    max_model_len: int
    sources: tuple[str, ...]
    """Where each number comes from; docs/engine-model.md expands them."""

    def __post_init__(self) -> None:
        positive = (
            "params", "weight_bytes", "kv_bytes_per_token", "layers", "hidden",
            "hbm_bandwidth_bytes_per_s", "flops_per_s", "max_num_seqs", "max_num_batched_tokens",
            "kv_capacity_tokens", "block_size", "max_model_len",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"profile {self.name!r}: {name} must be > 0, got {value!r}")
        for name in ("step_overhead_s", "per_seq_overhead_s", "gpu_step_floor_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"profile {self.name!r}: {name} must be >= 0 seconds, got {value!r}")
        for name in ("dense_efficiency", "attention_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"profile {self.name!r}: {name} must be in (0, 1], got {value!r}")
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError(
                f"profile {self.name!r}: kv_capacity_tokens ({self.kv_capacity_tokens}) holds no "
                f"block of {self.block_size} tokens; raise it to at least block_size"
            )
        if not self.name or not self.description:
            raise ValueError("a profile needs a non-empty name and description")
        if not self.sources:
            raise ValueError(f"profile {self.name!r}: sources must cite where its numbers come from")

    def step_seconds(
        self, *, num_new_tokens: int, num_seqs: int, context_tokens_read: int, attention_flops: float
    ) -> float:
        """Duration of one engine step: the engine's CPU time plus the GPU's.

        GPU: a floor, then three parts that run as separate kernels, so their times add up:
        - the weight GEMMs read every weight once (memory time) and do 2 x params FLOPs per new
          token at ``dense_efficiency`` (compute time); neither hides the other fully, so they
          combine as a smooth maximum, sqrt(memory^2 + compute^2): small decode batches are
          memory-bound, prefill chunks compute-bound, batches of about 100-200 tokens pay for both;
        - attention reads the KV cache of every scheduled token's context (memory-bound: decode)
        - and does the attention FLOPs at ``attention_efficiency`` (compute-bound: prefill chunks).
        CPU: ``step_overhead_s`` + ``per_seq_overhead_s`` x scheduled sequences.
        docs/engine-model.md has the fit of this form to an H200 and its residuals.
        """
        bandwidth = self.hbm_bandwidth_bytes_per_s
        flops = self.flops_per_s
        dense_s = 2.0 * self.params * num_new_tokens / (self.dense_efficiency * flops)
        gemm_s = hypot(self.weight_bytes / bandwidth, dense_s)
        attention_s = self.kv_bytes_per_token * context_tokens_read / bandwidth + attention_flops / (
            self.attention_efficiency * flops
        )
        return (
            self.step_overhead_s + self.per_seq_overhead_s * num_seqs + self.gpu_step_floor_s + gemm_s + attention_s
        )

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (the shape of ``profiles/<name>.json``)."""
        data = asdict(self)
        data["sources"] = list(self.sources)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineProfile:
        """Build a profile from JSON data; unknown or missing keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown profile keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**{**data, "sources": tuple(data.get("sources", ()))})
        except TypeError as exc:  # a required key is missing
            raise ValueError(f"incomplete profile data: {exc}") from exc


def _profiles_dir() -> Traversable:
    return resources.files(_PROFILES_PACKAGE).joinpath(_PROFILES_DIR)


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``chatfleet/engines/profiles``, sorted."""
    return sorted(p.name.removesuffix(".json") for p in _profiles_dir().iterdir() if p.name.endswith(".json"))


def load_profile(name: str) -> EngineProfile:
    """Load a shipped profile by name (``llama-3-8b-h100``, ``tiny-cpu``, ...)."""
    names = available_profiles()
    if name not in names:
        raise ValueError(f"unknown engine profile {name!r}; available profiles: {', '.join(names)}")
    text = _profiles_dir().joinpath(f"{name}.json").read_text("utf-8")
    profile = EngineProfile.from_dict(json.loads(text))
    if profile.name != name:
        raise ValueError(f"profile file {name}.json names itself {profile.name!r}; make the two agree")
    return profile


@dataclass(frozen=True, kw_only=True, slots=True)
class StepOutcome:
    """What one ``EngineCore.step()`` did; counts are those after the step."""

    duration_s: float
    emitted: tuple[tuple[str, int], ...]
    """(request id, tokens generated so far) for every request that produced a token this step."""
    finished: tuple[str, ...]
    """Requests that produced their last token this step; they have left the core."""
    preempted: tuple[str, ...]
    """Requests evicted this step to free KV blocks; they wait to recompute and resume."""
    num_prefill_tokens: int
    num_decode_seqs: int
    num_running: int
    num_waiting: int


_ROOT_HASH = 0x5EED
"""Parent of a prompt's first block in the hash chain (vLLM's ``NONE_HASH``; fixed here, so runs
repeat)."""


def chain_block_hashes(block_keys: Iterable[Hashable]) -> tuple[int, ...]:
    """Chained hashes of a prompt's full blocks, given one key per block (its token ids, or a
    trace's block identity): each block's hash covers its key and its parent's hash, so two
    prompts share a block hash only when they share every block up to it, as in vLLM.

    Python's ``hash`` of a tuple (not vLLM's SHA-256): fast, and the same in every process for
    keys made of ints; a collision (about 2**-64 a pair) would count a false hit.
    """
    parent = _ROOT_HASH
    hashes = []
    for key in block_keys:
        parent = hash((parent, key))
        hashes.append(parent)
    return tuple(hashes)


_NEVER = 1 << 62
"""``_Request.next_hash_at`` of a request with no prompt block left to cache."""

_STALE_SLACK = 4096
"""Stale free-queue entries tolerated beyond the number of free cached blocks before compacting."""


class _PrefixCache:
    """One engine's cached full blocks by hash, with references and eviction order (the hash map
    and free queue of vLLM's ``BlockPool``, for blocks counted rather than addressed).

    ``_refs[h]`` > 0: that many running requests reference block ``h``; <= 0: none does, the
    block is free (evictable) since the release numbered ``-_refs[h]``. The free queue is a deque
    of runs, one per release: the blocks it freed, its request's last block first. A block
    referenced again keeps its entry, which is skipped as stale when eviction meets it (its
    ``_refs`` is no longer that release's number); freeing and referencing thus touch a request's
    blocks in bulk (dict operations in C), and only eviction walks them one by one.
    """

    __slots__ = ("_queued", "_refs", "_releases", "_runs", "_shared", "num_evictable")

    def __init__(self) -> None:
        self._refs: dict[int, int] = {}
        self._runs: deque[list[Any]] = deque()
        """[release tag, hashes in eviction order, position of the next one]."""
        self._shared: dict[int, None] = {}
        """Blocks more than one request references: a release none of whose blocks is here
        frees them all in bulk."""
        self._releases = 0
        self._queued = 0
        """Entries in ``_runs`` not yet passed: ``num_evictable`` valid ones, the rest stale."""
        self.num_evictable = 0
        """Cached blocks no request references: free, and evicted when a block is needed."""

    def lookup(self, hashes: tuple[int, ...], limit: int) -> tuple[int, int]:
        """(how many of the first ``limit`` hashes are cached, in a row; how many of those are free)."""
        get = self._refs.get
        hits = free = 0
        while hits < limit:
            refs = get(hashes[hits])
            if refs is None:
                break
            if refs <= 0:
                free += 1
            hits += 1
        return hits, free

    def reference(self, hashes: tuple[int, ...]) -> int:
        """Reference cached blocks (all found by ``lookup``); returns how many of them were free."""
        refs_of = self._refs
        shared = self._shared
        taken = 0
        for block_hash in hashes:
            refs = refs_of[block_hash]
            if refs <= 0:
                refs_of[block_hash] = 1
                taken += 1
            else:
                refs_of[block_hash] = refs + 1
                if refs == 1:
                    shared[block_hash] = None
        self.num_evictable -= taken
        return taken

    def insert(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        """Cache newly computed blocks, referenced once; returns those that were not cached yet
        (a block already cached, computed by another request meanwhile, stays its computer's own)."""
        refs_of = self._refs
        if not refs_of.keys().isdisjoint(hashes):
            hashes = tuple(h for h in hashes if h not in refs_of)
        refs_of.update(dict.fromkeys(hashes, 1))
        return hashes

    def release(self, held: list[int]) -> int:
        """Drop one reference to each of ``held`` (a request's cached blocks, in block order);
        those no request references any more join the free queue, last block first. Returns
        how many did (the others are still in use)."""
        self._releases += 1
        tag = -self._releases
        refs_of = self._refs
        shared = self._shared
        if not shared or shared.keys().isdisjoint(held):
            freed = held[::-1]
            refs_of.update(dict.fromkeys(freed, tag))
        else:
            freed = []
            for block_hash in reversed(held):
                refs = refs_of[block_hash] - 1
                if refs == 0:
                    refs_of[block_hash] = tag
                    freed.append(block_hash)
                else:
                    refs_of[block_hash] = refs
                    if refs == 1:
                        del shared[block_hash]
        if freed:
            self._runs.append([tag, freed, 0])
            self.num_evictable += len(freed)
            self._queued += len(freed)
            if self._queued - self.num_evictable > self.num_evictable + _STALE_SLACK:
                self._compact()
        return len(freed)

    def evict(self, count: int) -> None:
        """Forget the ``count`` free cached blocks at the front of the free queue (their blocks are reused)."""
        refs_of = self._refs
        pop = refs_of.pop
        runs = self._runs
        self.num_evictable -= count
        while count:
            run = runs[0]
            tag, hashes, start = run
            position = start
            end = len(hashes)
            while position < end and count:
                block_hash = hashes[position]
                position += 1
                refs = pop(block_hash, None)
                if refs == tag:
                    count -= 1
                elif refs is not None:  # a stale entry: the block was referenced (or freed) since
                    refs_of[block_hash] = refs
            self._queued -= position - start
            if position == end:
                runs.popleft()
            else:
                run[2] = position

    def _compact(self) -> None:
        """Drop the free queue's stale entries (amortised: done when they outnumber the valid ones)."""
        refs_of = self._refs
        runs: deque[list[Any]] = deque()
        for tag, hashes, position in self._runs:
            live = [h for h in hashes[position:] if refs_of.get(h) == tag]
            if live:
                runs.append([tag, live, 0])
        self._runs = runs
        self._queued = self.num_evictable


class _Request:
    """Scheduler state of one request.

    ``num_computed`` counts tokens whose KV is in the cache. The request knows
    ``prompt_tokens + num_generated`` tokens; when all of them are computed it samples the next
    one. Preemption resets ``num_computed`` (recompute mode) but keeps ``num_generated``.

    Of its ``num_blocks`` KV blocks, those whose hashes are in ``held`` (in block order) are
    prefix-cache blocks it references; the rest are its own. ``num_hashed`` of its
    ``block_hashes`` have been looked up or cached; the next is cached once ``num_computed``
    reaches ``next_hash_at``.
    """

    __slots__ = (
        "block_hashes", "held", "next_hash_at", "num_blocks", "num_computed", "num_generated", "num_hashed",
        "output_tokens", "preempted", "prompt_tokens", "request_id",
    )  # fmt: skip

    def __init__(
        self, request_id: str, prompt_tokens: int, output_tokens: int, block_hashes: tuple[int, ...], block_size: int
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.num_generated = 0
        self.num_computed = 0
        self.num_blocks = 0
        self.block_hashes = block_hashes
        self.held: list[int] = []
        self.num_hashed = 0
        self.next_hash_at = block_size if block_hashes else _NEVER
        self.preempted = False


class EngineCore:
    """vLLM v1's scheduler (FCFS, chunked prefill, paged KV, recompute preemption), step by step.

    Each step has a budget of ``max_num_batched_tokens``. Running requests are served first, in
    admission order: one token for a decoding request, the next prompt chunk for a prefilling one.
    Waiting requests are then admitted first come first served while seats (``max_num_seqs``),
    budget and KV blocks last. KV is held in blocks of ``block_size`` tokens, allocated as tokens
    are scheduled. When a running request cannot get a block, the most recently admitted running
    request is preempted (KV freed, recomputed later from the front of the waiting queue), and no
    waiting request is admitted in that step, as in ``vllm/v1/core/sched/scheduler.py``.

    Prefix caching (``enable_prefix_caching``, on by default as in vLLM; it acts only on requests
    given ``block_hashes``): a full prompt block, once computed, is cached under its chained hash.
    At admission a request references the longest run of its leading blocks found in the cache
    (at most ``prompt - 1`` tokens, so that the last token is computed and a token sampled) and
    prefills only the rest. A cached block no request references stays in the cache but counts
    as free; when a block is needed and no never-cached free block is left, the least recently
    freed one is evicted (a request's blocks are freed tail first, so its prompt's start stays
    longest). ``kv_usage`` counts blocks that requests hold, as vLLM's.
    """

    __slots__ = (
        "_attention_flops_per_pos", "_cache", "_num_free", "_requests", "_running", "_waiting",
        "enable_prefix_caching", "kv_capacity_tokens", "max_num_batched_tokens", "max_num_seqs", "num_blocks_total",
        "num_preemptions_total", "prefix_cache_hits", "prefix_cache_queries", "profile",
    )  # fmt: skip

    def __init__(
        self,
        profile: EngineProfile,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        kv_capacity_tokens: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.profile = profile
        self.max_num_seqs = profile.max_num_seqs if max_num_seqs is None else max_num_seqs
        self.max_num_batched_tokens = (
            profile.max_num_batched_tokens if max_num_batched_tokens is None else max_num_batched_tokens
        )
        self.kv_capacity_tokens = profile.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.num_blocks_total = self.kv_capacity_tokens // profile.block_size
        if self.num_blocks_total < 1:
            raise ValueError(
                f"kv_capacity_tokens={self.kv_capacity_tokens} holds no KV block of {profile.block_size} "
                "tokens; give it at least one block"
            )
        self.enable_prefix_caching = enable_prefix_caching
        self.num_preemptions_total = 0
        self.prefix_cache_queries = 0
        """Tokens of the requests admitted while prefix caching is on, looked up in the cache
        (``vllm:prefix_cache_queries``; re-admissions after a preemption are not counted, as in vLLM)."""
        self.prefix_cache_hits = 0
        """Of those, tokens found cached (``vllm:prefix_cache_hits``)."""
        self._running: list[_Request] = []
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}
        self._num_free = self.num_blocks_total
        """Blocks no request holds: never-cached ones and the prefix cache's evictable ones."""
        self._cache = _PrefixCache()
        # Attention does about 4 x hidden FLOPs per layer per (query token, context token) pair.
        self._attention_flops_per_pos = 4.0 * profile.layers * profile.hidden

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1] (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - self._num_free / self.num_blocks_total

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def add_request(
        self, request_id: str, *, prompt_tokens: int, output_tokens: int, block_hashes: Sequence[int] = ()
    ) -> None:
        """Queue a request that will generate exactly ``output_tokens`` tokens after its prompt.

        ``block_hashes``: ``chain_block_hashes`` of the prompt's full blocks of ``block_size``
        tokens, for the prefix cache (none: the prompt shares nothing).
        """
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine; use a unique id")
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError(
                f"prompt_tokens and output_tokens must be at least 1, got {prompt_tokens} and {output_tokens}"
            )
        total = prompt_tokens + output_tokens
        max_model_len = self.profile.max_model_len
        if total > max_model_len:
            raise ValueError(
                f"prompt ({prompt_tokens}) + output ({output_tokens}) = {total} tokens exceeds this "
                f"engine's max_model_len of {max_model_len}; shorten the prompt or lower max_tokens"
            )
        kv_tokens = self.num_blocks_total * self.profile.block_size
        if total > kv_tokens:
            raise ValueError(
                f"prompt ({prompt_tokens}) + output ({output_tokens}) = {total} tokens can never fit "
                f"this engine's KV cache of {kv_tokens} tokens; shorten the prompt or lower max_tokens"
            )
        block_size = self.profile.block_size
        if len(block_hashes) > prompt_tokens // block_size:
            raise ValueError(
                f"{len(block_hashes)} block hashes for a prompt of {prompt_tokens} tokens, which has "
                f"{prompt_tokens // block_size} full blocks of {block_size}; hash only the full blocks"
            )
        hashes = tuple(block_hashes) if self.enable_prefix_caching else ()
        request = _Request(request_id, prompt_tokens, output_tokens, hashes, block_size)
        self._requests[request_id] = request
        self._waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """Remove a request wherever it is and free its KV blocks; False if it is not here."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request.num_blocks:  # only running requests hold KV blocks
            self._running.remove(request)
            self._release(request)
        else:
            self._waiting.remove(request)
        return True

    def step(self) -> StepOutcome:
        """Schedule one batch, account for its tokens and return what happened and how long it took."""
        running = self._running
        waiting = self._waiting
        cache = self._cache
        block_size = self.profile.block_size
        budget = self.max_num_batched_tokens
        free = self._num_free
        scheduled: list[tuple[_Request, int]] = []
        preempted: list[str] = []

        index = 0
        num_running = len(running)
        while index < num_running and budget > 0:
            request = running[index]
            computed = request.num_computed
            num_new = request.prompt_tokens + request.num_generated - computed
            if num_new > budget:  # noqa: PLR1730 - not min(): this loop runs per running request, per step
                num_new = budget
            blocks_needed = (computed + num_new + block_size - 1) // block_size - request.num_blocks
            if blocks_needed > free:
                self._num_free = free
                evicted_itself = self._preempt_for(request, blocks_needed, preempted)
                free = self._num_free
                num_running = len(running)
                if evicted_itself:
                    break  # nothing after it in the running list is left to schedule
            if blocks_needed > 0:
                request.num_blocks += blocks_needed
                free -= blocks_needed
                if free < cache.num_evictable:  # the never-cached free blocks ran out
                    cache.evict(cache.num_evictable - free)
            scheduled.append((request, num_new))
            budget -= num_new
            index += 1

        if not preempted:  # as vLLM: no admissions in a step that preempted
            max_num_seqs = self.max_num_seqs
            while waiting and budget > 0 and len(running) < max_num_seqs:
                request = waiting[0]
                num_tokens = request.prompt_tokens + request.num_generated
                hit_blocks = touched_free = 0
                hashes = request.block_hashes
                if hashes:
                    # As vLLM: at most num_tokens - 1 tokens from the cache, so the last one is computed.
                    limit = min(len(hashes), (num_tokens - 1) // block_size)
                    hit_blocks, touched_free = cache.lookup(hashes, limit)
                num_computed = hit_blocks * block_size
                num_new = min(num_tokens - num_computed, budget)
                blocks_needed = (num_computed + num_new + block_size - 1) // block_size - hit_blocks
                if blocks_needed + touched_free > free:  # hit blocks that were free are taken too
                    break
                waiting.popleft()
                running.append(request)
                if hit_blocks:
                    hit = hashes[:hit_blocks]
                    free -= cache.reference(hit)
                    request.held = list(hit)
                    request.num_hashed = hit_blocks
                    request.next_hash_at = (hit_blocks + 1) * block_size if hit_blocks < len(hashes) else _NEVER
                request.num_blocks = hit_blocks + blocks_needed
                request.num_computed = num_computed
                free -= blocks_needed
                if free < cache.num_evictable:
                    cache.evict(cache.num_evictable - free)
                if self.enable_prefix_caching and not request.preempted:
                    self.prefix_cache_queries += num_tokens
                    self.prefix_cache_hits += num_computed
                scheduled.append((request, num_new))
                budget -= num_new
        self._num_free = free

        if not scheduled:
            return StepOutcome(
                duration_s=0.0, emitted=(), finished=(), preempted=tuple(preempted), num_prefill_tokens=0,
                num_decode_seqs=0, num_running=len(running), num_waiting=len(waiting),
            )  # fmt: skip
        return self._complete(scheduled, preempted)

    def _cache_blocks(self, request: _Request) -> None:
        """Add ``request``'s newly computed full prompt blocks to the prefix cache."""
        hashes = request.block_hashes
        block_size = self.profile.block_size
        full = min(request.num_computed // block_size, len(hashes))
        request.held += self._cache.insert(hashes[request.num_hashed : full])
        request.num_hashed = full
        request.next_hash_at = (full + 1) * block_size if full < len(hashes) else _NEVER

    def _release(self, request: _Request) -> None:
        """Free ``request``'s blocks: its own, and the cached ones no other request references
        (those stay cached, free)."""
        held = request.held
        if held:
            self._num_free += request.num_blocks - len(held) + self._cache.release(held)
            request.held = []
        else:
            self._num_free += request.num_blocks
        request.num_blocks = 0

    # -- steps --------------------------------------------------------------------------------

    def _preempt_for(self, request: _Request, blocks_needed: int, preempted: list[str]) -> bool:
        """Preempt from the back of the running list until ``request`` fits; True if it was evicted itself."""
        running = self._running
        while blocks_needed > self._num_free:
            victim = running.pop()
            self._release(victim)
            victim.num_computed = 0
            victim.num_hashed = 0
            victim.next_hash_at = self.profile.block_size if victim.block_hashes else _NEVER
            victim.preempted = True
            self._waiting.appendleft(victim)
            self.num_preemptions_total += 1
            preempted.append(victim.request_id)
            if victim is request:
                return True
        return False

    def _complete(self, scheduled: list[tuple[_Request, int]], preempted: list[str]) -> StepOutcome:
        """Advance every scheduled request by its tokens, emit, finish, and time the step."""
        emitted: list[tuple[str, int]] = []
        finished: list[str] = []
        num_new_total = 0
        num_decode_seqs = 0
        context_read = 0
        twice_attention_positions = 0  # integer arithmetic: sum of 2 x (positions attended)
        for request, num_new in scheduled:
            before = request.num_computed
            computed = before + num_new
            request.num_computed = computed
            if computed >= request.next_hash_at:
                self._cache_blocks(request)
            num_new_total += num_new
            context_read += computed
            # New token j (1..num_new) attends to before + j positions.
            twice_attention_positions += num_new * (2 * before + num_new + 1)
            generated = request.num_generated
            if computed == request.prompt_tokens + generated:
                if num_new == 1 and generated:
                    num_decode_seqs += 1
                generated += 1
                request.num_generated = generated
                emitted.append((request.request_id, generated))
                if generated == request.output_tokens:
                    finished.append(request.request_id)
        if finished:
            self._release_finished(finished)
        duration = self.profile.step_seconds(
            num_new_tokens=num_new_total,
            num_seqs=len(scheduled),
            context_tokens_read=context_read,
            attention_flops=twice_attention_positions * 0.5 * self._attention_flops_per_pos,
        )
        return StepOutcome(
            duration_s=duration,
            emitted=tuple(emitted),
            finished=tuple(finished),
            preempted=tuple(preempted),
            num_prefill_tokens=num_new_total - num_decode_seqs,
            num_decode_seqs=num_decode_seqs,
            num_running=len(self._running),
            num_waiting=len(self._waiting),
        )

    def _release_finished(self, finished: list[str]) -> None:
        requests = self._requests
        for request_id in finished:
            self._release(requests.pop(request_id))
        self._running = [r for r in self._running if r.num_generated < r.output_tokens]
