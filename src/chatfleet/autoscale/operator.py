"""The ChatFleet operator (kopf): on each tick, for each ChatFleetPolicy, read Prometheus, run the
pure policy (autoscale/policy.py) and set the target autoscaler's floor.

It cooperates with the HPA instead of replacing it: the only field it writes outside its own
resource is the HPA's ``spec.minReplicas`` (or a KEDA ScaledObject's ``spec.minReplicaCount``),
which it owns by server-side apply (autoscale/kube.py). In ``enforce`` mode that field is the
policy's floor. ``recommend`` mode writes the resource's status and, only when the target carries
the chart's floor (the ``chatfleet.io/chart-floor`` annotation: the chart leaves the field to the
operator), that floor, so a policy can be watched for a while before it is trusted while the
fleet keeps the floor its values ask for. The chart's floor is also where the hysteresis starts
on a policy's first tick. A Deployment's ``spec.replicas`` is
never written (autoscale/kube.py has no code path to it).

Every tick's decision and the inputs behind it go to ``status`` (a person reads why the floor is
what it is with ``kubectl get chatfleetpolicy -o yaml``), to a Kubernetes Event when the floor or
the policy's condition changes, and to ``chatfleet_operator_*`` metrics. The hysteresis state the
policy needs between ticks (the floor, and since when a lower one was proposed) is kept in the
status too, so a restarted or newly elected operator carries on where the last one stopped.

The cold start (the forecast's horizon) is the policy's ``coldStartSeconds`` when it sets one (a
person's figure wins); otherwise the one learned from the Deployment's own pods (creation to first
Ready, 90th percentile over the last hours, autoscale/prometheus.py), and until a pod has been
seen, ``DEFAULT_COLD_START_S``. The status says which (``inputs.coldStartSource``).

A policy that cannot be acted on (bounds the wrong way round, an unknown target kind, a missing
target, Prometheus down) is reported in its status and as a Warning Event; the operator goes on
with the other policies. One instance acts at a time: kopf peering (a ClusterKopfPeering object)
pauses every instance but the one with the highest priority.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf

from chatfleet.autoscale.kube import (
    TARGETS,
    KubeClient,
    KubeError,
    Target,
    TargetNotFound,
    chart_floor,
    current_floor,
    scale_target_name,
)
from chatfleet.autoscale.policy import Decision, PolicySpec, PolicyState, decide
from chatfleet.autoscale.prometheus import PrometheusError, PrometheusReader, ReadWindow
from chatfleet.telemetry.metrics import TTFT_BUCKETS, OperatorMetrics, TickOutcome

__all__ = ["DEFAULT_COLD_START_S", "GROUP", "MAX_COLD_START_S", "PLURAL", "VERSION",
           "OperatorConfig", "ParsedPolicy", "PolicyError", "build_registry", "cold_start_for",
           "parse_policy", "run"]

GROUP = "chatfleet.io"
VERSION = "v1alpha1"
PLURAL = "chatfleetpolicies"
MODES = ("recommend", "enforce")
DEFAULT_COLD_START_S = 120.0
"""The cold start of a policy that sets none, until one is learned from its pods."""
MAX_COLD_START_S = 3600.0
"""A learned cold start is taken up to this (the CRD's maximum for coldStartSeconds): a pod that
sat Pending for hours (a quota, a node pool at its limit) says nothing about the next one."""

log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """The policy's spec cannot be acted on; the message goes to its status."""


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    """How ``chatfleet operator`` runs (its command-line flags)."""

    prometheus_url: str
    interval_s: float = 30.0
    metrics_host: str = "0.0.0.0"  # the pod's metrics port, scraped in-cluster
    metrics_port: int = 9090
    peering_name: str | None = "chatfleet-operator"
    """kopf peering object (ClusterKopfPeering); None: standalone, no peering at all."""
    peering_mandatory: bool = True
    priority: int | None = None
    """kopf peering priority: of the live instances, the one with the highest acts and the others
    stand by. None: random, so that replicas of one Deployment never tie (kopf pauses every
    instance of a tie, which would leave none acting)."""
    liveness_endpoint: str | None = None
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty: all (cluster-wide)."""


@dataclass(frozen=True, slots=True)
class ParsedPolicy:
    """A ChatFleetPolicy's spec, checked."""

    target: Target
    target_name: str
    mode: str
    spec: PolicySpec
    ttft_seconds: float
    slo_error_ratio: float
    job: str | None
    cold_start_s: float | None = None
    """``spec.coldStartSeconds``; None: learned each tick (``spec.cold_start_s`` is then the
    default, replaced by ``cold_start_for``'s figure)."""


def cold_start_for(configured: float | None, learned: float | None) -> tuple[float, str]:
    """The forecast's horizon and where it came from: the policy's figure if it has one
    ("configured"), else the one observed on its pods ("learned", at most MAX_COLD_START_S),
    else DEFAULT_COLD_START_S ("default")."""
    if configured is not None:
        return configured, "configured"
    if learned is not None and math.isfinite(learned) and learned >= 0:
        return min(learned, MAX_COLD_START_S), "learned"
    return DEFAULT_COLD_START_S, "default"


def _number(spec: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"spec.{key} must be a number, got {value!r}")
    return float(value)


def _integer(spec: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"spec.{key} must be an integer, got {value!r}")
    return value


def parse_policy(spec: Mapping[str, Any]) -> ParsedPolicy:
    """The spec as the policy takes it; PolicyError saying what is wrong otherwise.

    The CRD's schema rejects most of these already; this is for what a schema cannot say
    (min <= max) on API servers without CEL validation, and for objects stored before.
    """
    ref = spec.get("targetRef")
    if not isinstance(ref, Mapping):
        raise PolicyError("spec.targetRef is missing")
    kind, name = ref.get("kind"), ref.get("name")
    if kind not in TARGETS:
        raise PolicyError(f"spec.targetRef.kind {kind!r} is not one of {sorted(TARGETS)}")
    if not isinstance(name, str) or not name:
        raise PolicyError("spec.targetRef.name is missing")
    mode = spec.get("mode", "recommend")
    if mode not in MODES:
        raise PolicyError(f"spec.mode {mode!r} is not one of {list(MODES)}")
    slo = spec.get("slo") or {}
    ttft = _number(slo, "ttftSeconds", 2.0)
    if ttft not in TTFT_BUCKETS:
        raise PolicyError(f"spec.slo.ttftSeconds {ttft:g} is not a bound of the TTFT histogram "
                          f"({', '.join(f'{b:g}' for b in TTFT_BUCKETS)})")
    cold_start = (None if spec.get("coldStartSeconds") is None
                  else _number(spec, "coldStartSeconds"))
    attainment = _number(slo, "attainment", 0.99)
    if not 0 < attainment <= 1:
        raise PolicyError(f"spec.slo.attainment {attainment:g} is not in (0, 1]")
    try:
        policy = PolicySpec(
            min_replicas=_integer(spec, "minReplicas"),
            max_replicas=_integer(spec, "maxReplicas"),
            cold_start_s=DEFAULT_COLD_START_S if cold_start is None else cold_start,
            replica_capacity=_number(spec, "replicaCapacity"),
            target_utilization=_number(spec, "targetUtilization", 1.0),
            trend_window_s=_number(spec, "trendWindowSeconds", 600.0),
            lower_after_s=_number(spec, "lowerAfterSeconds", 600.0),
        )
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc
    if policy.trend_window_s <= 0 or policy.lower_after_s < 0:
        raise PolicyError("spec.trendWindowSeconds must be > 0 and spec.lowerAfterSeconds >= 0")
    job = spec.get("job")
    return ParsedPolicy(target=TARGETS[kind], target_name=name, mode=mode, spec=policy,
                        ttft_seconds=ttft, slo_error_ratio=1 - attainment,
                        job=job if isinstance(job, str) and job else None,
                        cold_start_s=cold_start)


def previous_state(status: Mapping[str, Any], spec: PolicySpec,
                   start: int | None = None) -> PolicyState | None:
    """The hysteresis state the last tick left in the status, clamped to today's bounds; on the
    first tick, ``start`` (the chart's floor) if given."""
    floor = status.get("floor")
    if isinstance(floor, bool) or not isinstance(floor, int):
        if start is None:
            return None
        floor = start
    lower_since = status.get("lowerSince")
    return PolicyState(floor=min(max(floor, spec.min_replicas), spec.max_replicas),
                       lower_since=float(lower_since) if isinstance(lower_since, int | float)
                       else None)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(ok: bool, reason: str, message: str, status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Ready condition; its transition time moves only when its status does."""
    old = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    state = "True" if ok else "False"
    since = old.get("lastTransitionTime") if old.get("status") == state else None
    return [{"type": "Ready", "status": state, "reason": reason, "message": message[:1000],
             "lastTransitionTime": since or _now_iso()}]


@dataclass
class Runtime:
    """What the handlers share in one operator process."""

    config: OperatorConfig
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    prometheus: PrometheusReader | None = None
    kube: KubeClient | None = None
    _metrics_server: Any = None

    def reader(self) -> PrometheusReader:
        if self.prometheus is None:
            self.prometheus = PrometheusReader(self.config.prometheus_url)
        return self.prometheus

    def client(self) -> KubeClient:
        if self.kube is None:
            raise KubeError("not logged in to the API server yet")
        return self.kube


def _report_problem(runtime: Runtime, body: kopf.Body, patch: kopf.Patch, status: Mapping[str, Any],
                    namespace: str, name: str, outcome: TickOutcome, reason: str,
                    message: str) -> None:
    """A tick that changed nothing: why, in the status and (when new) as a Warning Event."""
    runtime.metrics.tick(namespace, name, outcome)
    patch.status["conditions"] = _condition(False, reason, message, status)
    patch.status["lastTick"] = _now_iso()
    patch.status["reason"] = message
    old = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if old.get("reason") != reason or old.get("message") != message[:1000]:
        kopf.warn(body, reason=reason, message=message)
    log.warning("%s/%s: %s", namespace, name, message)


async def evaluate(runtime: Runtime, body: kopf.Body, spec: Mapping[str, Any],
                   status: Mapping[str, Any], namespace: str, name: str, patch: kopf.Patch) -> None:
    """One tick for one policy. Writes only ``patch`` (its status) and the target's floor: in
    enforce mode the policy's, in recommend mode the chart's (before Prometheus is read)."""
    patch.status["observedGeneration"] = body.metadata.get("generation")
    try:
        policy = parse_policy(spec)
    except PolicyError as exc:
        _report_problem(runtime, body, patch, status, namespace, name, TickOutcome.INVALID_POLICY,
                        "InvalidPolicy", str(exc))
        return
    patch.status["mode"] = policy.mode
    try:
        target_obj = await runtime.client().get_target(policy.target, namespace, policy.target_name)
    except TargetNotFound:
        _report_problem(runtime, body, patch, status, namespace, name, TickOutcome.TARGET_MISSING,
                        "TargetNotFound", f"{policy.target.kind} {namespace}/{policy.target_name} "
                        "does not exist")
        return
    except KubeError as exc:
        _report_problem(runtime, body, patch, status, namespace, name, TickOutcome.KUBE_ERROR,
                        "KubernetesError", str(exc))
        return
    charts = chart_floor(target_obj)
    before = current_floor(policy.target, target_obj)
    after: int | None = before
    if policy.mode == "recommend" and charts is not None:
        # The chart's floor needs nothing from Prometheus: it is held from the first tick, even
        # while Prometheus cannot be read (a wrong URL would otherwise leave a ScaledObject at 0).
        after = await _hold_floor(runtime, body, patch, status, namespace, name, policy, before,
                                  charts)
        if after is None:
            return
    job = policy.job or scale_target_name(target_obj)
    if job is None:
        _report_problem(runtime, body, patch, status, namespace, name, TickOutcome.INVALID_POLICY,
                        "InvalidPolicy", f"{policy.target.kind} {policy.target_name} has no "
                        "spec.scaleTargetRef.name and spec.job is not set")
        return
    now = time.time()
    try:
        learned = (None if policy.cold_start_s is not None
                   else await runtime.reader().cold_start(namespace, job, now))
        cold_start_s, cold_start_source = cold_start_for(policy.cold_start_s, learned)
        spec_now = replace(policy.spec, cold_start_s=cold_start_s)
        window = ReadWindow(trend_window_s=spec_now.trend_window_s, horizon_s=cold_start_s)
        observations = await runtime.reader().observations(
            namespace, job, now, window, slo_error_ratio=policy.slo_error_ratio,
            ttft_seconds=policy.ttft_seconds)
    except PrometheusError as exc:
        _report_problem(runtime, body, patch, status, namespace, name,
                        TickOutcome.PROMETHEUS_ERROR, "PrometheusUnavailable", str(exc))
        return

    decision = decide(spec_now, observations, previous_state(status, spec_now, start=charts))
    if policy.mode == "enforce":
        after = await _hold_floor(runtime, body, patch, status, namespace, name, policy, before,
                                  decision.floor)
        if after is None:
            return
    _record(runtime, body, patch, status, namespace, name, policy, decision, observations_info={
        "job": job,
        "ratePoints": len(observations.rates),
        "lastRate": observations.rates[-1].rate if observations.rates else None,
        "capacitySamples": len(observations.capacity_samples),
        "coldStartSeconds": round(cold_start_s, 3),
        "coldStartSource": cold_start_source,
    }, before=before, after=after)


async def _hold_floor(runtime: Runtime, body: kopf.Body, patch: kopf.Patch,
                      status: Mapping[str, Any], namespace: str, name: str, policy: ParsedPolicy,
                      current: int | None, wanted: int) -> int | None:
    """Sets the target's floor to ``wanted`` unless it is there already; the floor after, or None
    when the API server refused (reported in the status)."""
    if current == wanted:
        return current
    try:
        await runtime.client().set_floor(policy.target, namespace, policy.target_name, wanted)
    except KubeError as exc:
        _report_problem(runtime, body, patch, status, namespace, name, TickOutcome.KUBE_ERROR,
                        "KubernetesError", str(exc))
        return None
    runtime.metrics.floor_patches_total.labels(policy_namespace=namespace, policy=name).inc()
    return wanted


def _record(runtime: Runtime, body: kopf.Body, patch: kopf.Patch, status: Mapping[str, Any],
            namespace: str, name: str, policy: ParsedPolicy, decision: Decision,
            observations_info: dict[str, Any], before: int | None, after: int | None) -> None:
    """The decision and its inputs: status, metrics, and an Event when the floor changes."""
    labels = {"policy_namespace": namespace, "policy": name}
    m = runtime.metrics
    m.tick(namespace, name, TickOutcome.DECIDED)
    m.floor.labels(**labels).set(decision.floor)
    m.needed_replicas.labels(**labels).set(decision.needed)
    m.forecast_rate.labels(**labels).set(decision.forecast_rate)
    m.replica_capacity.labels(**labels).set(decision.replica_capacity)

    applied = policy.mode == "enforce"
    patch.status.update({
        "floor": decision.floor,
        "lowerSince": decision.state.lower_since,
        "neededReplicas": decision.needed,
        "forecastRequestsPerSecond": round(decision.forecast_rate, 6),
        "replicaCapacity": round(decision.replica_capacity, 6),
        "reason": decision.reason,
        "targetMinReplicas": after,
        "applied": applied,
        "inputs": observations_info,
        "lastTick": _now_iso(),
        "conditions": _condition(True, "Enforced" if applied else "Recommended", decision.reason,
                                 status),
    })
    old = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if status.get("floor") != decision.floor or old.get("status") != "True" or before != after:
        verb = "set" if applied else "recommends"
        kopf.info(body, reason="FloorSet" if applied else "FloorRecommended",
                  message=f"{verb} {policy.target.kind} {policy.target_name} floor "
                          f"{decision.floor} (was {before}): {decision.reason}")


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """kopf handlers bound to ``runtime``, in a registry of their own (no module-level state)."""
    registry = kopf.OperatorRegistry()
    config = runtime.config

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.mandatory = config.peering_mandatory
        settings.peering.clusterwide = not config.namespaces
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        # Only ChatFleetPolicies are watched, in the namespaces given at start: no watching of
        # CRDs or namespaces for new ones, so RBAC needs nothing on them (restart to pick up a
        # CRD installed after the operator).
        settings.scanning.disabled = True
        from prometheus_client import start_http_server
        server, _thread = start_http_server(config.metrics_port, addr=config.metrics_host,
                                            registry=runtime.metrics.registry)
        runtime._metrics_server = server
        log.info("metrics on http://%s:%d/metrics; Prometheus at %s; tick every %g s",
                 config.metrics_host, config.metrics_port, config.prometheus_url, config.interval_s)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if runtime.prometheus is not None:
            await runtime.prometheus.aclose()
        if runtime.kube is not None:
            await runtime.kube.aclose()
        if runtime._metrics_server is not None:
            runtime._metrics_server.shutdown()

    @kopf.on.login(registry=registry)
    async def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
        """In a pod: its service account; elsewhere: the kubeconfig. The operator's own calls
        (autoscale/kube.py) use the same credentials."""
        info = (kopf.login_with_service_account(settings=settings, **kwargs)
                or kopf.login_with_kubeconfig(settings=settings, **kwargs))
        if info is not None:
            old, runtime.kube = runtime.kube, KubeClient(info)
            if old is not None:
                await old.aclose()
        return info

    @kopf.timer(GROUP, VERSION, PLURAL, interval=config.interval_s, initial_delay=0,
                registry=registry)
    async def tick(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, namespace: str,
                   name: str, patch: kopf.Patch, **_: Any) -> None:
        with runtime.metrics.tick_seconds.time():
            await evaluate(runtime, body, spec, status, namespace, name, patch)

    return registry


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """kopf's formatter: every line about a policy starts with ``[namespace/name]``."""
    level = level.lower()
    kopf.configure(debug=level == "debug", quiet=level in ("warning", "error", "critical"),
                   log_format=LOG_FORMAT, log_prefix=True)
    for noisy in ("httpx", "httpcore"):  # a line per request of every tick
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(config: OperatorConfig) -> None:
    """Run the operator until SIGTERM/SIGINT (kopf's own loop and signal handling)."""
    runtime = Runtime(config)
    registry = build_registry(runtime)
    standalone = config.peering_name is None
    priority = config.priority if config.priority is not None else random.randint(1, 2**30)
    if not standalone:
        log.info("peering %r with priority %d", config.peering_name, priority)
    asyncio.run(kopf.operator(
        registry=registry,
        standalone=standalone,
        priority=priority,
        peering_name=config.peering_name,
        liveness_endpoint=config.liveness_endpoint,
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
    ))
