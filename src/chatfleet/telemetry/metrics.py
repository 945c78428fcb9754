"""Every Prometheus metric ChatFleet exports, defined once: the metric contract.

Two families live here:

- ``GatewayMetrics``: the gateway's own ``chatfleet_*`` metrics (queue, slots, outcomes, latency,
  tokens, readiness). The HPA scales on ``chatfleet_queue_depth``; dashboards and alerts use these.
- ``EngineSimMetrics``: what ``chatfleet engine-sim`` exports under **vLLM's own names**
  (``vllm:*``, with vLLM's ``engine`` and ``model_name`` labels), so dashboards built on it work on a
  real vLLM server. They are the engine's names, never the gateway's.

- ``OperatorMetrics``: ``chatfleet operator``'s ``chatfleet_operator_*`` metrics (ticks, the
  floor it decided, its inputs), on the operator's own port.

- ``EppMetrics``: ``chatfleet epp``'s ``chatfleet_epp_*`` metrics (picks and refusals, the time a
  decision takes, the pods' load observations and their age), on the picker's own port.

Each class owns a private ``CollectorRegistry`` so several apps can live in one process (tests).

A pod of worker processes (``server.workers`` above 1) runs prometheus-client's multiprocess
mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory) before anything imports
prometheus_client, every process writes its values to files there, and a ``/metrics`` scrape of any
worker renders the files of all (``GatewayMetrics.exposition``): the pod's totals, with the labels
a single process has. A dead worker's counter and histogram files stay, so totals never go back.
Each gauge says how its values combine (``multiprocess_mode``, ignored in a single process): the
live processes' sum where each counts its own share (queue depth, requests running: the pod's
coordinator in the supervisor counts them, the workers' stay 0), the live maximum where every
process holds the same value or the pod's is "any" (engine slots, build info, ready: some worker
serves; draining: some worker drains). A dead worker's gauges leave with it
(``mark_process_dead``). The files keep no HELP text; ``_PodCollector`` puts back this process's
own, so a pod's exposition reads as a single process's.
Labels are closed sets: model (one per process), route (the endpoint template), priority, outcome,
reason (of an authentication refusal; never the key).
docs/metrics.md documents every name; tests check that /metrics matches that page.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable
from enum import StrEnum

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "CONTENT_TYPE_LATEST",
    "AuthRejection",
    "EngineSimMetrics",
    "EppMetrics",
    "PickOutcome",
    "GatewayMetrics",
    "HistogramTally",
    "OperatorMetrics",
    "Outcome",
    "TickOutcome",
    "WorkerRestartReason",
    "multiprocess_dir",
    "render",
]

disable_created_metrics()  # no *_created series: they double the exposition and no rule uses them

# LLM latencies span milliseconds (a token) to minutes (a long answer behind a queue).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                    120.0, 180.0, 300.0, 600.0)
RETRIEVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0,
                      30.0, 60.0, 120.0, 300.0)
# vLLM's own bucket boundaries (vllm/v1/metrics/loggers.py), so engine-sim histograms line up.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class HistogramTally:
    """Observations of one histogram child, counted here and added to it in one go (``flush``).

    The relay observes an inter-token gap per token. prometheus-client's ``observe`` takes a lock
    and walks the buckets every time (about 1.6 µs a token in one process, 3.2 µs in multiprocess
    mode, where each write goes to a file-mapped value), a few percent of the gateway's CPU per
    relayed token. A stream's gaps are counted per bucket here and added to the child, one ``inc``
    per bucket that moved, once ``flush_every`` are waiting or ``flush_after_s`` after the last
    flush (so the histogram lags a stream by at most that: a stalled stream's count stops within
    it), and when the stream ends. The child is read as prometheus-client lays it out (its
    bounds, bucket values and sum); tests/unit/test_metrics_tally.py checks that a tally's
    exposition is ``observe``'s.
    """

    __slots__ = ("_bounds", "_buckets", "_counts", "_flush_after_s", "_flush_every", "_flushed_at",
                 "_pending", "_sum", "_total")

    def __init__(self, child: Histogram, *, flush_every: int = 64, flush_after_s: float = 0.1) -> None:
        self._bounds: list[float] = child._upper_bounds  # type: ignore[attr-defined]
        self._buckets = child._buckets  # type: ignore[attr-defined]
        self._sum = child._sum  # type: ignore[attr-defined]
        self._counts = [0] * len(self._bounds)
        self._total = 0.0
        self._pending = 0
        self._flush_every = flush_every
        self._flush_after_s = flush_after_s
        self._flushed_at = 0.0

    def observe(self, amount: float, *, at: float, times: int = 1) -> None:
        """``amount`` observed ``times`` times; ``at``: the caller's ``time.perf_counter()``."""
        self._counts[bisect_left(self._bounds, amount)] += times
        self._total += amount * times
        self._pending += times
        if self._pending >= self._flush_every or at - self._flushed_at >= self._flush_after_s:
            self.flush()
            self._flushed_at = at

    def flush(self) -> None:
        if not self._pending:
            return
        counts = self._counts
        for i, count in enumerate(counts):
            if count:
                self._buckets[i].inc(count)
                counts[i] = 0
        self._sum.inc(self._total)
        self._total = 0.0
        self._pending = 0


