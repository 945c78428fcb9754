"""Which pod serves a request: pods' live load in, one pod or a refusal out. Pure and deterministic.

Every pod runs its own admission (engine slots, a bounded two-priority queue). A picker that
knows each pod's load sends a request where that admission would start it at once, and only
when no pod can does it queue it, on the pod whose queue is shortest. It refuses (429, with the
soonest Retry-After any pod gave) only when every eligible pod would refuse too, so a client
never gets a 429 from a full pod while a neighbour has a free slot.

Tiers, best first; a pod is ranked by the best tier it offers the request:

1. a free slot for the request's priority (batch may hold only the pod's ``batch_slots``);
2. a place in the queue. Batch gets a queue place only while the pod's queue is below
   ``batch_queue_share`` of its bound, so under saturation batch is refused at the picker while
   interactive still finds places (the pods' own admission would otherwise let batch fill them);
3. interactive only: a full queue that holds batch requests, which the pod's admission
   displaces for an interactive arrival.

Within a tier the pod with the lowest load wins: the fraction of its slots taken (for batch,
of its batch slots), the engine's KV-cache usage weighted by ``kv_weight``, and in the queue
tier the fraction of its queue taken. With a prefix key, a pod that the key's rendezvous hash
prefers wins while its load is within ``affinity_slack`` of the best: requests with the same
prompt prefix land on the same pod, where vLLM's prefix cache holds it, until that pod is
noticeably busier than the others. Rendezvous hashing moves only the keys of a pod that comes
or goes.

Observations are seconds old when a request is picked, and a burst of picks between two polls
would all go to the same "least loaded" pod. So the caller adds ``pending``, the requests it
sent to a pod since that pod's last observation, and they count as running (or queued once the
slots are taken). Observations older than ``stale_after_s`` make a pod ineligible: a pod that
stopped answering its load endpoint is as likely gone as busy.

The endpoint picker (routing/epp.py) and the fleet simulator (sim/) both call :func:`pick`, so
what the simulator measures is what the cluster runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["PodLoad", "RoutingSpec", "Pick", "Refusal", "Tier", "pick", "prefix_rank"]


@dataclass(frozen=True, slots=True)
class PodLoad:
    """One pod's admission as its gateway last reported it (``GET /load``), and what came since.

    ``pending``: requests sent to the pod since this observation, not yet in its counts;
    ``pending_batch``: those of them that are batch.
    ``kv_usage``: the engine's KV-cache usage in [0, 1], None when not known.
    ``age_s``: seconds since the observation was taken.
    """

    endpoint: str
    slots: int
    batch_slots: int
    running: int
    running_batch: int
    queued_interactive: int
    queued_batch: int
    max_queue: int
    draining: bool = False
    retry_after_s: int = 1
    kv_usage: float | None = None
    age_s: float = 0.0
    pending: int = 0
    pending_batch: int = 0


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """The picker's knobs (``chatfleet epp`` flags; the simulator's routing settings)."""

    stale_after_s: float = 2.0
    batch_queue_share: float = 0.5
    kv_weight: float = 0.5
    affinity_slack: float = 0.25


class Tier(IntEnum):
    """How a pod would take the request; lower is better."""

    SLOT = 0
    QUEUE = 1
    DISPLACE = 2


@dataclass(frozen=True, slots=True)
class Pick:
    endpoint: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class Refusal:
    """No pod should get the request: 503 when none is eligible, 429 when all are full."""

    status: int
    retry_after_s: int
    message: str


def prefix_rank(prefix_key: str, endpoint: str) -> int:
    """The rendezvous weight of ``endpoint`` for ``prefix_key``: the highest weight is preferred."""
    digest = hashlib.blake2b(f"{prefix_key}\x00{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def pick(
    pods: Iterable[PodLoad],
    *,
    batch: bool,
    spec: RoutingSpec = RoutingSpec(),
    subset: frozenset[str] | None = None,
    prefix_key: str | None = None,
    turn: int = 0,
) -> Pick | Refusal:
    """The pod for one request, or why none. ``subset``: only these endpoints may be picked
    (the proxy's subset hint); None means any pod. ``turn``: the caller's request counter; equal
    pods take turns by it, so requests that find the pool idle still spread over it."""
    eligible = [pod for pod in pods
                if (subset is None or pod.endpoint in subset)
                and not pod.draining and pod.age_s <= spec.stale_after_s and pod.slots > 0]
    if not eligible:
        return Refusal(503, 1, _no_endpoint_message(subset))
    best: tuple[Tier, list[tuple[float, PodLoad]]] | None = None
    for pod in eligible:
        offer = _offer(pod, batch, spec)
        if offer is None:
            continue
        tier, load = offer
        if best is None or tier < best[0]:
            best = (tier, [(load, pod)])
        elif tier == best[0]:
            best[1].append((load, pod))
    if best is None:
        retry_after_s = min(pod.retry_after_s for pod in eligible)
        kind = "batch" if batch else "interactive"
        return Refusal(429, max(1, retry_after_s),
                       f"every pod's queue is full for {kind} requests; retry after "
                       f"{retry_after_s} s")
    tier, ranked = best
    return Pick(_choose(ranked, spec, prefix_key, turn).endpoint, tier)


def _offer(pod: PodLoad, batch: bool, spec: RoutingSpec) -> tuple[Tier, float] | None:
    """The best tier ``pod`` offers the request and its load within that tier, or None."""
    running = pod.running + pod.pending
    queued = pod.queued_interactive + pod.queued_batch + max(0, running - pod.slots)
    running = min(running, pod.slots)
    kv = spec.kv_weight * (pod.kv_usage or 0.0)
    if batch:
        batch_running = min(pod.running_batch + pod.pending_batch, pod.batch_slots)
        if running < pod.slots and batch_running < pod.batch_slots:
            return Tier.SLOT, batch_running / max(pod.batch_slots, 1) + kv
        if queued < pod.max_queue * spec.batch_queue_share:
            return Tier.QUEUE, queued / max(pod.max_queue, 1) + kv
        return None
    if running < pod.slots:
        return Tier.SLOT, running / pod.slots + kv
    if queued < pod.max_queue:
        return Tier.QUEUE, queued / pod.max_queue + kv
    if pod.queued_batch:
        return Tier.DISPLACE, pod.queued_interactive / max(pod.max_queue, 1) + kv
    return None


def _choose(ranked: list[tuple[float, PodLoad]], spec: RoutingSpec, prefix_key: str | None,
            turn: int) -> PodLoad:
    least = min(load for load, _ in ranked)
    if prefix_key is not None:
        near = [pod for load, pod in ranked if load <= least + spec.affinity_slack]
        return max(near, key=lambda pod: prefix_rank(prefix_key, pod.endpoint))
    # Among equals, the fewest requests sent since their observation, so equal pods share a
    # burst; then in turn, so one request after another on an idle pool does too.
    tied = [pod for load, pod in ranked if load == least]
    fewest = min(pod.pending for pod in tied)
    tied = sorted((pod for pod in tied if pod.pending == fewest), key=lambda pod: pod.endpoint)
    return tied[turn % len(tied)]


def _no_endpoint_message(subset: frozenset[str] | None) -> str:
    if subset is not None and not subset:
        return "the proxy's endpoint subset is empty; no pod may be picked"
    if subset is not None:
        return (f"none of the {len(subset)} endpoint(s) the proxy allowed is ready "
                "(not draining, load reported within the staleness bound)")
    return "no pod is ready (not draining, load reported within the staleness bound)"
