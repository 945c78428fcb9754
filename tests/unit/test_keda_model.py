"""The KEDA model against KEDA's ScaledObject reference, its scale loop, and hpa/README.md.

"keda: <section>" cites https://keda.sh/docs/latest/reference/scaledobject-spec/ (pollingInterval,
cooldownPeriod, minReplicaCount, triggers: metricType); "keda-controller: <function>" the KEDA
operator (pkg/scaling/executor/scale_scaledobjects.go, pkg/scaling/resolver); "readme:" is
hpa/README.md, "The pending-pod discount (KEDA)".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatfleet.sim.hpa import (
    Behavior,
    ExternalMetric,
    Observation,
    PodObservation,
    PodPhase,
    Reason,
    TargetType,
    spec_from_manifest,
)
from chatfleet.sim.keda import (
    QUEUE_METRIC,
    SLOT_METRIC,
    ScaledObject,
    ScaledObjectSpec,
    Trigger,
    is_starting,
    pending_pod_allowance,
    queue_trigger_value,
    scaled_object_from_manifest,
    slot_trigger_value,
)

REPO = Path(__file__).resolve().parents[2]
QUEUE = Trigger("prometheus", 5)


def ready_pods(n: int) -> tuple[PodObservation, ...]:
    return tuple(PodObservation() for _ in range(n))


def chart_manifest() -> dict:
    return yaml.safe_load((REPO / "hpa" / "keda-scaledobject.yaml").read_text())


@pytest.mark.parametrize(
    ("trigger", "desired"),
    [
        # keda: triggers, metricType: "With AverageValue ... the threshold is 5 messages, and the
        # current message count in the queue is 20, HPA will scale the deployment to 20 / 5 = 4
        # replicas, regardless of the current replica count."
        pytest.param(
            Trigger("prometheus", 5), 4, id="metric-type/averagevalue-20-over-5-is-4"
        ),
        # keda: triggers, metricType: "with the Value type ... HPA will scale the deployment to
        # 3 * 20 / 5 = 12" (3 running replicas)
        pytest.param(
            Trigger("prometheus", 5, metric_type=TargetType.VALUE),
            12,
            id="metric-type/value-3x20-over-5-is-12",
        ),
    ],
)
def test_metric_type_examples(trigger: Trigger, desired: int) -> None:
    keda = ScaledObject(ScaledObjectSpec(triggers=(trigger,), min_replica_count=1))
    decision = keda.hpa_step(0, Observation(spec_replicas=3, pods=ready_pods(3)), [20])
    assert decision.metric_desired == desired


def test_hpa_metrics_are_external_per_trigger() -> None:
    # keda-controller: one External metric per trigger, s<index>-<type>, target = threshold;
    # keda: minReplicaCount defaults to 0, but the HPA's minReplicas is never below 1
    spec = ScaledObjectSpec(
        triggers=(QUEUE, Trigger("prometheus", 0.9)), max_replica_count=8
    )
    hpa = spec.hpa_spec()
    assert hpa.metrics == (
        ExternalMetric("s0-prometheus", TargetType.AVERAGE_VALUE, 5),
        ExternalMetric("s1-prometheus", TargetType.AVERAGE_VALUE, 0.9),
    )
    assert (hpa.min_replicas, hpa.max_replicas) == (1, 8)


@pytest.mark.parametrize(
    ("min_replica_count", "current", "value", "desired"),
    [
        # keda: minReplicaCount / scale loop: at 0 an active trigger scales to the floor (>= 1)
        pytest.param(0, 0, 3.0, 1, id="activation/from-zero-to-1"),
        pytest.param(2, 0, 3.0, 2, id="activation/from-zero-to-min-replica-count"),
        # keda: activationThreshold defaults to 0 and a trigger is active only *above* it
        pytest.param(0, 0, 0.0, None, id="activation/zero-value-is-not-active"),
        # keda: between 1 and N the HPA scales; KEDA leaves the count alone
        pytest.param(0, 3, 3.0, None, id="activation/active-above-zero-left-to-hpa"),
    ],
)
def test_activation(
    min_replica_count: int, current: int, value: float, desired: int | None
) -> None:
    keda = ScaledObject(
        ScaledObjectSpec(triggers=(QUEUE,), min_replica_count=min_replica_count)
    )
    assert keda.poll(0, current, [value]).desired == desired


def test_hpa_stands_aside_at_zero() -> None:
    # The HPA KEDA owns has minReplicas >= 1, so at 0 replicas it is disabled: only KEDA wakes it.
    keda = ScaledObject(ScaledObjectSpec(triggers=(QUEUE,)))
    decision = keda.hpa_step(0, Observation(spec_replicas=0), [50])
    assert (decision.desired, decision.reason) == (0, Reason.SCALING_DISABLED)


def test_cooldown_scales_to_zero_after_the_period() -> None:
    # keda: cooldownPeriod, "The period to wait after the last trigger reported active before
    # scaling the resource back to 0"; keda-controller: lastActiveTime + cooldown strictly before
    # now. Active at t=0, quiet from t=30: still 1 at t=300, 0 at the poll after (t=330).
    spec = ScaledObjectSpec(
        triggers=(QUEUE,), polling_interval_s=30, cooldown_period_s=300
    )
    keda = ScaledObject(spec)
    results = [keda.poll(t, 1, [4.0 if t == 0 else 0.0]) for t in range(0, 361, 30)]
    assert [r.desired for r in results].index(0) == 11  # t = 330
    assert all(r.desired is None for r in results[:11])


def test_cooldown_without_any_activity_scales_to_zero_at_once() -> None:
    # keda-controller: scaleToZeroOrIdle ignores the cooldown when lastActiveTime is unset
    keda = ScaledObject(ScaledObjectSpec(triggers=(QUEUE,)))
    assert keda.poll(0, 2, [0.0]).desired == 0


def test_cooldown_plays_no_part_with_a_floor_of_one() -> None:
    # keda: "the KEDA cooldownPeriod only applies when scaling to 0" (the chart: minReplicas 1)
    keda = ScaledObject(ScaledObjectSpec(triggers=(QUEUE,), min_replica_count=1))
    assert [keda.poll(t, 1, [0.0]).desired for t in range(0, 1200, 15)] == [None] * 80


def test_failed_query_is_an_invalid_metric() -> None:
    keda = ScaledObject(ScaledObjectSpec(triggers=(QUEUE,), min_replica_count=1))
    decision = keda.hpa_step(
        0, Observation(spec_replicas=2, pods=ready_pods(2)), [None]
    )
    assert decision.reason is Reason.INVALID_METRICS


@pytest.mark.parametrize(
    ("cached", "metric_desired"),
    [
        # keda: triggers, useCachedMetrics: the HPA gets the value of the last poll ...
        pytest.param(True, 2, id="use-cached-metrics/last-poll"),
        # ... and by default KEDA runs the query whenever the HPA asks.
        pytest.param(False, 8, id="use-cached-metrics/off-fresh-query"),
    ],
)
def test_use_cached_metrics(cached: bool, metric_desired: int) -> None:
    spec = ScaledObjectSpec(
        triggers=(Trigger("prometheus", 5, use_cached_metrics=cached),),
        min_replica_count=1,
    )
    keda = ScaledObject(spec)
    keda.poll(0, 1, [10.0])
    decision = keda.hpa_step(
        5, Observation(spec_replicas=1, pods=ready_pods(1)), [40.0]
    )
    assert decision.metric_desired == metric_desired


def test_values_are_sent_in_truncated_milli_units() -> None:
    # keda-controller: the metrics server sends int64(value x 1000) milli-units, so 8.0009 is 8000m.
    # Just woken from 0 (status.replicas still 0) the HPA asks ceil(usage / target): 1 pod, where
    # the rounded-up 8001m would ask for 2.
    spec = ScaledObjectSpec(triggers=(Trigger("prometheus", 8),), min_replica_count=1)
    decision = ScaledObject(spec).hpa_step(0, Observation(spec_replicas=1), [8.0009])
    assert decision.metric_desired == 1


# --- the chart's ScaledObject and its pending-pod discount ----------------------------------------


def test_chart_scaled_object_is_represented_exactly() -> None:
    spec = scaled_object_from_manifest(chart_manifest())
    assert spec == ScaledObjectSpec(
        triggers=(Trigger("prometheus", 8), Trigger("prometheus", 0.3)),
        min_replica_count=1,
        max_replica_count=8,
        polling_interval_s=15,
        cooldown_period_s=300,
        behavior=spec.behavior,
    )
    # Both modes render the same behavior (chatfleet.hpaBehavior): the KEDA HPA scales as the
    # prometheus-adapter one does.
    hpa_yaml = yaml.safe_load((REPO / "hpa" / "hpa.yaml").read_text())
    assert isinstance(spec.behavior, Behavior)
    assert spec.behavior == spec_from_manifest(hpa_yaml).behavior


def test_chart_default_allowance_is_slots_plus_target_queue() -> None:
    # readme: "Default: engine slots + targetQueueDepthPerPod (64 + 8 = 72 for vLLM with
    # maxNumSeqs: 64)"; the rendered query subtracts exactly that per starting pod.
    assert pending_pod_allowance(64, 8) == 72
    assert pending_pod_allowance(64, 8, override=0) == 0
    query = chart_manifest()["spec"]["triggers"][0]["metadata"]["query"]
    assert "- 72 * (" in query


@pytest.mark.parametrize(
    ("pod", "starting"),
    [
        # readme: "Pending or Running, not Ready, and not being deleted"
        pytest.param(
            PodObservation(phase=PodPhase.PENDING, ready=False),
            True,
            id="starting/pending",
        ),
        pytest.param(
            PodObservation(ready=False), True, id="starting/running-not-ready"
        ),
        pytest.param(PodObservation(), False, id="starting/ready-is-not"),
        pytest.param(
            PodObservation(phase=PodPhase.PENDING, ready=False, deleting=True),
            False,
            id="starting/deleting-is-not",
        ),
        # readme: "Evicted (Failed) pods and pods on their way out do not"
        pytest.param(
            PodObservation(phase=PodPhase.FAILED, ready=False),
            False,
            id="starting/failed-is-not",
        ),
    ],
)
def test_which_pods_are_starting(pod: PodObservation, starting: bool) -> None:
    assert is_starting(pod) is starting


def _readme_fleet() -> tuple[PodObservation, ...]:
    """hpa/README.md's example: 3 pods ready, 5 starting, 500 queued."""
    ready = tuple(
        PodObservation(metrics={QUEUE_METRIC: q, SLOT_METRIC: 1.0})
        for q in (200.0, 150.0, 150.0)
    )
    return ready + tuple(
        PodObservation(phase=PodPhase.PENDING, ready=False) for _ in range(5)
    )