class Outcome(StrEnum):
    """How a request ended, as the ``outcome`` label of chatfleet_requests_total."""

    OK = "ok"
    """Answered completely (finish_reason stop or length)."""
    INVALID = "invalid"
    """Refused as asked (4xx): bad body, unknown model, or the engine refused it (too long)."""
    QUEUE_FULL = "queue_full"
    """429: the queue was at its bound."""
    QUEUE_TIMEOUT = "queue_timeout"
    """429: waited longer than max_queue_wait_s."""
    DRAINING = "draining"
    """503: arrived while the pod was draining."""
    CLIENT_DISCONNECTED = "client_disconnected"
    """The client went away (while queued or mid-answer), or read nothing for server.send_timeout_s
    and was cut off; the engine request was aborted."""
    ENGINE_ERROR = "engine_error"
    """The engine refused or failed the request."""


class AuthRejection(StrEnum):
    """Why API-key authentication refused a request (``reason`` of chatfleet_auth_rejections_total)."""

    MISSING = "missing"
    """401: no ``Authorization: Bearer <key>`` header (none, another scheme, or an empty key)."""
    INVALID = "invalid"
    """401: a key was sent but it is none of the configured ones."""
    RATE_LIMITED = "rate_limited"
    """429: a valid key over its per-key request rate (auth.rate_limit_rps)."""
    TOO_MANY_FAILURES = "too_many_failures"
    """429: the client's address sent too many wrong keys (auth.failed_keys_per_s); not compared."""


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, when this process is one of a pod's
    (its own variable, which prometheus-client reads when it is first imported)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class WorkerRestartReason(StrEnum):
    """Why the supervisor replaced a worker (``reason`` of chatfleet_worker_restarts_total)."""

    EXITED = "exited"
    """The worker exited or was killed by a signal (a crash, the OOM killer, ``kill -9``)."""
    HUNG = "hung"
    """Its event loop sent no heartbeat for ``server.worker_hang_timeout_s``: killed, replaced."""


class _PodCollector(Collector):
    """Every process's files (``MultiProcessCollector``), with the HELP text of the metrics as
    defined here: the files carry none, and prometheus-client would say "Multiprocess metric"."""

    def __init__(self, path: str, definitions: CollectorRegistry) -> None:
        self._files = MultiProcessCollector(None, path=path)
        self._definitions = definitions
        self._help: dict[str, str] | None = None

    def collect(self) -> Iterable[Metric]:
        if self._help is None:  # every metric is defined by the first scrape
            self._help = {family.name: family.documentation
                          for family in self._definitions.collect()}
        for family in self._files.collect():
            family.documentation = self._help.get(family.name, family.documentation)
            yield family


