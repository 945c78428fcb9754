"""Gateway workers (values gateway.workers, gateway.workerHangTimeoutSeconds,
gateway.admission.interactiveReservedSlots): the worker count and the container's CPU follow each
other, the variables are the gateway's own settings, the liveness probe leaves a hung worker to the
supervisor, and bad values are refused with what to fix."""

from __future__ import annotations

import os
from typing import Any

import pytest

from chatfleet.settings import Settings
from tests.chart.render import CHART, containers, env, helm, notes, render, set_args
from tests.chart.test_chart import SIM


def gateway(values: dict[str, Any]) -> dict[str, Any]:
    return containers(render({**SIM, **values}))["gateway"]


def workers(container: dict[str, Any]) -> int:
    return int(env(container)["CHATFLEET_SERVER__WORKERS"])


def test_by_default_auto_runs_two_workers_on_two_requested_cores_without_a_cpu_limit() -> None:
    container = gateway({})
    assert workers(container) == 2
    resources = container["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "768Mi", "ephemeral-storage": "2Gi"}
    assert resources["limits"] == {"memory": "1536Mi"}, "no CPU limit: CFS throttling stalls event loops"


@pytest.mark.parametrize(("count", "memory_request", "memory_limit"), [
    (1, "512Mi", "1024Mi"), (4, "1280Mi", "2560Mi"), (8, "2304Mi", "4608Mi")])
def test_a_number_of_workers_sizes_the_cpu_request_and_the_memory(count: int, memory_request: str,
                                                                  memory_limit: str) -> None:
    container = gateway({"gateway.workers": count})
    assert workers(container) == count
    assert container["resources"] == {"requests": {"cpu": str(count), "memory": memory_request,
                                                   "ephemeral-storage": "2Gi"},
                                      "limits": {"memory": memory_limit}}


@pytest.mark.parametrize(("cpu", "count"), [("4", 4), (3, 3), ("1500m", 2), (0.5, 1), ("250m", 1)])
def test_auto_runs_one_worker_per_core_of_the_cpu_request_rounded_up(cpu: Any, count: int) -> None:
    container = gateway({"gateway.resources.requests.cpu": cpu})
    assert workers(container) == count
    assert container["resources"]["requests"]["cpu"] == cpu, "a given request is kept as given"
    assert container["resources"]["requests"]["memory"] == f"{256 * (count + 1)}Mi"


@pytest.mark.parametrize(("limit", "count", "cpu_request"), [
    ("3", 3, "3"), ("1500m", 1, "1"), ("500m", 1, "500m"), (4.5, 4, "4")])
def test_auto_takes_the_whole_cores_of_a_cpu_limit_as_the_gateway_would(limit: Any, count: int,
                                                                       cpu_request: str) -> None:
    """With a limit, the gateway's own auto would read the cgroup quota: whole cores, so no
    worker is throttled; the CPU request follows the workers, never above the limit."""
    container = gateway({"gateway.resources.limits.cpu": limit})
    assert workers(container) == count
    assert container["resources"]["limits"]["cpu"] == limit
    assert container["resources"]["requests"]["cpu"] == cpu_request


def test_a_cpu_limit_at_or_above_the_workers_is_kept() -> None:
    container = gateway({"gateway.workers": 4, "gateway.resources.limits.cpu": 5})
    assert workers(container) == 4
    assert container["resources"]["requests"]["cpu"] == "4"
    assert container["resources"]["limits"]["cpu"] == 5


@pytest.mark.parametrize("side", ["requests", "limits"])
def test_one_memory_figure_given_sets_the_other(side: str) -> None:
    container = gateway({"gateway.workers": 4, f"gateway.resources.{side}.memory": "4Gi"})
    assert container["resources"]["requests"]["memory"] == "4Gi"
    assert container["resources"]["limits"]["memory"] == "4Gi"


def test_resources_the_user_names_are_kept_as_given() -> None:
    given = {"requests": {"cpu": "1", "memory": "3Gi", "ephemeral-storage": "5Gi"}, "limits": {"memory": "6Gi"}}
    container = gateway({"gateway.workers": 4, "gateway.resources": given})
    assert workers(container) == 4
    assert container["resources"] == given


def test_the_gateway_reads_the_worker_variables_the_chart_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CHATFLEET_")]:
        monkeypatch.delenv(key)
    rendered = env(gateway({"gateway.workers": 3, "gateway.workerHangTimeoutSeconds": 12.5,
                            "gateway.admission.interactiveReservedSlots": 6}))
    for name, value in rendered.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.admission.interactive_reserved_slots == 6
    assert settings.admission.reserved_for_interactive == 6
    assert settings.server.workers == 3
    assert settings.server.worker_hang_timeout_s == 12.5


def test_interactive_reserved_slots_reach_the_gateway_only_when_set() -> None:
    assert "CHATFLEET_ADMISSION__INTERACTIVE_RESERVED_SLOTS" not in env(gateway({})), \
        "unset: the gateway's default (an eighth of the slots)"
    for reserved in (0, 8):
        rendered = env(gateway({"gateway.admission.interactiveReservedSlots": reserved}))
        assert rendered["CHATFLEET_ADMISSION__INTERACTIVE_RESERVED_SLOTS"] == str(reserved)


@pytest.mark.parametrize(("hang", "threshold"), [(30, 5), (95, 12), (5, 3)])
def test_the_liveness_probe_outlasts_the_worker_hang_timeout(hang: float, threshold: int) -> None:
    """A hung worker is replaced by the supervisor; the kubelet restarting the container (every
    worker's streams) must come only well after that, even with a single worker."""
    container = gateway({"gateway.workerHangTimeoutSeconds": hang})
    assert env(container)["CHATFLEET_SERVER__WORKER_HANG_TIMEOUT_S"] == str(hang)
    probe = container["livenessProbe"]
    assert probe["failureThreshold"] == threshold
    earliest_restart = (probe["failureThreshold"] - 1) * probe["periodSeconds"] + probe["timeoutSeconds"]
    assert earliest_restart >= hang + 10


def test_notes_say_how_many_workers_run() -> None:
    assert "Gateway worker processes: 2 (gateway.workers auto: one per core of its CPU)." in notes(SIM)
    assert "Gateway worker processes: 3." in notes({**SIM, "gateway.workers": 3})


@pytest.mark.parametrize(("values", "message"), [
    ({"gateway.workers": 0}, "at '/gateway/workers'"),
    ({"gateway.workers": "many"}, "value must be 'auto'"),
    ({"gateway.workers": 2.5}, "at '/gateway/workers'"),
    ({"gateway.workers": 65}, "at '/gateway/workers'"),
    ({"gateway.workerHangTimeoutSeconds": 0}, "/gateway/workerHangTimeoutSeconds"),
    ({"gateway.admission.interactiveReservedSlots": -1}, "/gateway/admission/interactiveReservedSlots"),
    ({"gateway.admission.interactiveReservedSlots": 64},
     "gateway.admission.interactiveReservedSlots (64) must be smaller than the engine slots (64"),
    ({"gateway.admission.engineSlots": 8, "gateway.admission.interactiveReservedSlots": 8},
     "interactiveReservedSlots (8) must be smaller than the engine slots (8"),
    ({"gateway.workers": 4, "gateway.resources.limits.cpu": "2"},
     "gateway.resources.limits.cpu (2) is below gateway.workers (4) cores"),
    ({"gateway.resources.requests.cpu": "2k"},
     "gateway.resources.requests.cpu (2k) is no CPU quantity the chart can count cores in"),
    ({"gateway.resources.requests.cpu": 100}, "makes 100 workers, more than the 64 a pod may run"),
], ids=["zero", "word", "fraction", "too-many", "zero-hang", "negative-reserve", "reserve-all",
        "reserve-all-explicit-slots", "cpu-limit-below-workers", "unreadable-cpu", "auto-too-many"])
def test_bad_worker_values_are_refused_with_what_to_fix(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