@pytest.mark.parametrize(
    ("allowance", "value", "metric_desired"),
    [
        # readme: "with it, (500 − 5 × 72) / 8 = 18"
        pytest.param(72, 140.0, 18, id="readme/discount-asks-18"),
        # readme: "without the discount KEDA asks for 63 pods (capped at maxReplicas)"
        pytest.param(0, 500.0, 63, id="readme/no-discount-asks-63"),
    ],
)
def test_readme_pending_pod_discount(
    allowance: float, value: float, metric_desired: int
) -> None:
    pods = _readme_fleet()
    queue = queue_trigger_value(pods, allowance)
    slots = slot_trigger_value(pods)
    assert (queue, slots) == (value, 3.0)
    keda = ScaledObject(scaled_object_from_manifest(chart_manifest()))
    decision = keda.hpa_step(0, Observation(spec_replicas=8, pods=pods), [queue, slots])
    assert (decision.metric_desired, decision.metric_name) == (
        metric_desired,
        "s0-prometheus",
    )
    assert decision.desired == 8  # maxReplicas


def test_discount_is_clamped_at_zero() -> None:
    # readme: max(0, ...): more starting pods than queue is no demand, not negative demand
    pods = (PodObservation(metrics={QUEUE_METRIC: 10.0}), PodObservation(ready=False))
    assert queue_trigger_value(pods, 72) == 0.0


def test_starting_pod_that_reports_counts_in_the_sum_and_the_discount() -> None:
    # The query sums the gauge of every scraped gateway and counts not-Ready pods separately.
    pods = (
        PodObservation(metrics={QUEUE_METRIC: 100.0}),
        PodObservation(ready=False, metrics={QUEUE_METRIC: 20.0}),
    )
    assert queue_trigger_value(pods, 72) == 48.0
