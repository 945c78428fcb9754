"""The pool's live load: every pod's ``GET /load`` polled on a short interval.

A gateway's ``/load`` answers its pod's admission (slots, running, queued, draining) from
memory; polling it every 50 ms per pod costs the pod a fraction of a millisecond of CPU a
second. Between polls the picker counts what it sent each pod (``pending``), and a poll's
answer takes out of that count the requests it already includes (:class:`PendingPicks`).

The polls go through aiohttp (its C HTTP parser, keep-alive connections): at 20 polls a second
per pod, a pool of a hundred pods is 2,000 requests a second, and the client's CPU per request
is what the picker's own CPU is made of (docs/benchmarks.md, "Routing between pods, through the
real Envoy": 3.5x less than httpx's).

A pod whose ``/load`` cannot be reached (connection refused or reset: the pod stopped, its
gateway is gone) or answers anything but 200 gets no request until a poll succeeds again, so a
stopped pod stops receiving requests within one poll interval. A poll that times out leaves
the last observation to age: a saturated gateway answers slowly and is still there, and the
scoring's staleness bound (``RoutingSpec.stale_after_s``) retires it if it stays silent.

With an engine metrics port, each pod's engine (vLLM, or engine-sim, on the pod's IP) is also
read for ``vllm:kv_cache_usage_perc``, less often (its exposition is tens of kilobytes): the
line is found by its name, not by parsing the whole text. A KV reading older than the
staleness bound is dropped rather than trusted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import aiohttp
import orjson

from chatfleet.routing.scoring import PodLoad
from chatfleet.telemetry.metrics import EppMetrics

__all__ = ["PendingPicks", "PoolLoad", "kv_usage_of", "parse_load"]

log = logging.getLogger(__name__)

_INT_FIELDS = ("slots", "batch_slots", "running", "running_batch", "queued_interactive",
               "queued_batch", "max_queue", "retry_after_s")


def parse_load(endpoint: str, answer: object) -> tuple[PodLoad, int | None]:
    """A gateway's ``/load`` JSON as a ``PodLoad`` and its ``arrivals`` (None from a gateway older
    than that field); ValueError when a field is missing or mistyped."""
    if not isinstance(answer, dict):
        raise ValueError("the load answer is not a JSON object")
    values = {name: _count(answer, name) for name in _INT_FIELDS}
    draining = answer.get("draining")
    if type(draining) is not bool:
        raise ValueError(f"the load answer's 'draining' is {draining!r}, not a boolean")
    arrivals = _count(answer, "arrivals") if "arrivals" in answer else None
    return PodLoad(endpoint=endpoint, draining=draining, **values), arrivals


def _count(answer: dict[str, object], name: str) -> int:
    value = answer.get(name)
    if type(value) is not int or value < 0:
        raise ValueError(f"the load answer's {name!r} is {value!r}, not a count")
    return value


class PendingPicks:
    """What the picker sent one pod that the pod's latest load answer does not count yet.

    A pick reaches the pod's admission a while after it is made: the proxy forwards the request,
    the gateway reads and checks its body. A poll can overtake it (on a busy node it does), so
    "sent before the poll was asked" is not "counted in its answer": taking those out
    undercounted the pod, and a burst sent it more requests than it could start while another
    pod had room. So the gateway counts the requests its admission took in (``arrivals``), and
    an answer takes that many of the oldest picks out, however old the poll. Picks that never
    reach admission (refused at the pod's edge or for a bad body, routes that take no engine
    slot, requests the proxy dropped) are forgotten ``forget_after_s`` after they were sent.
    Requests that reach the pod by another way (another picker replica, a client straight to
    the pod) also count as arrivals and take out picks early: with them the count is as loose
    as the rule it replaced. From a gateway whose answer has no ``arrivals`` (older than the
    picker), an answer takes out the picks sent before the poll was asked, that older rule.
    """

    __slots__ = ("_arrivals", "_forget_after_s", "_picks", "batch")

    def __init__(self, forget_after_s: float) -> None:
        self._forget_after_s = forget_after_s
        self._picks: deque[tuple[float, bool]] = deque()
        self._arrivals: int | None = None
        self.batch = 0
        """Of the pending picks, the batch ones."""

    def __len__(self) -> int:
        return len(self._picks)

    def add(self, at: float, *, batch: bool) -> None:
        self._picks.append((at, batch))
        self.batch += batch

    def answered(self, asked_at: float, arrivals: int | None) -> int:
        """A load answer to a poll asked at ``asked_at`` came back with ``arrivals``. Returns how
        many picks it forgot (taken out by age, not counted)."""
        picks = self._picks
        if arrivals is None or self._arrivals is None or arrivals < self._arrivals:
            # No count to match, or a new gateway process counting from 0: the older rule.
            arrived = sum(1 for at, _ in picks if at < asked_at)
        else:
            arrived = arrivals - self._arrivals
        self._arrivals = arrivals
        forget_before = asked_at - self._forget_after_s
        forgotten = 0
        while picks and (arrived > 0 or picks[0][0] < forget_before):
            forgotten += arrived <= 0
            arrived -= 1
            self.batch -= picks.popleft()[1]
        return forgotten


KV_USAGE = b"vllm:kv_cache_usage_perc"


def kv_usage_of(exposition: bytes) -> float | None:
    """The highest ``vllm:kv_cache_usage_perc`` sample in a Prometheus text exposition (one per
    engine core), or None when there is none."""
    usages = []
    start = exposition.find(b"\n" + KV_USAGE)
    while start >= 0:
        end = exposition.find(b"\n", start + 1)
        line = exposition[start + 1:end if end >= 0 else len(exposition)]
        try:
            usages.append(float(line.rsplit(b" ", 1)[-1]))
        except ValueError:
            pass
        start = exposition.find(b"\n" + KV_USAGE, start + 1)
    return max(usages) if usages else None


@dataclass(slots=True)
class _Pod:
    pending: PendingPicks
    load: PodLoad | None = None
    observed_at: float = 0.0
    kv_usage: float | None = None
    kv_observed_at: float = 0.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class PoolLoad:
    """The latest load of each endpoint in the pool, kept fresh by one polling task per pod."""

    def __init__(self, client: aiohttp.ClientSession, metrics: EppMetrics, *, interval_s: float = 0.05,
                 timeout_s: float = 1.0, engine_metrics_port: int | None = None, kv_interval_s: float = 0.5,
                 kv_stale_after_s: float = 2.0, forget_pick_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._metrics = metrics
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._engine_metrics_port = engine_metrics_port
        self._kv_interval_s = kv_interval_s
        self._kv_stale_after_s = kv_stale_after_s
        self._forget_pick_after_s = forget_pick_after_s
        self._clock = clock
        self._pods: dict[str, _Pod] = {}
        self.polled = asyncio.Event()
        """Set once every endpoint known so far has been polled at least once (the picker's
        readiness: before, an empty pool would refuse everything for no reason)."""
        self._unpolled: set[str] = set()

    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """Poll exactly these endpoints (``ip:port``) from now on."""
        wanted = set(endpoints)
        for endpoint in self._pods.keys() - wanted:
            for task in self._pods.pop(endpoint).tasks:
                task.cancel()
            self._unpolled.discard(endpoint)
        for endpoint in wanted - self._pods.keys():
            pod = _Pod(PendingPicks(self._forget_pick_after_s))
            self._pods[endpoint] = pod
            self._unpolled.add(endpoint)
            pod.tasks.append(asyncio.create_task(self._poll(endpoint, pod), name=f"load {endpoint}"))
            if self._engine_metrics_port is not None:
                pod.tasks.append(asyncio.create_task(self._poll_kv(endpoint, pod), name=f"kv {endpoint}"))
        self._check_polled()

    def snapshot(self) -> list[PodLoad]:
        """Every pod with a current observation, its age and what was sent to it since."""
        now = self._clock()
        kv_since = now - self._kv_stale_after_s
        return [replace(pod.load, age_s=now - pod.observed_at, pending=len(pod.pending),
                        pending_batch=pod.pending.batch,
                        kv_usage=pod.kv_usage if pod.kv_observed_at >= kv_since else None)
                for pod in self._pods.values() if pod.load is not None]

    def sent(self, endpoint: str, *, batch: bool) -> None:
        """Count a request sent to ``endpoint`` until a poll's answer includes it."""
        pod = self._pods.get(endpoint)
        if pod is not None:
            pod.pending.add(self._clock(), batch=batch)

    def count_states(self, stale_after_s: float) -> dict[str, int]:
        """Endpoints by state, for the ``chatfleet_epp_endpoints`` gauge."""
        now = self._clock()
        states = {"ready": 0, "draining": 0, "stale": 0}
        for pod in self._pods.values():
            if pod.load is None or now - pod.observed_at > stale_after_s:
                states["stale"] += 1
            elif pod.load.draining:
                states["draining"] += 1
            else:
                states["ready"] += 1
        return states

    async def aclose(self) -> None:
        tasks = [task for pod in self._pods.values() for task in pod.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pods.clear()

    def _check_polled(self) -> None:
        if not self._unpolled:
            self.polled.set()

    async def _poll(self, endpoint: str, pod: _Pod) -> None:
        url = f"http://{endpoint}/load"
        polls = self._metrics.load_polls_total
        while True:
            asked_at = self._clock()
            try:
                async with self._client.get(url, timeout=self._timeout) as response:
                    if response.status != 200:
                        raise ValueError(f"GET /load answered {response.status}")
                    load, arrivals = parse_load(endpoint, orjson.loads(await response.read()))
            except TimeoutError:
                polls.labels(source="gateway", result="error").inc()
            except (aiohttp.ClientError, ValueError) as exc:
                polls.labels(source="gateway", result="error").inc()
                if pod.load is not None:
                    log.warning("epp: %s is out of the pool until its load answers: %s", endpoint, exc)
                pod.load = None
            else:
                polls.labels(source="gateway", result="ok").inc()
                pod.load, pod.observed_at = load, asked_at
                forgotten = pod.pending.answered(asked_at, arrivals)
                if forgotten:
                    self._metrics.picks_forgotten_total.inc(forgotten)
            if endpoint in self._unpolled:
                self._unpolled.discard(endpoint)
                self._check_polled()
            await asyncio.sleep(self._interval_s)

    async def _poll_kv(self, endpoint: str, pod: _Pod) -> None:
        host = endpoint.rpartition(":")[0]
        url = f"http://{host}:{self._engine_metrics_port}/metrics"
        polls = self._metrics.load_polls_total
        while True:
            asked_at = self._clock()
            try:
                async with self._client.get(url, timeout=self._timeout) as response:
                    usage = kv_usage_of(await response.read()) if response.status == 200 else None
                if usage is None:
                    raise ValueError(f"no {KV_USAGE.decode()} in the engine's /metrics "
                                     f"(status {response.status})")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                polls.labels(source="engine", result="error").inc()
                log.debug("epp: %s's engine KV usage unknown: %s", endpoint, exc)
            else:
                polls.labels(source="engine", result="ok").inc()
                pod.kv_usage, pod.kv_observed_at = usage, asked_at
            await asyncio.sleep(self._kv_interval_s)
