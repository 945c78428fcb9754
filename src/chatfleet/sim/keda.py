"""A KEDA ScaledObject on top of the HPA model: the chart's ``autoscaling.mode: keda``.

KEDA does not scale 1 <-> N itself. It creates an HPA (``keda-hpa-<name>``) with one External
metric per trigger (``s<index>-<trigger type>``, target = the trigger's threshold, AverageValue
by default), serves those metrics from its metrics server, and only moves the target between 0
and its floor. So the model is :class:`~chatfleet.sim.hpa.HorizontalPodAutoscaler` plus two loops:

- the HPA's sync (every 15 s, :meth:`ScaledObject.hpa_step`): KEDA's metrics server runs the
  trigger's query when the HPA asks (``useCachedMetrics: false``, the default) or answers with the
  value of the last poll (``true``), and sends it as ``int64(value x 1000)`` milli-units;
- the KEDA operator's scale loop (every ``pollingInterval``, :meth:`ScaledObject.poll`): a trigger
  is active when its value exceeds its ``activationThreshold`` (0 by default); at 0 replicas an
  active trigger scales to ``minReplicaCount`` (at least 1), and with ``minReplicaCount: 0`` the
  target goes to 0 once no trigger has been active for ``cooldownPeriod``. Between 1 and N the
  cooldown plays no part: the HPA's behavior (stabilisation window, policies) decides.

The chart's queue trigger discounts pods that are still starting (hpa/README.md, "The pending-pod
discount"): ``max(0, sum(queue) - A x N_starting)``. :func:`queue_trigger_value` and
:func:`slot_trigger_value` compute what its two PromQL queries return for a set of pods.

Left out: ``fallback``, ``idleReplicaCount``, ``initialCooldownPeriod``, ``scalingModifiers`` and
pausing, none of which the chart renders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from chatfleet.sim.hpa import (
    Behavior,
    ControllerConfig,
    Decision,
    ExternalMetric,
    HorizontalPodAutoscaler,
    HPASpec,
    Observation,
    PodObservation,
    PodPhase,
    TargetType,
    parse_quantity,
    rules_from_manifest,
)

__all__ = [
    "DEFAULT_COOLDOWN_PERIOD_S",
    "DEFAULT_POLLING_INTERVAL_S",
    "QUEUE_METRIC",
    "SLOT_METRIC",
    "PollResult",
    "ScaledObject",
    "ScaledObjectSpec",
    "Trigger",
    "is_starting",
    "pending_pod_allowance",
    "queue_trigger_value",
    "scaled_object_from_manifest",
    "slot_trigger_value",
]

DEFAULT_POLLING_INTERVAL_S = 30.0
DEFAULT_COOLDOWN_PERIOD_S = 300.0
QUEUE_METRIC = "chatfleet_queue_depth"
SLOT_METRIC = "chatfleet_slot_utilization"


@dataclass(frozen=True, slots=True)
class Trigger:
    """One entry of ``spec.triggers``: its query's result is compared with ``threshold``."""

    type: str
    threshold: float
    metric_type: TargetType = TargetType.AVERAGE_VALUE
    activation_threshold: float = 0.0
    use_cached_metrics: bool = False


@dataclass(frozen=True, slots=True)
class ScaledObjectSpec:
    """The parts of a ScaledObject's spec that decide the replica count (KEDA's defaults)."""

    triggers: tuple[Trigger, ...]
    min_replica_count: int = 0
    max_replica_count: int = 100
    polling_interval_s: float = DEFAULT_POLLING_INTERVAL_S
    cooldown_period_s: float = DEFAULT_COOLDOWN_PERIOD_S
    behavior: Behavior | None = None

    def metric_name(self, index: int) -> str:
        """The External metric name KEDA gives trigger ``index`` in its HPA (``s0-prometheus``)."""
        return f"s{index}-{self.triggers[index].type}"

    def hpa_spec(self) -> HPASpec:
        """The HPA KEDA creates: its floor is ``minReplicaCount``, but never below 1.

        The HPA cannot hold 0 replicas (it stands aside at 0), so scale-to-zero is KEDA's job.
        """
        return HPASpec(
            min_replicas=max(self.min_replica_count, 1),
            max_replicas=self.max_replica_count,
            metrics=tuple(
                ExternalMetric(
                    self.metric_name(i), trigger.metric_type, trigger.threshold
                )
                for i, trigger in enumerate(self.triggers)
            ),
            behavior=self.behavior,
        )


