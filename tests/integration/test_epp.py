"""`chatfleet epp` spoken to as Envoy's ext_proc filter speaks to it (tests/support/epp.py).

The pods here are HTTP servers that answer ``GET /load`` with a load the test sets, so each test
can put the pool in an exact state (a full queue, a draining pod); the real gateways' ``/load``
and the real Envoy in front are tests/integration/test_epp_envoy.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import start_engine_sim
from tests.support.epp import EppServer, destination, start_epp
from tests.support.load_pods import LoadPod, load
from tests.support.metrics import documented, families, family_name
from tests.support.metrics import value as metric_value
from tests.support.procs import wait_until

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}


@pytest.fixture
def pods() -> Iterator[list[LoadPod]]:
    started = [LoadPod() for _ in range(3)]
    yield started
    for pod in started:
        pod.close()


@pytest.fixture
def epp(pods: list[LoadPod]) -> Iterator[EppServer]:
    with picker(pods, "--poll-interval", "0.02") as server:
        yield server


@contextmanager
def picker(pods: list[LoadPod], *args: str) -> Iterator[EppServer]:
    """``chatfleet epp`` on ``pods`` with ``args``, stopped when the block ends."""
    server = start_epp([pod.endpoint for pod in pods], args=args)
    try:
        yield server
    finally:
        server.proc.terminate()


def settle(epp: EppServer) -> None:
    """Two poll intervals and then some: every pod's new load has been read."""
    polls = metric_value(epp.metrics_text(),
                         "chatfleet_epp_load_polls_total", result="ok")
    wait_until(lambda: metric_value(epp.metrics_text(),
                                    "chatfleet_epp_load_polls_total", result="ok") >= polls + 9,
               timeout=10, interval=0.02, message="three more polls of each pod")


def test_the_pick_goes_to_the_pod_with_a_free_slot_in_header_and_metadata(epp: EppServer, pods: list[LoadPod]) -> None:
    pods[0].load, pods[1].load, pods[2].load = load(4, queued_i=3), load(3), load(4, queued_i=1)
    settle(epp)

    responses = epp.ask(HEADERS, CHAT)

    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert destination(responses) == pods[1].endpoint


def test_a_request_without_a_body_is_answered_at_its_headers(epp: EppServer, pods: list[LoadPod]) -> None:
    pods[0].load, pods[1].load, pods[2].load = load(4), load(4), load(1)
    settle(epp)

    responses = epp.ask({":method": "GET", ":path": "/v1/models"})

    assert [r.WhichOneof("response") for r in responses] == ["request_headers"]
    assert destination(responses) == pods[2].endpoint


def test_a_burst_between_polls_is_spread_over_equal_pods(pods: list[LoadPod]) -> None:
    """The pods' loads do not move here, so only the picker's own count of what it sent since
    the last poll (a minute apart) can spread the burst."""
    with picker(pods, "--poll-interval", "60", "--stale-after", "120") as epp:
        picked = [destination(epp.ask(HEADERS, CHAT)) for _ in range(6)]

    assert sorted(picked.count(pod.endpoint) for pod in pods) == [2, 2, 2]


def test_a_pick_counts_against_its_pod_until_the_pods_arrivals_show_it(pods: list[LoadPod]) -> None:
    """Polls answered after a pick that do not count it yet (the request is still on its way
    through the proxy) leave it pending; an answer whose ``arrivals`` count it takes it out."""
    a, b, full = pods

    def eight_slots(running: int, arrivals: int) -> dict[str, object]:
        return {**load(running, arrivals=arrivals), "slots": 8, "batch_slots": 7}

    with picker(pods, "--poll-interval", "0.02", "--forget-pick-after", "60") as epp:
        full.load = load(4, queued_i=8)
        a.load, b.load = load(3, arrivals=5), eight_slots(7, arrivals=5)  # a: 3/4 taken, b: 7/8
        settle(epp)
        assert destination(epp.ask(HEADERS, CHAT)) == a.endpoint
        settle(epp)  # a's answers since do not count that request: a's last slot is still taken
        assert destination(epp.ask(HEADERS, CHAT)) == b.endpoint

        # a's request arrived (and ended); b's is still on its way, and one of b's own ended.
        a.load, b.load = load(3, arrivals=6), eight_slots(6, arrivals=5)
        settle(epp)
        assert destination(epp.ask(HEADERS, CHAT)) == a.endpoint  # 3/4 against b's 7/8


def test_a_pick_the_pods_arrivals_never_count_is_forgotten_and_counted(pods: list[LoadPod]) -> None:
    """A request that never reaches the pod's admission (refused at its edge, a route that takes
    no slot) stops counting against the pod after --forget-pick-after."""
    with picker(pods[:1], "--poll-interval", "0.02", "--forget-pick-after", "0.2") as epp:
        pods[0].load = load(3, arrivals=5)
        settle(epp)
        assert destination(epp.ask(HEADERS, CHAT)) == pods[0].endpoint

        wait_until(lambda: metric_value(epp.metrics_text(), "chatfleet_epp_picks_forgotten_total") == 1,
                   timeout=10, interval=0.05, message="the pick forgotten")
        # Its slot is free again in the picker's count: a second request is a slot pick, not a queue one.
        assert destination(epp.ask(HEADERS, CHAT)) == pods[0].endpoint
        assert metric_value(epp.metrics_text(), "chatfleet_epp_picks_total",
                            priority="interactive", outcome="slot") == 2