class GatewayMetrics:
    """The gateway's metrics. One instance per app; ``model`` is fixed for the process.

    ``registry`` holds this instance's metrics; ``exposition`` is what /metrics renders: the same
    registry in a single process, every process's files in a pod's multiprocess mode."""

    def __init__(self, *, model: str, engine_kind: str, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.model = model
        self.exposition = r
        if (shared := multiprocess_dir()) is not None:
            self.exposition = CollectorRegistry()
            self.exposition.register(_PodCollector(shared, r))

        self.queue_depth = Gauge(
            "chatfleet_queue_depth",
            "Requests waiting in the gateway's admission queue for an engine slot.",
            ["model", "priority"], registry=r, multiprocess_mode="livesum")
        self.requests_running = Gauge(
            "chatfleet_requests_running",
            "Requests holding an engine slot (sent to the engine, not finished).",
            ["model"], registry=r, multiprocess_mode="livesum")
        self.engine_slots = Gauge(
            "chatfleet_engine_slots",
            "Engine slots: the most requests the gateway lets through to the engine at once.",
            ["model"], registry=r, multiprocess_mode="livemax")
        self.requests_total = Counter(
            "chatfleet_requests",
            "Requests finished, by route and outcome.",
            ["model", "route", "outcome"], registry=r)
        self.queue_wait_seconds = Histogram(
            "chatfleet_queue_wait_seconds",
            "Time from arrival to an engine slot (or to rejection), by priority.",
            ["model", "priority"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.ttft_seconds = Histogram(
            "chatfleet_ttft_seconds",
            "Time from arrival at the gateway to the first output token, queue wait included.",
            ["model", "route"], buckets=TTFT_BUCKETS, registry=r)
        self.itl_seconds = Histogram(
            "chatfleet_itl_seconds",
            "Time between consecutive output tokens of one answer, as the gateway relays them.",
            ["model"], buckets=ITL_BUCKETS, registry=r)
        self.request_duration_seconds = Histogram(
            "chatfleet_request_duration_seconds",
            "Time from arrival to the last byte of the answer, for requests that were admitted.",
            ["model", "route"], buckets=DURATION_BUCKETS, registry=r)
        self.prompt_tokens_total = Counter(
            "chatfleet_prompt_tokens",
            "Prompt tokens of admitted requests, as the engine counted them.",
            ["model"], registry=r)
        self.completion_tokens_total = Counter(
            "chatfleet_completion_tokens",
            "Output tokens relayed to clients.",
            ["model"], registry=r)
        self.ready = Gauge(
            "chatfleet_ready",
            "1 when the engine lists the served model and the gateway is not draining, else 0.",
            registry=r, multiprocess_mode="livemax")
        self.draining = Gauge(
            "chatfleet_draining",
            "1 after SIGTERM while in-flight requests finish, else 0.",
            registry=r, multiprocess_mode="livemax")
        self.retrieval_seconds = Histogram(
            "chatfleet_retrieval_seconds",
            "Time to retrieve a knowledge-base question's chunks (query embedding, both searches "
            "and fusion), by store and retrieval mode.",
            ["store", "mode"], buckets=RETRIEVAL_BUCKETS, registry=r)
        self.ingest_chunks_total = Counter(
            "chatfleet_ingest_chunks",
            "Chunks stored in knowledge bases (uploads, updates and rebuilds), by store.",
            ["store"], registry=r)
        self.ingest_files_total = Counter(
            "chatfleet_ingest_files",
            "Files offered to a knowledge base, by store and outcome (ok, rejected: the file or "
            "its name was refused, failed: the embeddings endpoint or the store failed).",
            ["store", "outcome"], registry=r)
        self.knowledge_chat_ttft_seconds = Histogram(
            "chatfleet_knowledge_chat_ttft_seconds",
            "Knowledge-base chat time to first token, split by phase: retrieval (arrival to "
            "chunks retrieved), queue (to an engine slot), engine (to the first token). The phases "
            "of one request add up to its TTFT.",
            ["model", "phase"], buckets=TTFT_BUCKETS, registry=r)
        self.auth_rejections_total = Counter(
            "chatfleet_auth_rejections",
            "Requests refused by API-key authentication before any other work, by reason "
            "(missing, invalid: 401; rate_limited: 429). Never labelled by key.",
            ["reason"], registry=r)
        self.build_info = Gauge(
            "chatfleet_build_info",
            "Always 1; labels say the ChatFleet version, engine kind and served model.",
            ["version", "engine_kind", "model"], registry=r, multiprocess_mode="livemax")
        self.worker_restarts_total = Counter(
            "chatfleet_worker_restarts",
            "Gateway worker processes the supervisor replaced, by reason (exited: it exited or "
            "was killed; hung: its event loop stopped answering). Always 0 with one process.",
            ["reason"], registry=r)

        self.build_info.labels(version=version, engine_kind=engine_kind, model=model).set(1)
        for priority in ("interactive", "batch"):
            self.queue_depth.labels(model=model, priority=priority)
            self.queue_wait_seconds.labels(model=model, priority=priority)
        self.requests_running.labels(model=model)
        self.prompt_tokens_total.labels(model=model)
        self.completion_tokens_total.labels(model=model)
        self.itl_seconds.labels(model=model)
        for phase in ("retrieval", "queue", "engine"):
            self.knowledge_chat_ttft_seconds.labels(model=model, phase=phase)
        for reason in AuthRejection:
            self.auth_rejections_total.labels(reason=reason.value)
        for why in WorkerRestartReason:
            self.worker_restarts_total.labels(reason=why.value)


class EngineSimMetrics:
    """engine-sim's metrics under vLLM's names and labels (``engine``, ``model_name``)."""

    def __init__(self, *, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = {"engine": "0", "model_name": model_name}
        names = list(labels)

        self.num_requests_running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            names, registry=r).labels(**labels)
        self.num_requests_waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
            names, registry=r).labels(**labels)
        self.kv_cache_usage_perc = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            names, registry=r).labels(**labels)
        self.num_preemptions_total = Counter(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
            names, registry=r).labels(**labels)
        self.prompt_tokens_total = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.",
            names, registry=r).labels(**labels)
        self.generation_tokens_total = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.",
            names, registry=r).labels(**labels)
        self.prefix_cache_queries_total = Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            names, registry=r).labels(**labels)
        self.prefix_cache_hits_total = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            names, registry=r).labels(**labels)
        self._request_success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            [*names, "finished_reason"], registry=r)
        self.time_to_first_token_seconds = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            names, buckets=VLLM_TTFT_BUCKETS, registry=r).labels(**labels)
        self.inter_token_latency_seconds = Histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            names, buckets=VLLM_ITL_BUCKETS, registry=r).labels(**labels)
        self.e2e_request_latency_seconds = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            names, buckets=VLLM_E2E_BUCKETS, registry=r).labels(**labels)
        self._labels = labels
        for reason in ("stop", "length", "abort"):
            self.request_success(reason)

    def request_success(self, finished_reason: str) -> Counter:
        """The vllm:request_success_total child for one finish reason (stop, length, abort)."""
        return self._request_success.labels(**self._labels, finished_reason=finished_reason)


