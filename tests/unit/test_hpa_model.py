"""The HPA model against the Kubernetes documentation's worked examples and the controller's rules.

Each case's id names the rule; the comment above it cites where the rule comes from:
- "docs: <section>" is https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/
  (Algorithm details; Scaling policies; Stabilization window; Default behavior; Example: ...);
- "controller: <function>" is kube-controller-manager's pkg/controller/podautoscaler
  (horizontal.go, replica_calculator.go), which decides where the docs are silent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatfleet.sim.hpa import (
    Behavior,
    ControllerConfig,
    ExternalMetric,
    HorizontalPodAutoscaler,
    HPASpec,
    ObjectMetric,
    Observation,
    PodObservation,
    PodPhase,
    PodsMetric,
    PolicyType,
    Reason,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
    TargetType,
    compute_replicas_for_metrics,
    parse_quantity,
    spec_from_manifest,
    to_milli,
)

REPO = Path(__file__).resolve().parents[2]
M = "m"  # the Pods metric of the calculator cases
TARGET = PodsMetric(M, 0.1)  # target 100m, as in "Algorithm details"


def running(
    value: float | None, *, ready: bool = True, name: str = M
) -> PodObservation:
    return PodObservation(ready=ready, metrics={} if value is None else {name: value})


PENDING = PodObservation(phase=PodPhase.PENDING, ready=False)


def observe(current: int, *pods: PodObservation, **kwargs: object) -> Observation:
    return Observation(spec_replicas=current, pods=pods, **kwargs)  # type: ignore[arg-type]


def uniform(current: int, value: float, name: str = M) -> Observation:
    """``current`` ready pods each reporting ``value``: the metric asks for ceil(current x ratio)."""
    return observe(current, *(running(value, name=name) for _ in range(current)))


# --- the replica calculator: one metric -------------------------------------------------------

CALCULATOR_CASES = [
    # docs: Algorithm details, "200m ... desired 100m, the number of replicas will be doubled"
    pytest.param(
        TARGET, uniform(3, 0.2), 6, None, id="algorithm-details/ratio-2.0-doubles"
    ),
    # docs: Algorithm details, "50m ... you'll halve the number of replicas"
    pytest.param(
        TARGET, uniform(4, 0.05), 2, None, id="algorithm-details/ratio-0.5-halves"
    ),
    # docs: Algorithm details, "skips any scaling action if the ratio is sufficiently close to 1.0"
    pytest.param(
        TARGET,
        uniform(4, 0.109),
        4,
        Reason.WITHIN_TOLERANCE,
        id="tolerance/ratio-1.09-holds",
    ),
    pytest.param(
        TARGET,
        uniform(4, 0.092),
        4,
        Reason.WITHIN_TOLERANCE,
        id="tolerance/ratio-0.92-holds",
    ),
    # controller: |1.0 - ratio| <= tolerance in float64, and 1.0 - 1.1 is 0.10000000000000009:
    # a ratio of exactly 1.1 already scales (hpa/README.md: "the queue must reach 2.2").
    pytest.param(
        TARGET, uniform(4, 0.11), 5, None, id="tolerance/ratio-exactly-1.1-scales"
    ),
    # controller: GetMetricUsageRatio averages milli-values with integer division:
    # (100 + 100 + 111) // 3 = 103 -> 1.03, within the tolerance.
    pytest.param(
        TARGET,
        observe(3, running(0.1), running(0.1), running(0.111)),
        3,
        Reason.WITHIN_TOLERANCE,
        id="controller/average-is-integer-milli",
    ),
    # controller: Go's integer division truncates toward zero, also for a negative gauge:
    # (-3m + 0m) / 2 = -1m (a floor would give -2m), ratio -1 against a 1m target -> -2 pods,
    # which minReplicas later lifts.
    pytest.param(
        PodsMetric(M, 0.001),
        observe(2, running(-0.003), running(0.0)),
        -2,
        None,
        id="controller/average-truncates-toward-zero",
    ),
    # docs: Algorithm details, missing metrics: "in the case of a scale up, ... assume those pods
    # were consuming 0% of the desired value". (300 + 300 + 0) / 3 = 200m -> 2.0 x 3 pods.
    pytest.param(
        TARGET,
        observe(3, running(0.3), running(0.3), running(None)),
        6,
        None,
        id="missing-metrics/scale-up-counts-missing-as-0",
    ),
    # docs: Algorithm details, missing metrics: "in the case of a scale down, ... assume those pods
    # were consuming 100% of the desired value". (20 + 20 + 100) // 3 = 46m -> ceil(0.46 x 3) = 2.
    pytest.param(
        TARGET,
        observe(3, running(0.02), running(0.02), running(None)),
        2,
        None,
        id="missing-metrics/scale-down-counts-missing-as-target",
    ),
    # docs: Algorithm details, not-yet-ready pods: on a scale-up they count as 0.
    # (300 + 300 + 0) / 3 = 200m -> 2.0 x 3 pods.
    pytest.param(
        TARGET,
        observe(3, running(0.3), running(0.3), PENDING),
        6,
        None,
        id="not-yet-ready/scale-up-counts-pending-as-0",
    ),
    # docs: Algorithm details, not-yet-ready pods are "set aside" on a scale-down:
    # only the 2 ready pods count, ceil(0.2 x 2) = 1.
    pytest.param(
        TARGET,
        observe(4, running(0.02), running(0.02), PENDING, PENDING),
        1,
        None,
        id="not-yet-ready/scale-down-ignores-pending",
    ),
    # docs: Algorithm details, "If the new ratio ... is within the tolerance, skip scaling":
    # 2.0 with two Pending pods at 0 becomes (200 + 200 + 0 + 0) / 4 = 100m, ratio 1.0.
    pytest.param(
        TARGET,
        observe(4, running(0.2), running(0.2), PENDING, PENDING),
        4,
        Reason.WITHIN_TOLERANCE,
        id="not-yet-ready/recalculated-ratio-within-tolerance-holds",
    ),
    # docs: Algorithm details, "If the new ratio reverses the scale direction ... skip any scaling":
    # 1.5 with two missing pods at 0 on the scale-up becomes 50m, ratio 0.5.
    pytest.param(
        TARGET,
        observe(3, running(0.15), running(None), running(None)),
        3,
        Reason.DIRECTION_REVERSED,
        id="missing-metrics/recalculated-ratio-reverses-holds",
    ),
    # controller: calcPlainMetricReplicas, "the change of metrics length would cause a change in
    # scale direction": ratio 1.5 over 2 pods asks for 3 while 10 are wanted already.
    pytest.param(
        TARGET,
        observe(10, running(0.3), PENDING),
        10,
        Reason.DIRECTION_REVERSED,
        id="controller/pod-count-reverses-direction-holds",
    ),
    # controller: groupPods looks at the Ready condition for CPU only; for a Pods metric a Running
    # pod that is not Ready but reports a value counts in full: (300 + 100) / 2 = 2.0 x 2 pods.
    pytest.param(
        TARGET,
        observe(2, running(0.3, ready=False), running(0.1)),
        4,
        None,
        id="controller/pods-metric-ignores-ready-condition",
    ),
    # docs: Algorithm details, "All Pods with a deletion timestamp set ... are ignored, and all
    # failed Pods are discarded": their values do not count, and they are not filled in.
    pytest.param(
        TARGET,
        observe(
            2,
            running(0.1),
            running(0.1),
            PodObservation(deleting=True, metrics={M: 5.0}),
            PodObservation(phase=PodPhase.FAILED),
        ),
        2,
        Reason.WITHIN_TOLERANCE,
        id="ignored-pods/deleting-and-failed-dropped",
    ),
    # controller: GetObjectMetricReplicas -> getUsageRatioReplicaCount: a Value target scales the
    # Running and Ready pods: ratio 3.0 x 2 ready pods (the Pending one is not counted).
    pytest.param(
        ObjectMetric("requests", TargetType.VALUE, 100),
        observe(
            3, running(None), running(None), PENDING, object_values={"requests": 300}
        ),
        6,
        None,
        id="object-value/scales-ready-pods",
    ),
    pytest.param(
        ObjectMetric("requests", TargetType.VALUE, 100),
        observe(3, running(None), object_values={"requests": 105}),
        3,
        Reason.WITHIN_TOLERANCE,
        id="object-value/tolerance-holds",
    ),
    # controller: GetObjectPerPodMetricReplicas: ceil(value / averageValue), whatever the pods.
    pytest.param(
        ObjectMetric("requests", TargetType.AVERAGE_VALUE, 10),
        observe(2, running(None), running(None), object_values={"requests": 55}),
        6,
        None,
        id="object-averagevalue/value-over-target",
    ),
    # controller: GetExternalPerPodMetricReplicas: the series are summed, ceil(30 / 8) = 4.
    pytest.param(
        ExternalMetric("s0-prometheus", TargetType.AVERAGE_VALUE, 8),
        observe(
            2, running(None), running(None), external_values={"s0-prometheus": (10, 20)}
        ),
        4,
        None,
        id="external-averagevalue/sum-over-target",
    ),
    # controller: the AverageValue tolerance compares with scale.status.replicas and keeps it:
    # 17 / (8 x 2) = 1.06 holds at status 2 although spec says 3.
    pytest.param(
        ExternalMetric("s0-prometheus", TargetType.AVERAGE_VALUE, 8),
        observe(3, external_values={"s0-prometheus": (17,)}, status_replicas=2),
        2,
        Reason.WITHIN_TOLERANCE,
        id="external-averagevalue/tolerance-against-status-replicas",
    ),
    # controller: getUsageRatioReplicaCount with currentReplicas 0 (minReplicas 0): ceil(ratio).
    pytest.param(
        ExternalMetric("queue", TargetType.VALUE, 10),
        observe(0, external_values={"queue": (25,)}),
        3,
        None,
        id="external-value/from-zero-ignores-pods",
    ),
]


@pytest.mark.parametrize(
    ("metric", "observation", "replicas", "held"), CALCULATOR_CASES
)
def test_replica_calculator(
    metric: PodsMetric | ObjectMetric | ExternalMetric,
    observation: Observation,
    replicas: int,
    held: Reason | None,
) -> None:
    desired, name, proposals = compute_replicas_for_metrics((metric,), observation)
    assert (desired, name) == (replicas, metric.name)
    assert proposals[0].held is held


INVALID_CASES = [
    # controller: calcPlainMetricReplicas, "no pods returned by selector"
    pytest.param((TARGET,), observe(1), id="invalid/no-pods"),
    # controller: calcPlainMetricReplicas, "did not receive metrics for targeted pods"
    pytest.param(
        (TARGET,), observe(2, PENDING, PENDING), id="invalid/only-pending-pods"
    ),
    # controller: an Object or External metric that cannot be fetched
    pytest.param(
        (ExternalMetric("q", TargetType.AVERAGE_VALUE, 1),),
        observe(1),
        id="invalid/external-missing",
    ),
    # controller: computeReplicasForMetrics, "some are invalid and we would scale down": the valid
    # metric asks for 1 of 4, but the unreadable one might want more.
    pytest.param(
        (TARGET, ExternalMetric("q", TargetType.AVERAGE_VALUE, 1)),
        uniform(4, 0.02),
        id="multiple-metrics/invalid-blocks-scale-down",
    ),
]


@pytest.mark.parametrize(("metrics", "observation"), INVALID_CASES)
def test_invalid_metrics_withhold_a_result(
    metrics: tuple[PodsMetric | ExternalMetric, ...], observation: Observation
) -> None:
    desired, name, proposals = compute_replicas_for_metrics(metrics, observation)
    assert (desired, name) == (None, None)
    assert any(p.error for p in proposals)


def test_multiple_metrics_take_the_largest_proposal() -> None:
    # docs: Algorithm details, "the largest of the desired replica counts is chosen"
    queue, slots = PodsMetric("queue", 8), PodsMetric("slots", 0.9)
    pods = [PodObservation(metrics={"queue": 12, "slots": 1.0}) for _ in range(4)]
    desired, name, proposals = compute_replicas_for_metrics(
        (queue, slots), observe(4, *pods)
    )
    # queue: 12 / 8 = 1.5 -> 6 pods; slots: 1000 / 900 = 1.11 -> 5 pods
    assert [p.replicas for p in proposals] == [6, 5]
    assert (desired, name) == (6, "queue")


def test_multiple_metrics_scale_up_despite_an_invalid_one() -> None:
    # controller: computeReplicasForMetrics scales on the valid metrics when they ask for more
    metrics = (TARGET, ExternalMetric("q", TargetType.AVERAGE_VALUE, 1))
    desired, name, _ = compute_replicas_for_metrics(metrics, uniform(2, 0.3))
    assert (desired, name) == (6, M)


# --- the controller: one HPA over time ----------------------------------------------------------


DEMAND = ExternalMetric("demand", TargetType.AVERAGE_VALUE, 1)


def spec(
    *, min_replicas: int = 1, max_replicas: int = 100, behavior: Behavior | None = None
) -> HPASpec:
    """An HPA on one External AverageValue metric of target 1: it asks for exactly its value."""
    return HPASpec(
        max_replicas=max_replicas,
        min_replicas=min_replicas,
        metrics=(DEMAND,),
        behavior=behavior,
    )


def asking(current: int, desired: int) -> Observation:
    """``current`` replicas and a demand that asks for exactly ``desired`` (outside the tolerance)."""
    return observe(
        current, external_values={"demand": (desired,)}, status_replicas=current
    )


def run(
    hpa: HorizontalPodAutoscaler, current: int, wants: list[int], every_s: float = 15.0
):
    """Sync every ``every_s`` with metrics asking for ``wants[i]``; apply each decision."""
    decisions = []
    for i, want in enumerate(wants):
        decision = hpa.step(i * every_s, asking(current, want))
        decisions.append(decision)
        current = decision.desired
    return decisions


def test_zero_replicas_disables_scaling() -> None:
    # docs: "Implicit maintenance-mode deactivation": scaled to 0 by hand, the HPA stands aside
    decision = HorizontalPodAutoscaler(spec()).step(0, asking(0, 5))
    assert (decision.desired, decision.reason) == (0, Reason.SCALING_DISABLED)


@pytest.mark.parametrize(
    ("current", "desired", "reason"),
    [
        # controller: reconcileAutoscaler, "Current number of replicas above Spec.MaxReplicas"
        pytest.param(
            12, 10, Reason.ABOVE_MAX_REPLICAS, id="clamp/above-max-set-to-max"
        ),
        # controller: "Current number of replicas below Spec.MinReplicas" (the operator's floor)
        pytest.param(1, 3, Reason.BELOW_MIN_REPLICAS, id="clamp/below-min-set-to-min"),
    ],
)
def test_out_of_range_goes_to_the_bound_without_metrics(
    current: int, desired: int, reason: Reason
) -> None:
    hpa = HorizontalPodAutoscaler(spec(min_replicas=3, max_replicas=10))
    decision = hpa.step(0, observe(current))  # no pods, no metrics: not consulted
    assert (decision.desired, decision.reason, decision.metric_desired) == (
        desired,
        reason,
        None,
    )


def test_invalid_metrics_leave_the_count() -> None:
    decision = HorizontalPodAutoscaler(spec()).step(
        0, observe(3)
    )  # "demand" unreadable
    assert (decision.desired, decision.reason) == (3, Reason.INVALID_METRICS)


LEGACY_CASES = [
    # controller: calculateScaleUpLimit with behavior unset: max(2 x current, 4)
    pytest.param(
        1, 50, 100, 4, Reason.SCALE_UP_LIMIT, id="no-behavior/scale-up-limit-4-from-1"
    ),
    pytest.param(
        5, 50, 100, 10, Reason.SCALE_UP_LIMIT, id="no-behavior/scale-up-limit-2x"
    ),
    # controller: convertDesiredReplicasWithRules, maxReplicas below the scale-up limit
    pytest.param(
        5, 50, 8, 8, Reason.TOO_MANY_REPLICAS, id="no-behavior/max-replicas-clamp"
    ),
    pytest.param(
        5, 7, 100, 7, Reason.DESIRED_WITHIN_RANGE, id="no-behavior/within-range"
    ),
]


@pytest.mark.parametrize(
    ("current", "want", "max_replicas", "desired", "reason"), LEGACY_CASES
)
def test_no_behavior_scale_up(
    current: int, want: int, max_replicas: int, desired: int, reason: Reason
) -> None:
    decision = HorizontalPodAutoscaler(spec(max_replicas=max_replicas)).step(
        0, asking(current, want)
    )
    assert (decision.metric_desired, decision.desired, decision.reason) == (
        want,
        desired,
        reason,
    )


def test_no_behavior_scale_down_waits_the_downscale_window_inclusive() -> None:
    # docs: Stabilization window / --horizontal-pod-autoscaler-downscale-stabilization (5 min);
    # controller: stabilizeRecommendation drops a recommendation only when it is *before* now - 300,
    # so the initial one from t=0 still holds at t=300 and goes at t=315.
    decisions = run(HorizontalPodAutoscaler(spec()), 4, [4] + [1] * 21)
    desired = [d.desired for d in decisions]
    assert desired[:21] == [4] * 21  # t = 0 .. 300
    assert decisions[1].reason is Reason.SCALE_DOWN_STABILIZED
    assert desired[21] == 1  # t = 315


def test_no_behavior_is_not_the_documented_default_policy() -> None:
    # docs: Default behavior lists +4 pods or +100 % per 15 s, which from 1 pod allows 5; with
    # behavior unset the controller's legacy limit allows max(2 x 1, 4) = 4. behavior: {} gets 5.
    legacy = HorizontalPodAutoscaler(spec()).step(0, asking(1, 50)).desired
    defaulted = (
        HorizontalPodAutoscaler(spec(behavior=Behavior()))
        .step(0, asking(1, 50))
        .desired
    )
    assert (legacy, defaulted) == (4, 5)


@pytest.mark.parametrize(
    ("current", "desired"),
    [
        # docs: Default behavior, scaleUp: the larger of Percent 100 and Pods 4 per 15 s
        pytest.param(2, 6, id="default-behavior/scale-up-4-pods-when-larger"),
        pytest.param(10, 20, id="default-behavior/scale-up-100-percent-when-larger"),
    ],
)
def test_default_scale_up_policies(current: int, desired: int) -> None:
    hpa = HorizontalPodAutoscaler(spec(behavior=Behavior()))
    decision = hpa.step(0, asking(current, 90))
    assert (decision.desired, decision.reason) == (desired, Reason.SCALE_UP_LIMIT)


def test_default_scale_down_window_is_300s_exclusive() -> None:
    # docs: Default behavior, scaleDown stabilizationWindowSeconds: 300 and 100 % per 15 s;
    # controller: stabilizeRecommendationWithBehaviors counts recommendations strictly *after*
    # now - 300, so the t=0 one no longer holds at t=300 (the legacy path keeps it: see above).
    decisions = run(
        HorizontalPodAutoscaler(spec(behavior=Behavior())), 10, [10] + [2] * 20
    )
    desired = [d.desired for d in decisions]
    assert desired[:20] == [10] * 20  # t = 0 .. 285
    assert decisions[5].reason is Reason.SCALE_DOWN_STABILIZED
    assert desired[20] == 2  # t = 300: the whole way, as 100 % per 15 s allows


def test_scale_down_window_follows_the_controller_flag() -> None:
    # controller: maybeInitScaleDownStabilizationWindow fills an unset window from
    # --horizontal-pod-autoscaler-downscale-stabilization
    hpa = HorizontalPodAutoscaler(
        spec(behavior=Behavior()), ControllerConfig(downscale_stabilization_s=60)
    )
    desired = [d.desired for d in run(hpa, 10, [10] + [2] * 5)]
    assert desired == [10, 10, 10, 10, 2, 2]  # t = 60 drops the t = 0 recommendation


def _policies(*policies: tuple[PolicyType, int, int]) -> tuple[ScalingPolicy, ...]:
    return tuple(ScalingPolicy(kind, value, period) for kind, value, period in policies)


def test_scaling_policies_doc_example_80_to_10() -> None:
    # docs: Scaling policies: Pods 4 / 60 s and Percent 10 / 60 s, the larger change wins.
    # "if there are 80 replicas and the target has to be scaled down to 10 replicas then during
    # the first step 8 replicas will be reduced. In the next iteration when the number of replicas
    # is 72, 10% of the pods is 7.2 but the number is rounded up to 8 ... When the number of
    # replicas falls below 40 the first policy (Pods) is applied and 4 replicas will be reduced."
    # (No stabilisation here, to see the policies alone.)
    down = ScalingRules(
        stabilization_window_s=0,
        policies=_policies((PolicyType.PODS, 4, 60), (PolicyType.PERCENT, 10, 60)),
    )
    hpa = HorizontalPodAutoscaler(spec(behavior=Behavior(scale_down=down)))
    decisions = run(hpa, 80, [10] * 80)
    changes = [(int(i * 15), d.desired) for i, d in enumerate(decisions) if d.rescale]
    assert changes[:3] == [
        (0, 72),
        (60, 64),
        (120, 57),
    ]  # 10 %, 8 then 7 pods (57.6 -> 57)
    assert all(t % 60 == 0 for t, _ in changes)  # once per period
    below_40 = [n for _, n in changes if n < 40]
    assert below_40 == [
        36,
        32,
        28,
        24,
        20,
        16,
        12,
        10,
    ]  # 4 at a time, the last step to the target
    assert decisions[1].reason is Reason.SCALE_DOWN_LIMIT


@pytest.mark.parametrize(
    ("select", "desired"),
    [
        # docs: Example: limit scale down rate: "no more than 5 Pods are removed per minute ...
        # set selectPolicy to minimum": Percent 10 (-> 90) vs Pods 5 (-> 95), Min keeps 95.
        pytest.param(SelectPolicy.MIN, 95, id="select-policy/min-smallest-change"),
        # docs: Scaling policies, "by default the policy which allows the highest amount of change"
        pytest.param(SelectPolicy.MAX, 90, id="select-policy/max-largest-change"),
        # docs: Example: disable scale down, selectPolicy: Disabled
        pytest.param(SelectPolicy.DISABLED, 100, id="select-policy/disabled"),
    ],
)
def test_scale_down_select_policy(select: SelectPolicy, desired: int) -> None:
    down = ScalingRules(
        stabilization_window_s=0,
        select_policy=select,
        policies=_policies((PolicyType.PERCENT, 10, 60), (PolicyType.PODS, 5, 60)),
    )
    decision = HorizontalPodAutoscaler(spec(behavior=Behavior(scale_down=down))).step(
        0, asking(100, 10)
    )
    assert (decision.desired, decision.reason) == (desired, Reason.SCALE_DOWN_LIMIT)


def test_scale_up_select_policy_min() -> None:
    # docs: Scaling policies, selectPolicy Min picks the policy with the smallest change
    up = ScalingRules(
        select_policy=SelectPolicy.MIN,
        policies=_policies((PolicyType.PERCENT, 100, 60), (PolicyType.PODS, 4, 60)),
    )
    decision = HorizontalPodAutoscaler(spec(behavior=Behavior(scale_up=up))).step(
        0, asking(10, 40)
    )
    assert (decision.desired, decision.reason) == (14, Reason.SCALE_UP_LIMIT)


def test_scale_up_window_uses_the_lowest_recommendation() -> None:
    # docs: Stabilization window (scale up): the lowest recommendation of the window is used, so a
    # spike must last the window before it adds pods. controller: strictly after now - window.
    up = ScalingRules(
        stabilization_window_s=60, policies=_policies((PolicyType.PODS, 100, 15))
    )
    decisions = run(
        HorizontalPodAutoscaler(spec(behavior=Behavior(scale_up=up))),
        4,
        [4, 10, 10, 10, 10, 10],
    )
    # t = 60: the t = 0 recommendations sit exactly on the cutoff and no longer count
    assert [d.desired for d in decisions] == [4, 4, 4, 4, 10, 10]
    assert decisions[1].reason is Reason.SCALE_UP_STABILIZED


def test_scale_down_window_uses_the_highest_recommendation() -> None:
    # docs: Stabilization window: "uses the highest value from the specified interval"
    down = ScalingRules(stabilization_window_s=60)
    hpa = HorizontalPodAutoscaler(spec(behavior=Behavior(scale_down=down)))
    decisions = run(hpa, 10, [10, 5, 8, 3, 3, 3, 3, 3])
    # t=60: the 10 from t=0 leaves -> max(5, 8, 3, 3) = 8; t=75: the 5 leaves, still 8;
    # t=90: the 8 from t=30 leaves -> 3
    assert [d.desired for d in decisions] == [10, 10, 10, 10, 8, 8, 3, 3]


def test_rate_limit_counts_both_directions_in_the_period() -> None:
    # controller: calculateScaleUpLimitWithScalingRules starts each period from
    # current - added + removed within it, so a scale-down does not buy a bigger scale-up.
    up = ScalingRules(policies=_policies((PolicyType.PODS, 4, 60)))
    down = ScalingRules(
        stabilization_window_s=0, policies=_policies((PolicyType.PODS, 2, 60))
    )
    hpa = HorizontalPodAutoscaler(spec(behavior=Behavior(scale_up=up, scale_down=down)))
    assert hpa.step(0, asking(10, 5)).desired == 8  # -2
    # at t=15 the period started with 10 pods: at most 10 + 4 = 14, not 8 + 4
    decision = hpa.step(15, asking(8, 30))
    assert (decision.desired, decision.reason) == (14, Reason.SCALE_UP_LIMIT)


def test_tolerance_is_reported_as_the_limit() -> None:
    decision = HorizontalPodAutoscaler(spec(behavior=Behavior())).step(
        0, asking(40, 42)
    )
    assert (decision.metric_desired, decision.desired) == (40, 40)
    assert decision.reason is Reason.WITHIN_TOLERANCE


def test_scale_down_to_min_replicas_is_too_few_replicas() -> None:
    # controller: convertDesiredReplicasWithBehaviorRate, minReplicas above the policy's floor
    down = ScalingRules(stabilization_window_s=0)
    hpa = HorizontalPodAutoscaler(
        spec(min_replicas=3, behavior=Behavior(scale_down=down))
    )
    decision = hpa.step(0, asking(6, 1))
    assert (decision.desired, decision.reason) == (3, Reason.TOO_FEW_REPLICAS)


# --- the chart's HPA ----------------------------------------------------------------------------


def chart_hpa() -> HPASpec:
    """hpa/hpa.yaml: what the chart renders with its default values (a chart test keeps it so)."""
    manifest = yaml.safe_load((REPO / "hpa" / "hpa.yaml").read_text())
    return spec_from_manifest(manifest)


def test_chart_hpa_is_represented_exactly() -> None:
    hpa = chart_hpa()
    assert (hpa.min_replicas, hpa.max_replicas) == (1, 8)
    assert hpa.metrics == (
        PodsMetric("chatfleet_queue_depth", 8.0),
        PodsMetric("chatfleet_slot_utilization", 0.3),
    )
    assert to_milli(hpa.metrics[1].average_value) == 300  # "300m"
    assert hpa.behavior == Behavior(
        scale_up=ScalingRules(
            0,
            SelectPolicy.MAX,
            _policies((PolicyType.PERCENT, 100, 30), (PolicyType.PODS, 4, 30)),
        ),
        scale_down=ScalingRules(
            300, SelectPolicy.MIN, _policies((PolicyType.PERCENT, 25, 60))
        ),
    )


def test_chart_hpa_burst_then_lull() -> None:
    # 200 requests queue on 1 pod for 45 s, then none. 200 / 8 asks for 25 pods; the chart allows
    # the larger of +100 % and +4 pods per 30 s: 1 -> 5 at t=0, held at t=15 (the period started
    # at 1), 5 -> 8 (maxReplicas) at t=30. Then the 300 s window holds 8 until the last busy
    # recommendation (t=30) leaves it at t=330, and -25 % per 60 s (truncated: the pods removed
    # round up) takes 8 -> 6 -> 4 -> 3 -> 2 -> 1, one step per period.
    hpa = HorizontalPodAutoscaler(chart_hpa())
    current, trace = 1, []
    for i in range(60):
        now = i * 15.0
        queue, busy = (200.0 / current, 1.0) if now < 45 else (0.0, 0.0)
        pod = PodObservation(
            metrics={"chatfleet_queue_depth": queue, "chatfleet_slot_utilization": busy}
        )
        decision = hpa.step(now, observe(current, *[pod] * current))
        if decision.rescale:
            trace.append((now, decision.desired, decision.reason))
        current = decision.desired
    assert trace == [
        (0.0, 5, Reason.SCALE_UP_LIMIT),
        (30.0, 8, Reason.TOO_MANY_REPLICAS),
        (330.0, 6, Reason.SCALE_DOWN_LIMIT),
        (390.0, 4, Reason.SCALE_DOWN_LIMIT),
        (450.0, 3, Reason.SCALE_DOWN_LIMIT),
        (510.0, 2, Reason.SCALE_DOWN_LIMIT),
        (570.0, 1, Reason.TOO_FEW_REPLICAS),  # the policy's floor (1) is minReplicas
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param("8", 8.0, id="quantity/plain"),
        pytest.param("900m", 0.9, id="quantity/milli"),
        pytest.param("1.5k", 1500.0, id="quantity/kilo"),
        pytest.param("1Ki", 1024.0, id="quantity/binary"),
        pytest.param(2, 2.0, id="quantity/yaml-number"),
    ],
)
def test_parse_quantity(text: str | float, value: float) -> None:
    assert parse_quantity(text) == value


def test_spec_from_manifest_rejects_resource_metrics() -> None:
    manifest = yaml.safe_load((REPO / "hpa" / "hpa.yaml").read_text())
    manifest["spec"]["metrics"] = [{"type": "Resource", "resource": {"name": "cpu"}}]
    with pytest.raises(ValueError, match="not modelled"):
        spec_from_manifest(manifest)
