"""The one ``AdmissionController`` of a gateway, with its queue and slot gauges kept current.

Built in the gateway process itself with one worker (``app.py``), and in the supervisor, where the
pod's admission coordinator serves it to every worker (``pod/supervisor.py``): either way the
process that owns the pod's queue sets ``chatfleet_queue_depth`` and ``chatfleet_requests_running``
(the HPA's signal), so they are the pod's.
"""

from __future__ import annotations

from chatfleet.serving.admission import AdmissionController, Priority
from chatfleet.settings import AdmissionSettings
from chatfleet.telemetry.metrics import GatewayMetrics

__all__ = ["measured_admission"]


def measured_admission(settings: AdmissionSettings, metrics: GatewayMetrics) -> AdmissionController:
    """An ``AdmissionController`` as ``settings`` say, whose every change sets the gauges."""
    queue_gauges = {p: metrics.queue_depth.labels(metrics.model, p.value) for p in Priority}
    running_gauge = metrics.requests_running.labels(metrics.model)

    def admission_changed(admission: AdmissionController) -> None:
        for priority, gauge in queue_gauges.items():
            gauge.set(admission.queued(priority))
        running_gauge.set(admission.running)

    return AdmissionController(
        slots=settings.engine_slots, max_queue=settings.max_queue,
        max_queue_wait_s=settings.max_queue_wait_s,
        interactive_reserved=settings.reserved_for_interactive, on_change=admission_changed)
