"""The Kubernetes HorizontalPodAutoscaler (autoscaling/v2) as kube-controller-manager runs it, in virtual time.

The fleet simulator has to scale its pods the way the cluster will, or its verdicts on targets,
windows and policies mean nothing. So this is not "an autoscaler like the HPA" but the podautoscaler
controller's arithmetic (pkg/controller/podautoscaler: horizontal.go, replica_calculator.go),
rule for rule, including the parts that surprise people:

- quantities are compared in integer milli-units, and a Pods metric's average is an integer
  division (``GetMetricUsageRatio``);
- for Pods metrics only Pending pods count as not ready; a Running pod that is not Ready but
  reports a value counts in full (pod readiness is looked at for the CPU resource only);
- a pod with no value counts as 0 on a scale-up and as exactly the target on a scale-down, and the
  recalculated ratio must still point the same way and leave the tolerance, or nothing happens;
- Object and External metrics with a ``Value`` target scale by the *ready* pods, those with an
  ``AverageValue`` target by ``scale.status.replicas``;
- if any metric cannot be computed the HPA may scale up on the others but never down;
- with ``behavior`` unset the controller takes its legacy path (highest recommendation of the
  last 5 minutes, scale-up limited to max(2 x current, 4)), not the documented default policies;
  with ``behavior`` set, unset fields get the API server's defaults;
- stabilisation keeps the unstabilised recommendations and rate limits keep the replica changes the
  HPA itself made, each compared with a strict "after now - window" as the controller does.

Resource (CPU/memory utilisation) metrics are left out: ChatFleet scales on its queue.

Time is seconds on the simulator's clock. :class:`HorizontalPodAutoscaler` keeps the histories the
controller keeps in memory; call :meth:`HorizontalPodAutoscaler.step` once per sync period
(:data:`SYNC_PERIOD_S`) with what the controller would see, and apply ``Decision.desired``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any

__all__ = [
    "DEFAULT_DOWNSCALE_STABILIZATION_S",
    "DEFAULT_TOLERANCE",
    "SYNC_PERIOD_S",
    "Behavior",
    "ControllerConfig",
    "Decision",
    "ExternalMetric",
    "HPASpec",
    "HorizontalPodAutoscaler",
    "MetricProposal",
    "MetricSpec",
    "ObjectMetric",
    "Observation",
    "PodObservation",
    "PodPhase",
    "PodsMetric",
    "PolicyType",
    "Reason",
    "ScalingPolicy",
    "ScalingRules",
    "SelectPolicy",
    "TargetType",
    "compute_replicas_for_metrics",
    "default_scale_down_rules",
    "default_scale_up_rules",
    "parse_quantity",
    "rules_from_manifest",
    "spec_from_manifest",
    "to_milli",
]

SYNC_PERIOD_S = 15.0
"""kube-controller-manager ``--horizontal-pod-autoscaler-sync-period`` default."""
DEFAULT_TOLERANCE = 0.1
"""``--horizontal-pod-autoscaler-tolerance`` default."""
DEFAULT_DOWNSCALE_STABILIZATION_S = 300.0
"""``--horizontal-pod-autoscaler-downscale-stabilization`` default (5m)."""

# The legacy (behavior unset) scale-up limit: max(factor x current, minimum), horizontal.go.
_SCALE_UP_LIMIT_FACTOR = 2.0
_SCALE_UP_LIMIT_MINIMUM = 4.0


def to_milli(value: float) -> int:
    """A number as the controller reads it: ``Quantity.MilliValue()``, i.e. ceil(value x 1000).

    The rounding to 6 places first drops float noise (0.9 x 1000 = 900.0000000000001), which a
    Quantity parsed from "900m" or "0.9" never has.
    """
    return math.ceil(round(value * 1000.0, 6))


# --- spec ------------------------------------------------------------------------------------


class TargetType(Enum):
    """``MetricTarget.type`` for the metric sources modelled here (Utilization is Resource-only)."""

    VALUE = "Value"
    AVERAGE_VALUE = "AverageValue"


@dataclass(frozen=True, slots=True)
class PodsMetric:
    """``type: Pods``: a per-pod metric averaged over the pods; the target is always AverageValue."""

    name: str
    average_value: float


@dataclass(frozen=True, slots=True)
class ObjectMetric:
    """``type: Object``: one value describing another object (an Ingress, a Service)."""

    name: str
    target_type: TargetType
    target: float


@dataclass(frozen=True, slots=True)
class ExternalMetric:
    """``type: External``: series from outside the cluster (what KEDA serves), summed."""

    name: str
    target_type: TargetType
    target: float


MetricSpec = PodsMetric | ObjectMetric | ExternalMetric


class PolicyType(Enum):
    PODS = "Pods"
    PERCENT = "Percent"


class SelectPolicy(Enum):
    MAX = "Max"
    MIN = "Min"
    DISABLED = "Disabled"


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """At most ``value`` pods (or percent of the pods at the period's start) per ``period_s``."""

    type: PolicyType
    value: int
    period_s: int

    def __post_init__(self) -> None:
        # API validation: value > 0, 0 < periodSeconds <= 1800.
        if self.value <= 0 or not 0 < self.period_s <= 1800:
            raise ValueError(
                "a scaling policy needs value > 0 and 0 < periodSeconds <= 1800"
            )


@dataclass(frozen=True, slots=True)
class ScalingRules:
    """``HPAScalingRules``; a field left None gets the API server's default for its direction."""

    stabilization_window_s: int | None = None
    select_policy: SelectPolicy | None = None
    policies: tuple[ScalingPolicy, ...] | None = None

    def __post_init__(self) -> None:
        # API validation: a window of at most an hour, and a policy list is never empty.
        if (
            self.stabilization_window_s is not None
            and not 0 <= self.stabilization_window_s <= 3600
        ):
            raise ValueError("stabilizationWindowSeconds must be within 0..3600")
        if self.policies is not None and not self.policies:
            raise ValueError("at least one policy must be specified")


@dataclass(frozen=True, slots=True)
class Behavior:
    """``spec.behavior``. Setting it at all switches the controller to the behavior path."""

    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None


@dataclass(frozen=True, slots=True)
class HPASpec:
    """The parts of ``HorizontalPodAutoscalerSpec`` the algorithm reads."""

    max_replicas: int
    metrics: tuple[MetricSpec, ...]
    min_replicas: int = 1
    behavior: Behavior | None = None

    def __post_init__(self) -> None:
        # The API server's validation: the controller never sees an HPA that breaks these.
        if not self.metrics:
            raise ValueError(
                "an HPA needs at least one metric (the CPU default is not modelled)"
            )
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(
                "need 0 <= minReplicas <= maxReplicas and maxReplicas >= 1"
            )


def default_scale_up_rules(rules: ScalingRules | None) -> ScalingRules:
    """``GenerateHPAScaleUpRules``: no window; the larger of +100 % and +4 pods per 15 s."""
    rules = rules or ScalingRules()
    return ScalingRules(
        stabilization_window_s=0
        if rules.stabilization_window_s is None
        else rules.stabilization_window_s,
        select_policy=rules.select_policy or SelectPolicy.MAX,
        policies=rules.policies
        if rules.policies is not None
        else (
            ScalingPolicy(PolicyType.PODS, 4, 15),
            ScalingPolicy(PolicyType.PERCENT, 100, 15),
        ),
    )


def default_scale_down_rules(
    rules: ScalingRules | None, downscale_stabilization_s: float
) -> ScalingRules:
    """``GenerateHPAScaleDownRules`` plus the controller's ``maybeInitScaleDownStabilizationWindow``.

    The API default leaves the window unset, and the controller fills in its command-line
    ``--horizontal-pod-autoscaler-downscale-stabilization`` (5 minutes unless changed).
    """
    rules = rules or ScalingRules()
    window = rules.stabilization_window_s
    return ScalingRules(
        stabilization_window_s=int(downscale_stabilization_s)
        if window is None
        else window,
        select_policy=rules.select_policy or SelectPolicy.MAX,
        policies=rules.policies
        if rules.policies is not None
        else (ScalingPolicy(PolicyType.PERCENT, 100, 15),),
    )


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """kube-controller-manager flags that change the algorithm."""

    tolerance: float = DEFAULT_TOLERANCE
    downscale_stabilization_s: float = DEFAULT_DOWNSCALE_STABILIZATION_S


# --- manifests -------------------------------------------------------------------------------

_QUANTITY_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str | float) -> float:
    """A Kubernetes quantity ("8", "900m", "1.5k", "2Gi", or a bare YAML number) as a number."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], _QUANTITY_SUFFIXES[suffix]
            break
    else:
        number, scale = text, Decimal(1)
    try:
        return float(Decimal(number) * scale)
    except InvalidOperation as error:
        raise ValueError(f"not a quantity: {value!r}") from error


def _metric_from_manifest(entry: Mapping[str, Any]) -> MetricSpec:
    kind = entry["type"]
    if kind == "Pods":
        target = entry["pods"]["target"]
        if target["type"] != "AverageValue":
            raise ValueError("a Pods metric's target must be AverageValue")
        return PodsMetric(
            entry["pods"]["metric"]["name"], parse_quantity(target["averageValue"])
        )
    if kind in ("Object", "External"):
        source = entry[kind.lower()]
        target = source["target"]
        target_type = TargetType(target["type"])
        key = "value" if target_type is TargetType.VALUE else "averageValue"
        metric_type = ObjectMetric if kind == "Object" else ExternalMetric
        return metric_type(
            source["metric"]["name"], target_type, parse_quantity(target[key])
        )
    raise ValueError(
        f"metric type {kind!r} is not modelled (only Pods, Object and External)"
    )


def rules_from_manifest(rules: Mapping[str, Any] | None) -> ScalingRules | None:
    """``HPAScalingRules`` from its YAML form (also KEDA's horizontalPodAutoscalerConfig)."""
    if rules is None:
        return None
    policies = rules.get("policies")
    select = rules.get("selectPolicy")
    return ScalingRules(
        stabilization_window_s=rules.get("stabilizationWindowSeconds"),
        select_policy=None if select is None else SelectPolicy(select),
        policies=None
        if policies is None
        else tuple(
            ScalingPolicy(
                PolicyType(p["type"]), int(p["value"]), int(p["periodSeconds"])
            )
            for p in policies
        ),
    )


def spec_from_manifest(manifest: Mapping[str, Any]) -> HPASpec:
    """An ``autoscaling/v2`` HorizontalPodAutoscaler (as parsed YAML) as the model's spec.

    So the simulator runs the HPA the chart renders, not a transcription of it.
    """
    if (
        manifest.get("apiVersion") != "autoscaling/v2"
        or manifest.get("kind") != "HorizontalPodAutoscaler"
    ):
        raise ValueError("expected an autoscaling/v2 HorizontalPodAutoscaler")
    spec = manifest["spec"]
    behavior = spec.get("behavior")
    return HPASpec(
        max_replicas=int(spec["maxReplicas"]),
        min_replicas=int(spec.get("minReplicas", 1)),
        metrics=tuple(_metric_from_manifest(entry) for entry in spec["metrics"]),
        behavior=None
        if behavior is None
        else Behavior(
            scale_up=rules_from_manifest(behavior.get("scaleUp")),
            scale_down=rules_from_manifest(behavior.get("scaleDown")),
        ),
    )


# --- observations ----------------------------------------------------------------------------


class PodPhase(Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class PodObservation:
    """One pod the HPA's selector matches, as the pod lister and the custom metrics API show it.

    ``metrics`` maps a Pods metric name to the pod's value; a name that is absent is a missing
    metric (no series for the pod yet, or a failed scrape).
    """

    phase: PodPhase = PodPhase.RUNNING
    ready: bool = True
    deleting: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Counted in a ReplicaSet's ``status.replicas``: not terminating, not failed."""
        return not self.deleting and self.phase is not PodPhase.FAILED


@dataclass(frozen=True, slots=True)
class Observation:
    """What the controller reads in one sync.

    ``spec_replicas`` is the target's ``scale.spec.replicas`` (the HPA's "current replicas");
    ``status_replicas`` its ``scale.status.replicas``, by default the active pods. Object values
    are keyed by metric name; External metrics by name with every series the selector matched
    (they are summed). A metric with no entry could not be fetched: that metric is invalid.
    """

    spec_replicas: int
    pods: Sequence[PodObservation] = ()
    object_values: Mapping[str, float] = field(default_factory=dict)
    external_values: Mapping[str, Sequence[float]] = field(default_factory=dict)
    status_replicas: int | None = None

    @property
    def status_replica_count(self) -> int:
        if self.status_replicas is not None:
            return self.status_replicas
        return sum(1 for pod in self.pods if pod.active)


# --- decision --------------------------------------------------------------------------------


class Reason(Enum):
    """Why the result is what it is; values are the controller's condition and event reasons."""

    DESIRED_WITHIN_RANGE = "DesiredWithinRange"
    SCALING_DISABLED = "ScalingDisabled"
    ABOVE_MAX_REPLICAS = "AboveMaxReplicas"
    BELOW_MIN_REPLICAS = "BelowMinReplicas"
    INVALID_METRICS = "FailedComputeMetricsReplicas"
    WITHIN_TOLERANCE = "WithinTolerance"
    DIRECTION_REVERSED = "DirectionReversed"
    SCALE_UP_STABILIZED = "ScaleUpStabilized"
    SCALE_DOWN_STABILIZED = "ScaleDownStabilized"
    SCALE_UP_LIMIT = "ScaleUpLimit"
    SCALE_DOWN_LIMIT = "ScaleDownLimit"
    TOO_MANY_REPLICAS = "TooManyReplicas"
    TOO_FEW_REPLICAS = "TooFewReplicas"


@dataclass(frozen=True, slots=True)
class MetricProposal:
    """One metric's replica count, or why it has none.

    ``held`` is set when the calculation returned the current count on purpose: the ratio was
    within the tolerance, or filling in missing/unready pods reversed or cancelled the direction.
    """

    name: str
    replicas: int | None
    error: str | None = None
    held: Reason | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """One sync's outcome. ``desired`` is what the controller writes (``current`` when it leaves it).

    ``metric_desired`` is what the metrics alone asked for (None when they were not consulted or
    were invalid); ``limits`` lists, in the order applied, each step that changed or held the
    count; ``reason`` is the last of them.
    """

    desired: int
    current: int
    metric_desired: int | None
    metric_name: str | None
    limits: tuple[Reason, ...]
    proposals: tuple[MetricProposal, ...] = ()

    @property
    def reason(self) -> Reason:
        return self.limits[-1] if self.limits else Reason.DESIRED_WITHIN_RANGE

    @property
    def rescale(self) -> bool:
        return self.desired != self.current


# --- replica calculator (replica_calculator.go) ----------------------------------------------


class _MetricError(Exception):
    """A metric the controller cannot compute this sync (it logs, emits an event, and moves on)."""


def _within(ratio: float, tolerance: float) -> bool:
    return abs(1.0 - ratio) <= tolerance


def _average_milli(values: Sequence[int]) -> int:
    """Go's int64 division, which truncates toward zero (Python's ``//`` floors negatives)."""
    total = sum(values)
    quotient = abs(total) // len(values)
    return quotient if total >= 0 else -quotient


def _pods_metric_replicas(
    metric: PodsMetric, pods: Sequence[PodObservation], current: int, tolerance: float
) -> tuple[int, Reason | None]:
    """``GetMetricReplicas`` -> ``calcPlainMetricReplicas`` with ``groupPods`` for a non-CPU metric."""
    if not pods:
        raise _MetricError(
            "no pods returned by selector while calculating replica count"
        )
    target = to_milli(metric.average_value)
    values: list[int] = []  # ready pods with a value
    unready = missing = 0
    for pod in pods:
        if pod.deleting or pod.phase is PodPhase.FAILED:
            continue  # ignored: neither counted nor filled in
        if pod.phase is PodPhase.PENDING:
            unready += 1
            continue
        value = pod.metrics.get(metric.name)
        if value is None:
            missing += 1
            continue
        values.append(to_milli(value))  # readiness is only looked at for CPU
    if not values:
        raise _MetricError(
            "did not receive metrics for targeted pods (pods might be unready)"
        )

    usage_ratio = _average_milli(values) / target
    scale_up_with_unready = unready > 0 and usage_ratio > 1.0
    if not scale_up_with_unready and missing == 0:
        if _within(usage_ratio, tolerance):
            return current, Reason.WITHIN_TOLERANCE
        return math.ceil(usage_ratio * len(values)), None

    # Fill in the pods without a usable value: missing ones at the target on a scale-down and at 0
    # on a scale-up; Pending ones at 0, but only on a scale-up.
    filled = values + [target if usage_ratio < 1.0 else 0] * missing
    if scale_up_with_unready:
        filled += [0] * unready
    new_ratio = _average_milli(filled) / target
    if _within(new_ratio, tolerance):
        return current, Reason.WITHIN_TOLERANCE
    if (usage_ratio < 1.0 < new_ratio) or (usage_ratio > 1.0 > new_ratio):
        return current, Reason.DIRECTION_REVERSED
    new_replicas = math.ceil(new_ratio * len(filled))
    # The number of pods considered can flip the direction too.
    if (new_ratio < 1.0 and new_replicas > current) or (
        new_ratio > 1.0 and new_replicas < current
    ):
        return current, Reason.DIRECTION_REVERSED
    return new_replicas, None


def _ready_pod_count(pods: Sequence[PodObservation]) -> int:
    """``getReadyPodsCount``: Running with the Ready condition (deleting pods not excluded)."""
    if not pods:
        raise _MetricError(
            "no pods returned by selector while calculating replica count"
        )
    return sum(1 for pod in pods if pod.phase is PodPhase.RUNNING and pod.ready)


def _value_replicas(
    usage: int,
    target: int,
    current: int,
    pods: Sequence[PodObservation],
    tolerance: float,
) -> tuple[int, Reason | None]:
    """``getUsageRatioReplicaCount``: a Value target scales the *ready* pods by the ratio."""
    usage_ratio = usage / target
    if current == 0:  # scale from zero: no pods to count, no tolerance
        return math.ceil(usage_ratio), None
    if _within(usage_ratio, tolerance):
        return current, Reason.WITHIN_TOLERANCE
    return math.ceil(usage_ratio * _ready_pod_count(pods)), None


def _average_value_replicas(
    usage: int, target: int, status_replicas: int, tolerance: float
) -> tuple[int, Reason | None]:
    """``GetObjectPerPodMetricReplicas`` / ``GetExternalPerPodMetricReplicas``: usage / target.

    The tolerance compares against ``scale.status.replicas``, not the spec; with none the Go float
    ratio is +Inf (scale to usage / target) or NaN for zero usage (which yields 0 replicas).
    """
    if status_replicas == 0:
        return (math.ceil(usage / target) if usage > 0 else 0), None
    if _within(usage / (target * status_replicas), tolerance):
        return status_replicas, Reason.WITHIN_TOLERANCE
    return math.ceil(usage / target), None


def _metric_replicas(
    metric: MetricSpec, observation: Observation, tolerance: float
) -> tuple[int, Reason | None]:
    """``computeReplicasForMetric`` for one metric spec."""
    current = observation.spec_replicas
    if isinstance(metric, PodsMetric):
        return _pods_metric_replicas(metric, observation.pods, current, tolerance)
    if isinstance(metric, ObjectMetric):
        if metric.name not in observation.object_values:
            raise _MetricError(
                f"unable to get metric {metric.name} on the described object"
            )
        usage = to_milli(observation.object_values[metric.name])
    else:
        if metric.name not in observation.external_values:
            raise _MetricError(f"unable to get external metric {metric.name}")
        usage = sum(to_milli(v) for v in observation.external_values[metric.name])
    target = to_milli(metric.target)
    if metric.target_type is TargetType.VALUE:
        return _value_replicas(usage, target, current, observation.pods, tolerance)
    return _average_value_replicas(
        usage, target, observation.status_replica_count, tolerance
    )


def compute_replicas_for_metrics(
    metrics: Sequence[MetricSpec],
    observation: Observation,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[int | None, str | None, tuple[MetricProposal, ...]]:
    """``computeReplicasForMetrics``: the largest proposal, or None when the HPA must not act.

    Invalid metrics are skipped, but the result is withheld when every metric is invalid, or when
    some are and the valid ones would scale down: a metric that cannot be read might be the one
    asking for more pods.
    """
    best: int | None = None
    best_name: str | None = None
    proposals: list[MetricProposal] = []
    invalid = 0
    for metric in metrics:
        try:
            replicas, held = _metric_replicas(metric, observation, tolerance)
        except _MetricError as error:
            invalid += 1
            proposals.append(MetricProposal(metric.name, None, error=str(error)))
            continue
        proposals.append(MetricProposal(metric.name, replicas, held=held))
        if best is None or best == 0 or replicas > best:
            best, best_name = replicas, metric.name
    if invalid >= len(metrics) or (
        invalid > 0 and best is not None and best < observation.spec_replicas
    ):
        return None, None, tuple(proposals)
    return best, best_name, tuple(proposals)


# --- normalisation (horizontal.go) -----------------------------------------------------------


@dataclass(slots=True)
class _Recommendation:
    replicas: int
    at: float


@dataclass(slots=True)
class _ScaleEvent:
    change: int
    at: float
    outdated: bool = False


def _change_in_period(
    events: Sequence[_ScaleEvent], period_s: float, now: float
) -> int:
    """``getReplicasChangePerPeriod``: events strictly after now - period."""
    cutoff = now - period_s
    return sum(event.change for event in events if event.at > cutoff)


def _scale_up_limit(
    current: int,
    up: Sequence[_ScaleEvent],
    down: Sequence[_ScaleEvent],
    rules: ScalingRules,
    now: float,
) -> int:
    """``calculateScaleUpLimitWithScalingRules``: each policy measured from its period's start."""
    if rules.select_policy is SelectPolicy.DISABLED:
        return current
    proposals = []
    for policy in rules.policies or ():
        start = (
            current
            - _change_in_period(up, policy.period_s, now)
            + _change_in_period(down, policy.period_s, now)
        )
        if policy.type is PolicyType.PODS:
            proposals.append(start + policy.value)
        else:  # rounded up, or a small fleet could never grow
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    return min(proposals) if rules.select_policy is SelectPolicy.MIN else max(proposals)


def _scale_down_limit(
    current: int,
    up: Sequence[_ScaleEvent],
    down: Sequence[_ScaleEvent],
    rules: ScalingRules,
    now: float,
) -> int:
    """``calculateScaleDownLimitWithBehaviors``: Max picks the lowest floor (the biggest change)."""
    if rules.select_policy is SelectPolicy.DISABLED:
        return current
    proposals = []
    for policy in rules.policies or ():
        start = (
            current
            - _change_in_period(up, policy.period_s, now)
            + _change_in_period(down, policy.period_s, now)
        )
        if policy.type is PolicyType.PODS:
            proposals.append(start - policy.value)
        else:  # int32() truncates the pods kept, so the pods removed round up
            proposals.append(math.trunc(start * (1 - policy.value / 100)))
    return max(proposals) if rules.select_policy is SelectPolicy.MIN else min(proposals)


class HorizontalPodAutoscaler:
    """One HPA and the in-memory state the controller keeps for it.

    ``spec`` may be replaced between steps (the ChatFleet operator writes ``minReplicas``); the
    histories carry over, as they do in the controller for an HPA that is updated in place.
    """

    def __init__(self, spec: HPASpec, config: ControllerConfig | None = None) -> None:
        self.spec = spec
        self.config = config or ControllerConfig()
        self._recommendations: list[_Recommendation] = []
        self._scale_up_events: list[_ScaleEvent] = []
        self._scale_down_events: list[_ScaleEvent] = []

    def step(self, now: float, observation: Observation) -> Decision:
        """``reconcileAutoscaler``: one sync at ``now``; the scale it asks for is taken as done."""
        spec = self.spec
        current = observation.spec_replicas
        if not self._recommendations:  # recordInitialRecommendation
            self._recommendations.append(_Recommendation(current, now))

        if current == 0 and spec.min_replicas != 0:
            # Someone scaled the target to zero: the HPA stands aside until it is scaled back.
            return Decision(current, current, None, None, (Reason.SCALING_DISABLED,))
        if current > spec.max_replicas:
            decision = Decision(
                spec.max_replicas, current, None, None, (Reason.ABOVE_MAX_REPLICAS,)
            )
        elif current < spec.min_replicas:
            decision = Decision(
                spec.min_replicas, current, None, None, (Reason.BELOW_MIN_REPLICAS,)
            )
        else:
            metric_desired, metric_name, proposals = compute_replicas_for_metrics(
                spec.metrics, observation, self.config.tolerance
            )
            if metric_desired is None:
                return Decision(
                    current, current, None, None, (Reason.INVALID_METRICS,), proposals
                )
            limits: list[Reason] = []
            winner = next(p for p in proposals if p.name == metric_name)
            if metric_desired == current and winner.held is not None:
                limits.append(winner.held)
            if spec.behavior is None:
                desired = self._normalize_legacy(now, current, metric_desired, limits)
            else:
                desired = self._normalize_with_behavior(
                    now, current, metric_desired, spec.behavior, limits
                )
            decision = Decision(
                desired, current, metric_desired, metric_name, tuple(limits), proposals
            )

        if decision.rescale:
            self._store_scale_event(now, current, decision.desired)
        return decision

    # The legacy path: normalizeDesiredReplicas, stabilizeRecommendation, convertDesiredReplicasWithRules.
    def _normalize_legacy(
        self, now: float, current: int, prenormalized: int, limits: list[Reason]
    ) -> int:
        cutoff = now - self.config.downscale_stabilization_s
        stabilized = prenormalized
        old_index: int | None = None
        for index, rec in enumerate(self._recommendations):
            if rec.at < cutoff:
                old_index = index
            elif rec.replicas > stabilized:
                stabilized = rec.replicas
        self._record(old_index, prenormalized, now)
        if stabilized != prenormalized:
            limits.append(Reason.SCALE_DOWN_STABILIZED)

        spec = self.spec
        scale_up_limit = int(
            max(_SCALE_UP_LIMIT_FACTOR * current, _SCALE_UP_LIMIT_MINIMUM)
        )
        if spec.max_replicas > scale_up_limit:
            maximum, over = scale_up_limit, Reason.SCALE_UP_LIMIT
        else:
            maximum, over = spec.max_replicas, Reason.TOO_MANY_REPLICAS
        if stabilized < spec.min_replicas:
            limits.append(Reason.TOO_FEW_REPLICAS)
            return spec.min_replicas
        if stabilized > maximum:
            limits.append(over)
            return maximum
        return stabilized

    # The behavior path: normalizeDesiredReplicasWithBehaviors.
    def _normalize_with_behavior(
        self,
        now: float,
        current: int,
        prenormalized: int,
        behavior: Behavior,
        limits: list[Reason],
    ) -> int:
        up_rules = default_scale_up_rules(behavior.scale_up)
        down_rules = default_scale_down_rules(
            behavior.scale_down, self.config.downscale_stabilization_s
        )

        # stabilizeRecommendationWithBehaviors: scale up no further than the lowest recommendation
        # of the up window, down no further than the highest of the down window.
        up_cutoff = now - (up_rules.stabilization_window_s or 0)
        down_cutoff = now - (down_rules.stabilization_window_s or 0)
        up_rec = down_rec = prenormalized
        old_index: int | None = None
        for index, rec in enumerate(self._recommendations):
            if rec.at > up_cutoff:
                up_rec = min(rec.replicas, up_rec)
            if rec.at > down_cutoff:
                down_rec = max(rec.replicas, down_rec)
            if rec.at < up_cutoff and rec.at < down_cutoff:
                old_index = index
        stabilized = min(max(current, up_rec), down_rec)
        self._record(old_index, prenormalized, now)
        if stabilized != prenormalized:
            limits.append(
                Reason.SCALE_UP_STABILIZED
                if prenormalized >= current
                else Reason.SCALE_DOWN_STABILIZED
            )

        # convertDesiredReplicasWithBehaviorRate
        spec = self.spec
        if stabilized > current:
            limit = max(
                _scale_up_limit(
                    current,
                    self._scale_up_events,
                    self._scale_down_events,
                    up_rules,
                    now,
                ),
                current,
            )
            if spec.max_replicas > limit:
                maximum, over = limit, Reason.SCALE_UP_LIMIT
            else:
                maximum, over = spec.max_replicas, Reason.TOO_MANY_REPLICAS
            if stabilized > maximum:
                limits.append(over)
                return maximum
        elif stabilized < current:
            limit = min(
                _scale_down_limit(
                    current,
                    self._scale_up_events,
                    self._scale_down_events,
                    down_rules,
                    now,
                ),
                current,
            )
            if spec.min_replicas < limit:
                minimum, under = limit, Reason.SCALE_DOWN_LIMIT
            else:
                minimum, under = spec.min_replicas, Reason.TOO_FEW_REPLICAS
            if stabilized < minimum:
                limits.append(under)
                return minimum
        return stabilized

    def _record(self, old_index: int | None, replicas: int, now: float) -> None:
        """Record the unstabilised recommendation, reusing an expired slot as the controller does."""
        if old_index is None:
            self._recommendations.append(_Recommendation(replicas, now))
        else:
            self._recommendations[old_index] = _Recommendation(replicas, now)

    def _store_scale_event(self, now: float, previous: int, new: int) -> None:
        """``storeScaleEvent``: only kept when behavior is set, since only its policies read them."""
        behavior = self.spec.behavior
        if behavior is None:
            return
        if new > previous:
            events, change = self._scale_up_events, new - previous
            rules = default_scale_up_rules(behavior.scale_up)
        else:
            events, change = self._scale_down_events, previous - new
            rules = default_scale_down_rules(
                behavior.scale_down, self.config.downscale_stabilization_s
            )
        longest = max((policy.period_s for policy in rules.policies or ()), default=0)
        old_index: int | None = None
        for index, event in enumerate(events):
            if event.at < now - longest:
                event.outdated = True
            if event.outdated:
                old_index = index
        if old_index is None:
            events.append(_ScaleEvent(change, now))
        else:
            events[old_index] = _ScaleEvent(change, now)
