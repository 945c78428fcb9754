"""What one replica serves within the SLO: found by simulating a single pod, not configured.

Static-at-peak, the oracle and the operator's starting figure all need "requests/s per replica".
It depends on the engine profile, the slots and the request lengths, so it is measured the way a
load test would: Poisson arrivals at a rate, one pod, and a bisection for the highest rate whose
SLO attainment is at least the target. The first ``warmup_share`` of the run is not scored: a pod
that starts empty meets the SLO for a while at any rate, which would overstate its capacity.

Requests the engine can never serve (over max_model_len or its whole KV cache) would count as
arrivals without costing the pod anything, and overstate the capacity: ``servable_lengths`` keeps
the lengths a pod can serve and says what share it dropped, which the report shows.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatfleet.bench.workload import EmpiricalLengths, LengthSampler
from chatfleet.engines.engine_model import EngineProfile
from chatfleet.sim.arrivals import shaped_arrivals, step
from chatfleet.sim.fleet import FleetConfig, StaticReplicas, servable, simulate
from chatfleet.sim.report import Slo, meets_slo, scored_arrivals

__all__ = ["SLOT_CHOICES", "replica_capacity", "servable_lengths", "tuned_slots"]

SLOT_CHOICES = (8, 16, 24, 32, 48, 64, 96, 128, 256)
"""Slot counts ``tuned_slots`` tries (vLLM's max-num-seqs)."""


def servable_lengths(profile: EngineProfile,
                     pairs: Sequence[tuple[int, int]]) -> tuple[EmpiricalLengths, float]:
    """(the (prompt, output) pairs an engine of ``profile`` can serve, share of ``pairs`` it
    cannot). ValueError when it can serve none of them."""
    kept = [(prompt, output) for prompt, output in pairs if servable(profile, prompt, output)]
    if not kept:
        raise ValueError(
            f"{profile.name} can serve none of the {len(pairs)} requests: every one is over its "
            f"max_model_len of {profile.max_model_len} or its KV cache of "
            f"{profile.kv_capacity_tokens} tokens; raise --max-model-len or pick a larger profile")
    return EmpiricalLengths(kept), 1 - len(kept) / len(pairs)


def replica_capacity(profile: EngineProfile, *, engine_slots: int, lengths: LengthSampler, slo: Slo,
                     target: float = 0.99, duration_s: float = 600.0, warmup_share: float = 0.25,
                     seed: int = 0, iterations: int = 8) -> float:
    """Requests/s one pod serves with at least ``target`` of them within ``slo``."""
    def attained(rate: float) -> float:
        requests = list(shaped_arrivals(step(rate, rate, 0.0), duration_s=duration_s,
                                        lengths=lengths, seed=seed).arrivals)
        if not requests:
            return 1.0
        config = FleetConfig(profile=profile, engine_slots=engine_slots, initial_replicas=1,
                             max_queue_wait_s=duration_s, seed=seed)
        result = simulate(config, requests, StaticReplicas(1))
        scored = [met for met, at in zip(meets_slo(result, slo, exclude_invalid=True),
                                         scored_arrivals(result, exclude_invalid=True), strict=True)
                  if at >= duration_s * warmup_share]
        return sum(scored) / len(scored) if scored else 1.0

    low, high = 0.0, 1.0
    while attained(high) >= target:
        low, high = high, high * 2
        if high > 10_000:
            raise ValueError("the replica meets the SLO at any rate: check the profile and SLO")
    for _ in range(iterations):
        middle = (low + high) / 2
        if attained(middle) >= target:
            low = middle
        else:
            high = middle
    return low


def tuned_slots(profile: EngineProfile, *, lengths: LengthSampler, slo: Slo, seed: int = 0,
                within: float = 0.02, duration_s: float = 600.0) -> tuple[int, float]:
    """(slots, capacity): the fewest slots whose capacity is within ``within`` of the best.

    More slots than a replica can run within the SLO add no capacity: the extra requests batch
    in and slow every stream past the TPOT bound instead of waiting in the gateway's queue, where
    the autoscaler sees them. So the gateway's slots (and vLLM's max-num-seqs) are set to the
    fewest that reach the best capacity, as an operator tuning a GPU type would.
    """
    capacities = {slots: replica_capacity(profile, engine_slots=slots, lengths=lengths, slo=slo,
                                          seed=seed, duration_s=duration_s)
                  for slots in SLOT_CHOICES if slots <= profile.max_num_seqs}
    best = max(capacities.values())
    slots = min(s for s, c in capacities.items() if c >= best * (1 - within))
    return slots, capacities[slots]
