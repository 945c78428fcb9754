"""A fleet of ChatFleet pods in virtual time: arrivals, gateways, engines, pod lifecycle, scaling.

Discrete-event simulation. Each pod is a gateway admission model (``engine_slots`` requests in
the engine, a bounded FIFO queue behind them with a maximum wait, 429 beyond) in front of an
``EngineCore`` (the engine model of engines/engine_model.py) stepped in virtual time: a step's
tokens count as emitted when the step ends. Pods go Loading (a cold start, GPU held) -> Ready ->
Draining (no new requests; queued and running ones finish, up to ``drain_timeout_s``) -> gone.
The Service sends each arrival to a ready pod at random, as kube-proxy does, or through the
endpoint picker's scoring on load it polled (``FleetConfig.routing``, sim/picker.py). A pod may run
slower than the profile (``pod_speed``): a degraded GPU, a noisy neighbour. Each engine keeps
vLLM's prefix cache (``FleetConfig.prefix_caching``) for requests whose trace gives their prompt
blocks' identities (``RequestSpec.prefix_ids``).

An ``Autoscaler`` is asked for the desired replica count every ``sync_period_s`` with what
Prometheus would show then (``FleetView``: per-pod gauges as of the last scrape, every
``scrape_interval_s``). Scale-down removes starting pods first, then the newest ready ones, as a
ReplicaSet does. GPU-seconds count from a pod's creation (its GPU is allocated while it loads)
to its end.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from array import array
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Protocol

from chatfleet.bench.workload import TRACE_BLOCK_TOKENS, RequestSpec
from chatfleet.engines.engine_model import EngineCore, EngineProfile, StepOutcome, chain_block_hashes
from chatfleet.routing import scoring
from chatfleet.sim.picker import PolledLoad, Routing

__all__ = [
    "Autoscaler",
    "FleetConfig",
    "FleetResult",
    "FleetView",
    "PodSample",
    "RequestOutcome",
    "StaticReplicas",
    "TimelinePoint",
    "servable",
    "simulate",
    "slowed",
    "trace_block_hashes",
]


class RequestOutcome(IntEnum):
    OK = 0
    REJECTED = 1
    """429 from a gateway (its queue was full, or the request waited past max_queue_wait_s), or
    from the endpoint picker (every pod's queue looked full)."""
    NO_ENDPOINT = 2
    """No pod was ready to take it (the Service had no endpoints; the picker's 503)."""
    CUT = 3
    """Still running when its draining pod reached drain_timeout_s."""
    INVALID = 4
    """Prompt + output over the engine's max_model_len or its whole KV cache (``servable``): a 400
    under any policy."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    profile: EngineProfile
    engine_slots: int
    """Requests each gateway lets into its engine (= vLLM max-num-seqs)."""
    max_queue: int = 512
    max_queue_wait_s: float = 30.0
    cold_start_s: Callable[[random.Random], float] = field(default=lambda rng: 120.0)
    """Seconds from a pod's creation to ready, drawn per pod."""
    drain_timeout_s: float = 30.0
    initial_replicas: int = 1
    sync_period_s: float = 15.0
    scrape_interval_s: float = 15.0
    rate_window_s: float = 60.0
    """The arrival rate the autoscaler sees is averaged over this window."""
    end_s: float | None = None
    """Stop at this virtual time; None: when the last request has finished."""
    seed: int = 0
    routing: Routing = Routing()
    pod_speed: Callable[[int], float] = field(default=lambda index: 1.0)
    """Engine speed of the pod created ``index``-th (0 first), as a factor on the profile: its
    step times are divided by it (0.5: a pod at half speed)."""
    prefix_caching: bool = True
    """Engines reuse cached prompt blocks (vLLM's automatic prefix caching, on by default there)."""

    def __post_init__(self) -> None:
        if self.engine_slots < 1 or self.initial_replicas < 0 or self.max_queue < 0:
            raise ValueError("engine_slots must be >= 1, initial_replicas and max_queue >= 0")


@dataclass(frozen=True, slots=True)
class PodSample:
    """One pod's gauges as Prometheus scraped them. A loading pod's gateway is up and reports an
    empty queue while its engine loads (not ready); a draining pod is terminating."""

    name: str
    ready: bool
    terminating: bool
    queue_depth: int
    running: int
    engine_slots: int


@dataclass(frozen=True, slots=True)
class FleetView:
    """What an autoscaler can know at ``now``: the last scrape, and pod phases from the API."""

    now: float
    pods: tuple[PodSample, ...]
    ready_replicas: int
    starting_replicas: int
    arrival_rate: float
    """Requests/s over the last ``rate_window_s``, as of the last scrape."""


class Autoscaler(Protocol):
    def desired_replicas(self, view: FleetView) -> int:
        """The replica count wanted now (the Deployment's spec.replicas)."""
        ...


@dataclass(frozen=True, slots=True)
class StaticReplicas:
    """A fixed fleet: the baseline sized for the peak."""

    replicas: int

    def desired_replicas(self, view: FleetView) -> int:
        return self.replicas


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    at: float
    desired: int
    ready: int
    starting: int
    queued: int
    running: int
    arrival_rate: float


@dataclass(frozen=True, slots=True)
class FleetResult:
    """Per request (in arrival order) and over time."""

    arrival_s: array
    outcome: array
    """RequestOutcome values."""
    ttft_s: array
    """NaN when no token was produced."""
    tpot_s: array
    """Mean seconds per output token after the first; NaN for one-token or unanswered requests."""
    prompt_tokens: array
    timeline: tuple[TimelinePoint, ...]
    gpu_seconds: float
    end_s: float
    prefix_cache_hit_rate: float = 0.0
    """Prompt tokens served from the engines' prefix caches / prompt tokens looked up, all pods."""


class _Phase(IntEnum):
    LOADING = 0
    READY = 1
    DRAINING = 2
    GONE = 3


class _Pod:
    __slots__ = (
        "core",
        "created_at",
        "drain_deadline",
        "ended_at",
        "name",
        "phase",
        "polled",
        "queue",
        "ready_at",
        "running",
        "stepping",
    )

    def __init__(self, name: str, core: EngineCore, created_at: float, ready_at: float) -> None:
        self.name = name
        self.core = core
        self.created_at = created_at
        self.ready_at = ready_at
        self.ended_at: float | None = None
        self.phase = _Phase.LOADING
        self.polled: PolledLoad | None = None
        """What the endpoint picker last polled of this pod, while it is ready (epp routing)."""
        self.queue: deque[int] = deque()
        self.running: set[int] = set()
        self.stepping = False
        self.drain_deadline = math.inf


class _Kind(IntEnum):
    # Order matters at equal times: finish steps (free slots) before arrivals take them.
    STEP_DONE = 0
    POD_READY = 1
    ARRIVAL = 2
    SCRAPE = 3
    SYNC = 4
    DRAIN_DEADLINE = 5


class _Simulation:
    def __init__(self, config: FleetConfig, requests: list[RequestSpec], autoscaler: Autoscaler) -> None:
        self.config = config
        self.requests = requests
        self.autoscaler = autoscaler
        self.rng = random.Random(config.seed)
        self.events: list[tuple[float, int, int, object]] = []
        self.sequence = itertools.count()
        self.pods: list[_Pod] = []
        self.by_name: dict[str, _Pod] = {}
        self.picks = 0
        """Requests the endpoint picker has answered: its turn counter among equal pods."""
        self.epp = config.routing.kind == "epp"
        self.pod_names = itertools.count()
        n = len(requests)
        self.outcome = array("b", [RequestOutcome.OK] * n)
        self.first_token = array("d", [math.nan] * n)
        self.finished = array("d", [math.nan] * n)
        self.deadline = array("d", [math.inf] * n)
        self.pending_outcomes: dict[int, StepOutcome] = {}
        self.scraped: tuple[PodSample, ...] = ()
        self.scraped_rate = 0.0
        self.arrivals_seen: deque[float] = deque()
        self.timeline: list[TimelinePoint] = []
        self.unfinished = n
        self.now = 0.0

    # -- events --------------------------------------------------------------------------------

    def schedule(self, at: float, kind: _Kind, payload: object = None) -> None:
        heapq.heappush(self.events, (at, kind, next(self.sequence), payload))

    def run(self) -> FleetResult:
        for _ in range(self.config.initial_replicas):
            pod = self.create_pod(0.0)
            pod.ready_at = 0.0
            self.make_ready(pod)
        for index, request in enumerate(self.requests):
            self.schedule(float(request.at_s or 0.0), _Kind.ARRIVAL, index)
        self.schedule(0.0, _Kind.SCRAPE)
        self.schedule(0.0, _Kind.SYNC)
        end = self.config.end_s
        while self.events:
            at, kind, _, payload = heapq.heappop(self.events)
            if end is not None and at > end:
                break
            if end is None and self.unfinished == 0 and kind in (_Kind.SCRAPE, _Kind.SYNC):
                break
            self.now = at
            if kind is _Kind.ARRIVAL:
                self.arrive(payload)  # type: ignore[arg-type]
            elif kind is _Kind.STEP_DONE:
                self.step_done(payload)  # type: ignore[arg-type]
            elif kind is _Kind.POD_READY:
                self.make_ready(payload)  # type: ignore[arg-type]
            elif kind is _Kind.SCRAPE:
                self.scrape()
                self.schedule(at + self.config.scrape_interval_s, _Kind.SCRAPE)
            elif kind is _Kind.SYNC:
                self.sync()
                self.schedule(at + self.config.sync_period_s, _Kind.SYNC)
            else:
                self.drain_deadline(payload)  # type: ignore[arg-type]
        end_s = self.now if end is None else end
        for pod in self.pods:
            if pod.ended_at is None:
                pod.ended_at = end_s
        for index in range(len(self.requests)):
            if self.outcome[index] == RequestOutcome.OK and math.isnan(self.finished[index]):
                self.outcome[index] = RequestOutcome.CUT
        return self.result(end_s)

    # -- requests ------------------------------------------------------------------------------

    def arrive(self, index: int) -> None:
        self.arrivals_seen.append(self.now)
        request = self.requests[index]
        if not servable(self.config.profile, request.prompt_tokens, request.output_tokens):
            self.settle(index, RequestOutcome.INVALID)
            return
        ready = [pod for pod in self.pods if pod.phase is _Phase.READY]
        if not ready:
            self.settle(index, RequestOutcome.NO_ENDPOINT)
            return
        if self.epp:
            picked = self.pick(ready, request)
            if isinstance(picked, scoring.Refusal):
                self.settle(index, RequestOutcome.REJECTED if picked.status == 429
                            else RequestOutcome.NO_ENDPOINT)
                return
            pod = picked
        else:
            pod = ready[self.rng.randrange(len(ready))] if len(ready) > 1 else ready[0]
        if len(pod.running) < self.config.engine_slots and not pod.queue:
            self.start(pod, index)
        elif len(pod.queue) < self.config.max_queue:
            self.deadline[index] = self.now + self.config.max_queue_wait_s
            pod.queue.append(index)
        else:
            self.settle(index, RequestOutcome.REJECTED)

    def pick(self, ready: list[_Pod], request: RequestSpec) -> _Pod | scoring.Refusal:
        """The endpoint picker's choice on what it polled; the chosen pod counts one pending."""
        views = []
        for pod in ready:
            assert pod.polled is not None
            pod.polled.observe(self.now)
            views.append(pod.polled.view(self.now))
        self.picks += 1
        key = (str(request.prefix_ids[0]) if self.config.routing.prefix_affinity and request.prefix_ids
               else None)
        result = scoring.pick(views, batch=False, spec=self.config.routing.spec, prefix_key=key,
                              turn=self.picks)
        if isinstance(result, scoring.Refusal):
            return result
        pod = self.by_name[result.endpoint]
        assert pod.polled is not None
        pod.polled.sent()
        return pod

    def load(self, pod: _Pod) -> scoring.PodLoad:
        """The pod's admission as its gateway's ``GET /load`` answers it now. Every request is
        interactive here: traces carry no priority."""
        slots = self.config.engine_slots
        return scoring.PodLoad(pod.name, slots, slots, len(pod.running), 0, len(pod.queue), 0,
                               self.config.max_queue)

    def start(self, pod: _Pod, index: int) -> None:
        request = self.requests[index]
        pod.running.add(index)
        core = pod.core
        hashes = (trace_block_hashes(request.prefix_ids, request.prompt_tokens, core.profile.block_size)
                  if request.prefix_ids and core.enable_prefix_caching else ())
        core.add_request(str(index), prompt_tokens=request.prompt_tokens,
                         output_tokens=request.output_tokens, block_hashes=hashes)
        if not pod.stepping:
            self.begin_step(pod)

    def admit_from_queue(self, pod: _Pod) -> None:
        while pod.queue and len(pod.running) < self.config.engine_slots:
            index = pod.queue.popleft()
            if self.deadline[index] < self.now:
                self.settle(index, RequestOutcome.REJECTED)  # timed out while queued
                continue
            self.start(pod, index)

    def settle(self, index: int, outcome: RequestOutcome) -> None:
        self.outcome[index] = outcome
        self.unfinished -= 1

    # -- engines -------------------------------------------------------------------------------

    def begin_step(self, pod: _Pod) -> None:
        if pod.polled is not None:
            pod.polled.observe(self.now)  # the step moves its KV-cache usage
        outcome = pod.core.step()
        pod.stepping = True
        self.pending_outcomes[id(pod)] = outcome
        self.schedule(self.now + outcome.duration_s, _Kind.STEP_DONE, pod)

    def step_done(self, pod: _Pod) -> None:
        if pod.polled is not None:
            pod.polled.observe(self.now)
        outcome = self.pending_outcomes.pop(id(pod))
        pod.stepping = False
        for request_id, generated in outcome.emitted:
            if generated == 1:
                self.first_token[int(request_id)] = self.now
        for request_id in outcome.finished:
            index = int(request_id)
            if index not in pod.running:
                continue  # cut at its pod's drain deadline while this step ran: settled already
            self.finished[index] = self.now
            pod.running.discard(index)
            self.unfinished -= 1
        if pod.phase is not _Phase.GONE:
            self.admit_from_queue(pod)  # may start the next step itself
            if pod.core.has_work() and not pod.stepping:
                self.begin_step(pod)
            elif pod.phase is _Phase.DRAINING and not pod.running and not pod.queue:
                self.end_pod(pod)

    # -- pods ----------------------------------------------------------------------------------

    def create_pod(self, now: float) -> _Pod:
        cold_start = self.config.cold_start_s(self.rng)
        number = next(self.pod_names)
        speed = self.config.pod_speed(number)
        profile = self.config.profile if speed == 1.0 else slowed(self.config.profile, speed)
        core = EngineCore(profile, max_num_seqs=self.config.engine_slots,
                          enable_prefix_caching=self.config.prefix_caching)
        pod = _Pod(f"pod-{number}", core, now, now + cold_start)
        self.pods.append(pod)
        self.by_name[pod.name] = pod
        return pod

    def make_ready(self, pod: _Pod) -> None:
        if pod.phase is _Phase.LOADING:
            pod.phase = _Phase.READY
            if self.epp:
                pod.polled = PolledLoad(self.now, self.config.routing, lambda: self.load(pod),
                                        lambda: pod.core.kv_usage)

    def remove(self, pod: _Pod) -> None:
        if pod.phase is _Phase.LOADING:
            self.end_pod(pod)
            return
        pod.phase = _Phase.DRAINING
        if not pod.running and not pod.queue:
            self.end_pod(pod)
        else:
            self.schedule(self.now + self.config.drain_timeout_s, _Kind.DRAIN_DEADLINE, pod)

    def drain_deadline(self, pod: _Pod) -> None:
        if pod.phase is not _Phase.DRAINING:
            return
        for index in pod.queue:
            self.settle(index, RequestOutcome.CUT)
        pod.queue.clear()
        for index in pod.running:
            self.settle(index, RequestOutcome.CUT)
        pod.running.clear()
        self.end_pod(pod)

    def end_pod(self, pod: _Pod) -> None:
        pod.phase = _Phase.GONE
        pod.ended_at = self.now

    # -- observation and scaling ---------------------------------------------------------------

    def scrape(self) -> None:
        while self.arrivals_seen and self.arrivals_seen[0] < self.now - self.config.rate_window_s:
            self.arrivals_seen.popleft()
        window = min(self.config.rate_window_s, self.now) or self.config.rate_window_s
        self.scraped_rate = len(self.arrivals_seen) / window
        self.scraped = tuple(
            PodSample(pod.name, pod.phase is _Phase.READY, pod.phase is _Phase.DRAINING,
                      len(pod.queue), len(pod.running), self.config.engine_slots)
            for pod in self.pods if pod.phase is not _Phase.GONE)

    def live(self) -> list[_Pod]:
        return [pod for pod in self.pods if pod.phase in (_Phase.LOADING, _Phase.READY)]

    def sync(self) -> None:
        live = self.live()
        ready = sum(pod.phase is _Phase.READY for pod in live)
        view = FleetView(self.now, self.scraped, ready, len(live) - ready, self.scraped_rate)
        desired = max(0, self.autoscaler.desired_replicas(view))
        for _ in range(desired - len(live)):
            pod = self.create_pod(self.now)
            self.schedule(pod.ready_at, _Kind.POD_READY, pod)
        if desired < len(live):
            # Starting pods first, then the newest ready ones, as a ReplicaSet scales down.
            victims = sorted(live, key=lambda p: (p.phase is _Phase.READY, -p.created_at))
            for pod in victims[:len(live) - desired]:
                self.remove(pod)
        live = self.live()
        self.timeline.append(TimelinePoint(
            self.now, desired, sum(p.phase is _Phase.READY for p in live),
            sum(p.phase is _Phase.LOADING for p in live), sum(len(p.queue) for p in self.pods),
            sum(len(p.running) for p in self.pods), self.scraped_rate))

    def result(self, end_s: float) -> FleetResult:
        tpot = array("d", [math.nan] * len(self.requests))
        for index, request in enumerate(self.requests):
            if request.output_tokens > 1 and not math.isnan(self.finished[index]):
                tpot[index] = (self.finished[index] - self.first_token[index]) / (request.output_tokens - 1)
        ttft = array("d", (self.first_token[i] - float(r.at_s or 0.0) for i, r in enumerate(self.requests)))
        gpu_seconds = sum((pod.ended_at if pod.ended_at is not None else end_s) - pod.created_at
                          for pod in self.pods)
        queries = sum(pod.core.prefix_cache_queries for pod in self.pods)
        hits = sum(pod.core.prefix_cache_hits for pod in self.pods)
        return FleetResult(
            arrival_s=array("d", (float(r.at_s or 0.0) for r in self.requests)),
            outcome=self.outcome, ttft_s=ttft, tpot_s=tpot,
            prompt_tokens=array("l", (r.prompt_tokens for r in self.requests)), timeline=tuple(self.timeline),
            gpu_seconds=gpu_seconds, end_s=end_s, prefix_cache_hit_rate=hits / queries if queries else 0.0)


def servable(profile: EngineProfile, prompt_tokens: int, output_tokens: int) -> bool:
    """Whether an engine of ``profile`` can ever serve the request: prompt + output within its
    max_model_len and within its whole KV cache (EngineCore refuses either with a 400)."""
    total = prompt_tokens + output_tokens
    return total <= profile.max_model_len and total <= (
        profile.kv_capacity_tokens // profile.block_size * profile.block_size)


def trace_block_hashes(prefix_ids: tuple[int, ...], prompt_tokens: int, block_size: int) -> tuple[int, ...]:
    """The engine's chained block hashes of a prompt known by its trace block ids: each engine
    block of ``block_size`` tokens is keyed by the trace block it lies in and its place there (by
    both trace blocks, where a block size that does not divide theirs makes it span two). Only
    full engine blocks within the prompt and covered by ids are hashed."""
    size = TRACE_BLOCK_TOKENS
    count = min(prompt_tokens // block_size, len(prefix_ids) * size // block_size)
    per_id, straddle = divmod(size, block_size)
    keys: list[Hashable]
    if not straddle:  # ints: cheaper to hash than tuples, and unique as j < per_id
        keys = [ident * per_id + j for ident in prefix_ids[:-(-count // per_id)] for j in range(per_id)]
    else:
        keys = [(prefix_ids[start // size], start % size, prefix_ids[(start + block_size - 1) // size])
                for start in range(0, count * block_size, block_size)]
    del keys[count:]
    return chain_block_hashes(keys)


def slowed(profile: EngineProfile, speed: float) -> EngineProfile:
    """``profile`` with every step ``speed`` times as fast (slower below 1): bandwidth and FLOPs
    scaled up, fixed overheads down, so each step's duration is divided by ``speed``."""
    if not speed > 0:
        raise ValueError(f"a pod's speed must be > 0, got {speed!r}")
    return replace(profile, name=f"{profile.name} x{speed:g}",
                   hbm_bandwidth_bytes_per_s=profile.hbm_bandwidth_bytes_per_s * speed,
                   flops_per_s=profile.flops_per_s * speed,
                   step_overhead_s=profile.step_overhead_s / speed,
                   per_seq_overhead_s=profile.per_seq_overhead_s / speed,
                   gpu_step_floor_s=profile.gpu_step_floor_s / speed)


def simulate(config: FleetConfig, requests: Iterable[RequestSpec], autoscaler: Autoscaler) -> FleetResult:
    """Run the fleet over ``requests`` (sorted by ``at_s``) under ``autoscaler``."""
    ordered = sorted(requests, key=lambda r: float(r.at_s or 0.0))
    return _Simulation(config, ordered, autoscaler).run()