def test_every_pod_full_is_429_with_retry_after_and_an_openai_error(epp: EppServer, pods: list[LoadPod]) -> None:
    pods[0].load = load(4, queued_i=8, retry_after_s=9)
    pods[1].load = load(4, queued_i=8, retry_after_s=4)
    pods[2].load = load(4, queued_i=8, retry_after_s=6)
    settle(epp)

    (answer,) = [r for r in epp.ask(HEADERS, CHAT) if r.HasField("immediate_response")]
    immediate = answer.immediate_response

    assert immediate.status.code == 429
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert headers == {"content-type": "application/json", "retry-after": "4"}
    error = json.loads(immediate.body)["error"]
    assert error["type"] == "rate_limit_exceeded" and "queue is full" in error["message"]


def test_batch_is_refused_while_interactive_still_finds_a_queue(epp: EppServer, pods: list[LoadPod]) -> None:
    for pod in pods:
        pod.load = load(4, running_batch=3, queued_i=5)
    settle(epp)
    batch_body = json.dumps({"model": "m", "messages": [], "priority": "batch"}).encode()

    batch = epp.ask(HEADERS, batch_body)
    by_header = epp.ask({**HEADERS, "x-chatfleet-priority": "batch"}, CHAT)
    interactive = epp.ask(HEADERS, CHAT)

    assert batch[-1].immediate_response.status.code == 429
    assert by_header[-1].immediate_response.status.code == 429
    assert destination(interactive) in {pod.endpoint for pod in pods}


def test_draining_or_unreachable_pods_get_nothing_and_none_left_is_503(epp: EppServer, pods: list[LoadPod]) -> None:
    pods[0].load = load(0, draining=True)
    pods[1].load = None  # its /load answers 503
    pods[2].load = load(4, queued_i=2)
    settle(epp)

    assert {destination(epp.ask(HEADERS, CHAT)) for _ in range(3)} == {pods[2].endpoint}

    pods[2].close()  # connection refused from now on
    wait_until(lambda: epp.ask(HEADERS, CHAT)[-1].HasField("immediate_response"), timeout=5,
               interval=0.05, message="the stopped pod out of the pool")
    immediate = epp.ask(HEADERS, CHAT)[-1].immediate_response
    assert immediate.status.code == 503
    assert "no pod is ready" in json.loads(immediate.body)["error"]["message"]


def test_the_proxy_subset_hint_limits_the_pick(epp: EppServer, pods: list[LoadPod]) -> None:
    pods[0].load, pods[1].load, pods[2].load = load(0), load(3), load(3)
    settle(epp)

    assert destination(epp.ask(HEADERS, CHAT, subset=[pods[2].endpoint])) == pods[2].endpoint
    empty = epp.ask(HEADERS, CHAT, subset=[])[-1]
    assert empty.immediate_response.status.code == 503
    assert "subset is empty" in json.loads(empty.immediate_response.body)["error"]["message"]


def test_engine_kv_usage_is_read_from_the_engine_metrics_port(pods: list[LoadPod]) -> None:
    """Every pod here shares 127.0.0.1, so one real engine-sim stands for each pod's engine."""
    engine = start_engine_sim()
    epp = start_epp([pod.endpoint for pod in pods], args=["--engine-metrics-port", str(engine.port)])
    try:
        wait_until(lambda: metric_value(epp.metrics_text(), "chatfleet_epp_load_polls_total", source="engine",
                                        result="ok") >= 3, timeout=10, message="three KV reads")
        assert destination(epp.ask(HEADERS, CHAT)) in {pod.endpoint for pod in pods}
        assert metric_value(epp.metrics_text(), "chatfleet_epp_load_polls_total", source="engine", result="error") == 0
    finally:
        epp.proc.terminate()
        engine.proc.terminate()


def test_health_and_metrics_say_what_the_picker_did(epp: EppServer, pods: list[LoadPod]) -> None:
    pods[2].load = load(0, draining=True)
    settle(epp)
    epp.ask(HEADERS, CHAT)

    for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
        assert epp.health(service) == health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: metric_value(epp.metrics_text(),
                                    "chatfleet_epp_endpoints", state="draining") == 1,
               timeout=5, message="the draining pod counted")
    text = epp.metrics_text()
    assert metric_value(text, "chatfleet_epp_endpoints", state="ready") == 2
    assert metric_value(text, "chatfleet_epp_picks_total", priority="interactive", outcome="slot") >= 1
    assert metric_value(text, "chatfleet_epp_decision_seconds_count") >= 1
    assert metric_value(text, "chatfleet_epp_load_age_seconds_count") >= 1
    doc = {family_name(name): labels for name, labels in documented("Endpoint picker").items()}
    assert len(doc) == 6, "the Endpoint picker rows of docs/metrics.md were not found"
    assert families(text) == doc
