"""The one ``AdmissionController`` of a gateway, with its queue and slot gauges kept current.

Built in the gateway process itself with one worker (``app.py``), and in the supervisor, where the
pod's admission coordinator serves it to every worker (``pod/supervisor.py``): either way the
process that owns the pod's queue sets ``chatfleet_queue_depth`` and ``chatfleet_requests_running``
(the HPA's signal), so they are the pod's.
"""

from __future__ import annotations

from prometheus_client import Gauge

from chatfleet.serving.admission import AdmissionController, Priority
from chatfleet.settings import AdmissionSettings
from chatfleet.telemetry.metrics import GatewayMetrics

__all__ = ["measured_admission"]


def measured_admission(settings: AdmissionSettings, metrics: GatewayMetrics) -> AdmissionController:
    """An ``AdmissionController`` as ``settings`` say, whose every change sets the gauges."""
    queue_gauges = {p: metrics.queue_depth.labels(metrics.model, p.value) for p in Priority}
    running_gauge = metrics.requests_running.labels(metrics.model)
    shown: dict[Gauge, int] = {}

    def show(gauge: Gauge, value: int) -> None:
        if shown.get(gauge) != value:  # a change moves one or two values; a set takes a lock
            gauge.set(value)
            shown[gauge] = value

    def admission_changed(admission: AdmissionController) -> None:
        for priority, gauge in queue_gauges.items():
            show(gauge, admission.queued(priority))
        show(running_gauge, admission.running)

    return AdmissionController(
        slots=settings.engine_slots, max_queue=settings.max_queue,
        max_queue_wait_s=settings.max_queue_wait_s,
        interactive_reserved=settings.reserved_for_interactive, on_change=admission_changed)