def scaled_object_from_manifest(manifest: Mapping[str, Any]) -> ScaledObjectSpec:
    """A ``keda.sh/v1alpha1`` ScaledObject (as parsed YAML) as the model's spec."""
    if (
        manifest.get("apiVersion") != "keda.sh/v1alpha1"
        or manifest.get("kind") != "ScaledObject"
    ):
        raise ValueError("expected a keda.sh/v1alpha1 ScaledObject")
    spec = manifest["spec"]
    hpa_config = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    behavior = hpa_config.get("behavior")
    return ScaledObjectSpec(
        triggers=tuple(
            Trigger(
                type=entry["type"],
                threshold=parse_quantity(entry["metadata"]["threshold"]),
                metric_type=TargetType(entry.get("metricType", "AverageValue")),
                activation_threshold=parse_quantity(
                    entry["metadata"].get("activationThreshold", 0)
                ),
                use_cached_metrics=bool(entry.get("useCachedMetrics", False)),
            )
            for entry in spec["triggers"]
        ),
        min_replica_count=int(spec.get("minReplicaCount", 0)),
        max_replica_count=int(spec.get("maxReplicaCount", 100)),
        polling_interval_s=float(
            spec.get("pollingInterval", DEFAULT_POLLING_INTERVAL_S)
        ),
        cooldown_period_s=float(spec.get("cooldownPeriod", DEFAULT_COOLDOWN_PERIOD_S)),
        behavior=None
        if behavior is None
        else Behavior(
            scale_up=rules_from_manifest(behavior.get("scaleUp")),
            scale_down=rules_from_manifest(behavior.get("scaleDown")),
        ),
    )


@dataclass(frozen=True, slots=True)
class PollResult:
    """One run of KEDA's scale loop: whether any trigger is active, and the count KEDA sets.

    ``desired`` is None when KEDA leaves the count to the HPA (the usual case between 1 and N).
    """

    active: bool
    desired: int | None


def _as_sent(value: float) -> float:
    """The value as KEDA's metrics server sends it: ``int64(value x 1000)`` milli-units."""
    return math.trunc(round(value * 1000.0, 6)) / 1000.0


class ScaledObject:
    """One ScaledObject: the KEDA operator's state for it and the HPA it owns.

    Trigger values are given per call in trigger order (None: the query failed). The simulator
    calls :meth:`poll` every ``polling_interval_s`` and :meth:`hpa_step` every HPA sync period.
    """

    def __init__(
        self, spec: ScaledObjectSpec, config: ControllerConfig | None = None
    ) -> None:
        self.spec = spec
        self.hpa = HorizontalPodAutoscaler(spec.hpa_spec(), config)
        self._last_active: float | None = None
        self._polled: tuple[float | None, ...] = ()

    def poll(
        self, now: float, current_replicas: int, values: Sequence[float | None]
    ) -> PollResult:
        """The scale loop (``scaleExecutor.RequestScale``) at ``now``."""
        self._polled = tuple(values)
        active = any(
            value is not None and value > trigger.activation_threshold
            for trigger, value in zip(self.spec.triggers, values, strict=True)
        )
        desired: int | None = None
        if current_replicas == 0 and active:
            desired = max(self.spec.min_replica_count, 1)  # scaleFromZeroOrIdle
        elif not active and current_replicas > 0 and self.spec.min_replica_count == 0:
            # scaleToZeroOrIdle: never active (nil lastActiveTime) or quiet for a whole cooldown.
            last = self._last_active
            if last is None or last + self.spec.cooldown_period_s < now:
                desired = 0
        if active:
            self._last_active = now
        return PollResult(active, desired)

    def hpa_step(
        self, now: float, observation: Observation, values: Sequence[float | None]
    ) -> Decision:
        """The HPA's sync, with the External values KEDA's metrics server answers."""
        external: dict[str, tuple[float, ...]] = {}
        for index, (trigger, fresh) in enumerate(
            zip(self.spec.triggers, values, strict=True)
        ):
            cached = self._polled[index] if self._polled else None
            value = (
                cached if trigger.use_cached_metrics and cached is not None else fresh
            )
            if (
                value is not None
            ):  # a failed query leaves the metric out: the HPA sees an error
                external[self.spec.metric_name(index)] = (_as_sent(value),)
        return self.hpa.step(now, replace(observation, external_values=external))


# --- the chart's triggers -------------------------------------------------------------------


def pending_pod_allowance(
    engine_slots: int, target_queue_depth_per_pod: float, override: float | None = None
) -> float:
    """``autoscaling.keda.pendingPodAllowance``; null means slots + the target queue per pod.

    A pod that becomes ready runs ``engine_slots`` requests and may hold the target queue on top,
    so that is the backlog each starting pod is already on its way to absorb.
    """
    return engine_slots + target_queue_depth_per_pod if override is None else override


def is_starting(pod: PodObservation) -> bool:
    """The query's "not ready yet": Pending, or Running without Ready, and not being deleted."""
    if pod.deleting:
        return False
    return pod.phase is PodPhase.PENDING or (
        pod.phase is PodPhase.RUNNING and not pod.ready
    )


def queue_trigger_value(
    pods: Sequence[PodObservation], allowance: float, metric: str = QUEUE_METRIC
) -> float:
    """The queue trigger: ``clamp_min(sum(queue) - allowance x starting pods, 0)``.

    The sum covers every pod that reports the gauge, ready or not, as the query does.
    """
    queued = sum(pod.metrics[metric] for pod in pods if metric in pod.metrics)
    return max(0.0, queued - allowance * sum(1 for pod in pods if is_starting(pod)))


def slot_trigger_value(
    pods: Sequence[PodObservation], metric: str = SLOT_METRIC
) -> float:
    """The slot trigger: the sum over pods of running / engine slots (each pod's utilisation)."""
    return sum(pod.metrics[metric] for pod in pods if metric in pod.metrics)
