"""How the fleet simulator's Service picks a pod: at random (kube-proxy), or the endpoint picker.

``epp`` runs ``chatfleet.routing.scoring.pick``, the function ``chatfleet epp`` runs, on what the
picker knows in a cluster (routing/pool_load.py): each pod's admission as of its last
``GET /load`` poll (every ``poll_interval_s`` from the moment the pod became ready), the
engine's KV-cache usage as of its last ``/metrics`` read (every ``kv_poll_interval_s``; None: the
picker runs without an engine metrics port), and ``pending``, the requests it sent the pod since
the last load poll.

Polls are taken lazily. A pod's state only changes at its own events, so the fleet calls
:meth:`PolledLoad.observe` just before each change: the latest poll time since the previous
change saw the state as it still is. That is exact, and costs nothing while a pod is quiet,
where 20 polls a second per pod as events would dominate an hour's run. A poll's answer is taken
as of the poll's instant: the gateway answers ``/load`` from memory in well under a millisecond,
far below the interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from chatfleet.routing.scoring import PodLoad, RoutingSpec

__all__ = ["ROUTINGS", "PolledLoad", "Routing"]

ROUTINGS = ("random", "epp")


@dataclass(frozen=True, slots=True)
class Routing:
    """``kind``: ``random`` (a random ready pod, as kube-proxy does) or ``epp`` (the endpoint
    picker's scoring on polled load); the intervals are ``chatfleet epp``'s. ``prefix_affinity``
    (epp only): the picker keys each request on its prompt's first trace block, as ``chatfleet epp
    --prefix-chars`` does on the prompt's first characters when they fall within that block:
    prompts that start alike go to the same pod while it is within the spec's slack of the least
    loaded."""

    kind: str = "random"
    poll_interval_s: float = 0.05
    kv_poll_interval_s: float | None = 0.5
    spec: RoutingSpec = RoutingSpec()
    prefix_affinity: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ROUTINGS:
            raise ValueError(f"unknown routing {self.kind!r}; choose from {', '.join(ROUTINGS)}")
        if not self.poll_interval_s > 0 or not (self.kv_poll_interval_s is None
                                                or self.kv_poll_interval_s > 0):
            raise ValueError("poll intervals must be > 0")
        if self.prefix_affinity and self.kind != "epp":
            raise ValueError("prefix affinity is the endpoint picker's: use it with routing epp")


class _Polls:
    """Poll times ``first, first + interval, ...``: which one was last, and whether one passed."""

    __slots__ = ("first", "interval", "last", "next")

    def __init__(self, first: float, interval: float) -> None:
        self.first, self.interval = first, interval
        self.last, self.next = first, first + interval

    def catch_up(self, now: float) -> bool:
        """Move to the latest poll at or before ``now``; False when it is still the last one."""
        if now < self.next:
            return False
        self.last = self.first + math.floor((now - self.first) / self.interval) * self.interval
        self.next = self.last + self.interval
        return True


class PolledLoad:
    """One pod's load as the picker last polled it, and what the picker sent it since."""

    __slots__ = ("_kv_polls", "_load_polls", "_read_kv", "_read_load", "kv_usage", "load", "pending")

    def __init__(self, now: float, routing: Routing, read_load: Callable[[], PodLoad],
                 read_kv: Callable[[], float]) -> None:
        """``read_load``, ``read_kv``: the pod's admission and KV usage as they are at the call;
        the first polls are taken at ``now``, as the picker polls a pod the moment it joins."""
        self._read_load, self._read_kv = read_load, read_kv
        self._load_polls = _Polls(now, routing.poll_interval_s)
        self._kv_polls = (None if routing.kv_poll_interval_s is None
                          else _Polls(now, routing.kv_poll_interval_s))
        self.load = read_load()
        self.kv_usage = read_kv() if self._kv_polls is not None else None
        self.pending = 0

    def observe(self, now: float) -> None:
        """Call just before the pod's state changes at ``now`` (and before a pick): the polls
        since the previous change saw the state as it still is. A load poll's answer counts every
        request sent before it."""
        if self._load_polls.catch_up(now):
            self.load = self._read_load()
            self.pending = 0
        if self._kv_polls is not None and self._kv_polls.catch_up(now):
            self.kv_usage = self._read_kv()

    def sent(self) -> None:
        self.pending += 1

    def view(self, now: float) -> PodLoad:
        """What the picker passes to ``pick`` for this pod at ``now`` (after ``observe``)."""
        return replace(self.load, kv_usage=self.kv_usage, age_s=now - self._load_polls.last,
                       pending=self.pending)
