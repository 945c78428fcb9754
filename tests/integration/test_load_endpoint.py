"""``GET /load``: the pod's slots and queue as the endpoint picker polls them, on real processes.

One gateway process, then a pod of two workers: long streams hold the slots, more wait in the
queue, and /load (from every worker) counts them for the whole pod, batch apart from interactive;
zero once the clients have gone; ``draining`` once SIGTERM arrives while a stream still runs; 503
from a worker whose pod is gone (its supervisor killed)."""

from __future__ import annotations

import http.client
import json
import signal

import httpx

from tests.conftest import Server, chat, upstream_env
from tests.integration.test_workers import connections_on_both, running, two_workers
from tests.support.metrics import value
from tests.support.procs import wait_until

POD = {"admission__engine_slots": 2, "admission__max_queue": 4,
       "admission__interactive_reserved_slots": 1, "server__drain_timeout_s": 20}
"""Two slots, one of them kept for interactive requests (batch_slots 1)."""
IDLE = {"running": 0, "running_batch": 0, "queued_interactive": 0, "queued_batch": 0}


def start_stream(conn: http.client.HTTPConnection, priority: str) -> None:
    """Send a long stream (about 18 s of tokens) and leave its answer unread: it holds its slot
    or its place in the queue until the connection closes."""
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(4000, stream=True)),
                 headers={"Content-Type": "application/json", "X-ChatFleet-Priority": priority})


def load(conn: http.client.HTTPConnection) -> dict:
    conn.request("GET", "/load")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, body
    assert response.headers["content-type"] == "application/json"
    return json.loads(body)


def wait_load(conns: list[http.client.HTTPConnection], **expected: object) -> None:
    """Until /load on every one of ``conns`` shows ``expected`` (a request just sent needs a
    moment to reach admission)."""
    def reached() -> bool:
        return all(expected.items() <= load(conn).items() for conn in conns)
    wait_until(reached, 15, interval=0.02, message=f"/load showing {expected}")


def test_load_counts_running_and_queued_by_priority_then_draining(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, **POD))
    poll = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    assert load(poll) == {"slots": 2, "batch_slots": 1, **IDLE, "max_queue": 4, "draining": False,
                          "retry_after_s": load(poll)["retry_after_s"], "arrivals": 0}
    streams = [http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10) for _ in range(4)]
    steps = [("batch", {"running": 1, "running_batch": 1}),
             ("interactive", {"running": 2}),
             ("batch", {"queued_batch": 1}),              # the batch share (1 slot) is taken
             ("interactive", {"queued_interactive": 1})]  # both slots are taken
    for conn, (priority, then) in zip(streams, steps, strict=True):
        start_stream(conn, priority)
        wait_load([poll], **then)
    now = load(poll)
    assert now == {"slots": 2, "batch_slots": 1, "running": 2, "running_batch": 1,
                   "queued_interactive": 1, "queued_batch": 1, "max_queue": 4, "draining": False,
                   "retry_after_s": now["retry_after_s"], "arrivals": 4}
    assert isinstance(now["retry_after_s"], int) and 1 <= now["retry_after_s"] <= 60
    metrics = gw.metrics()  # /load and the autoscaler's gauges tell the same story
    assert value(metrics, "chatfleet_requests_running") == 2
    assert value(metrics, "chatfleet_queue_depth", priority="batch") == 1
    assert value(metrics, "chatfleet_queue_depth", priority="interactive") == 1

    for conn in streams:
        conn.close()  # the clients go: slots and queue places are given back
    wait_load([poll], **IDLE)

    last = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    start_stream(last, "interactive")
    wait_load([poll], running=1)
    gw.proc.send_signal(signal.SIGTERM)
    wait_load([poll], draining=True, running=1)
    assert httpx.get(gw.url + "/readyz", timeout=5).status_code == 503
    last.close()
    gw.proc.popen.wait(timeout=20)
    assert gw.proc.returncode == 0, gw.proc.log_tail()


def test_every_worker_of_a_pod_reports_the_pods_load(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, **POD), args=["--workers", "2"])
    workers = two_workers(gw)
    # two connections for streams and one for /load on each worker: worker pid -> connection
    first, second, polls = (connections_on_both(gw, workers) for _ in range(3))
    a, b = workers
    pollers = list(polls.values())
    assert [load(conn)["running"] for conn in pollers] == [0, 0]
    steps = [(first[a], "batch", {"running": 1, "running_batch": 1}),
             (first[b], "interactive", {"running": 2}),
             (second[a], "interactive", {"queued_interactive": 1}),
             (second[b], "batch", {"queued_batch": 1})]
    for conn, priority, then in steps:
        start_stream(conn, priority)
        wait_load(pollers, **then)
    expected = {"slots": 2, "batch_slots": 1, "running": 2, "running_batch": 1,
                "queued_interactive": 1, "queued_batch": 1, "max_queue": 4, "draining": False,
                "arrivals": 4}
    answers = [load(conn) for _ in range(5) for conn in pollers]
    assert all(answer.items() >= expected.items() for answer in answers), answers
    metrics = gw.metrics()
    assert value(metrics, "chatfleet_requests_running") == 2
    assert value(metrics, "chatfleet_queue_depth", priority="batch") == 1

    for conn in second.values():
        conn.close()  # the queued clients go; each worker keeps one running stream
    wait_load(pollers, running=2, queued_interactive=0, queued_batch=0)
    gw.proc.send_signal(signal.SIGTERM)
    wait_load(pollers, draining=True, running=2)
    for conn in first.values():
        conn.close()
    gw.proc.popen.wait(timeout=20)
    assert gw.proc.returncode == 0, gw.proc.log_tail()


def test_a_worker_whose_supervisor_is_gone_answers_503_saying_why(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, **POD), args=["--workers", "2"])
    workers = two_workers(gw)
    a = workers[0]
    stream, poll = connections_on_both(gw, workers)[a], connections_on_both(gw, workers)[a]
    start_stream(stream, "interactive")  # keeps worker a serving while it drains
    wait_load([poll], running=1)
    gw.proc.popen.send_signal(signal.SIGKILL)

    def refused() -> bool:
        poll.request("GET", "/load")
        response = poll.getresponse()
        body = response.read()
        if response.status == 200:
            return False
        assert response.status == 503, body
        assert "coordinator stopped" in json.loads(body)["error"]["message"]
        return True
    wait_until(refused, 15, interval=0.02, message="/load answering 503")
    stream.close()
    wait_until(lambda: not any(running(pid) for pid in workers), 30, message="the workers exited")