class TickOutcome(StrEnum):
    """How one operator tick on one ChatFleetPolicy ended (``outcome`` of the ticks counter)."""

    DECIDED = "decided"
    """A floor was decided (and, in enforce mode, applied)."""
    INVALID_POLICY = "invalid_policy"
    """The policy's spec cannot be acted on (reported in its status)."""
    TARGET_MISSING = "target_missing"
    """The HPA or ScaledObject it names does not exist."""
    PROMETHEUS_ERROR = "prometheus_error"
    """Prometheus did not answer: nothing changed."""
    KUBE_ERROR = "kube_error"
    """The API server refused or failed a call: nothing changed."""


class OperatorMetrics:
    """``chatfleet operator``'s own metrics, on its own /metrics port (not the gateway's).

    Labelled by the ChatFleetPolicy (``policy_namespace``, ``policy``): Prometheus adds the
    operator pod's own ``namespace`` label, so the policy's is named apart.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        names = ["policy_namespace", "policy"]
        self.ticks_total = Counter(
            "chatfleet_operator_ticks", "Policy evaluations, by how they ended.",
            [*names, "outcome"], registry=r)
        self.floor = Gauge(
            "chatfleet_operator_floor", "The floor (minReplicas) the policy decided last.",
            names, registry=r)
        self.needed_replicas = Gauge(
            "chatfleet_operator_needed_replicas",
            "Replicas the forecast needs, before bounds and hysteresis.", names, registry=r)
        self.forecast_rate = Gauge(
            "chatfleet_operator_forecast_requests_per_second",
            "Requests/s forecast one cold start ahead.", names, registry=r)
        self.replica_capacity = Gauge(
            "chatfleet_operator_replica_capacity_requests_per_second",
            "Requests/s one replica serves within the SLO (learned or configured).",
            names, registry=r)
        self.floor_patches_total = Counter(
            "chatfleet_operator_floor_patches",
            "Times the target's minReplicas / minReplicaCount was patched (enforce mode).",
            names, registry=r)
        self.tick_seconds = Histogram(
            "chatfleet_operator_tick_seconds",
            "Time one policy evaluation took (Prometheus reads and API calls included).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=r)

    def tick(self, namespace: str, policy: str, outcome: TickOutcome) -> None:
        self.ticks_total.labels(policy_namespace=namespace, policy=policy,
                                outcome=outcome.value).inc()


class PickOutcome(StrEnum):
    """How the endpoint picker answered a request, as the ``outcome`` label of
    chatfleet_epp_picks_total: the tier the picked pod offered, or the refusal."""

    SLOT = "slot"
    QUEUE = "queue"
    DISPLACE = "displace"
    REFUSED_FULL = "refused_full"
    REFUSED_UNAVAILABLE = "refused_unavailable"


class EppMetrics:
    """``chatfleet epp``'s own metrics, on its own /metrics port.

    Endpoints are not a label: a pod's address changes with every restart, so per-endpoint
    series would pile up; the pool's state is counted by ``state`` instead.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.picks_total = Counter(
            "chatfleet_epp_picks", "Requests the picker answered, by priority and outcome.",
            ["priority", "outcome"], registry=r)
        self.decision_seconds = Histogram(
            "chatfleet_epp_decision_seconds",
            "Time from the request's last message from the proxy to the picker's answer.",
            buckets=(0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r)
        self.endpoints = Gauge(
            "chatfleet_epp_endpoints",
            "The pool's endpoints by state: ready (fresh load, not draining), draining, stale "
            "(no load within the staleness bound).", ["state"], registry=r)
        self.load_age_seconds = Histogram(
            "chatfleet_epp_load_age_seconds",
            "Age of the picked pod's load observation at the moment of the pick.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0), registry=r)
        self.load_polls_total = Counter(
            "chatfleet_epp_load_polls",
            "Polls of the pods' load: the gateway's GET /load, the engine's KV usage; by result.",
            ["source", "result"], registry=r)
        self.picks_forgotten_total = Counter(
            "chatfleet_epp_picks_forgotten",
            "Picks no load answer of their pod counted within --forget-pick-after: requests that "
            "never reached the pod's admission, or took longer to.", registry=r)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of one registry, for a /metrics route."""
    return generate_latest(registry)
