"""``chatfleet serve --workers N``: a supervisor and N worker processes on one port, observed
from outside as an operator would: connections land on both workers, /metrics is the pod's, a
killed or hung worker is replaced (and counted) with no counter going back, SIGTERM drains."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import SIM_MODEL, Server, chat, upstream_env
from tests.integration.test_workers_admission import worker_pids
from tests.support.metrics import value
from tests.support.procs import wait_until
from tests.support.sockets import holder, server_socket_inode

HANG_TIMEOUT_S = 3


def two_workers(gw: Server) -> list[int]:
    wait_until(lambda: len(worker_pids(gw.proc.pid)) == 2, 30, message="two workers")
    return worker_pids(gw.proc.pid)


def connections_on_both(gw: Server, workers: list[int]) -> dict[int, http.client.HTTPConnection]:
    """Keep-alive connections, opened until each worker holds one: worker pid -> connection.
    For up to 30 s, not a number of tries: a worker just spawned accepts once its app is up, and
    on a loaded machine the other may win every accept meanwhile."""
    found: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request("GET", "/livez")
        conn.getresponse().read()
        inode = server_socket_inode(gw.port, conn.sock.getsockname()[1])
        owner = holder(workers, inode) if inode is not None else None
        if owner is not None and owner not in found:
            found[owner] = conn
        else:
            conn.close()
            time.sleep(0.01)
        if len(found) == len(workers):
            return found
    raise AssertionError(f"30 s of connections reached only workers {sorted(found)} of {workers}")


def post_chat(conn: http.client.HTTPConnection, max_tokens: int = 3) -> int:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(max_tokens)),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def test_two_workers_serve_one_port_and_are_replaced_when_killed_or_hung(engine_sim, gateway) -> None:
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, server__worker_hang_timeout_s=HANG_TIMEOUT_S),
                         args=["--workers", "2"])
    workers = two_workers(gw)

    # both workers accept on the one port, and one scrape (of either) counts both's requests
    connections = connections_on_both(gw, workers)
    for conn in connections.values():
        assert post_chat(conn) == 200
        assert post_chat(conn) == 200
    for conn in connections.values():
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        assert value(text, "chatfleet_requests_total", outcome="ok") == 4
        assert value(text, "chatfleet_completion_tokens_total") == 12
        assert value(text, "chatfleet_engine_slots") == 64  # the pod's, not 2 x 64
        conn.close()

    # kill -9 one: replaced (a new pid), counted, and the pod's counters do not go back
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(gw.proc.pid)
               and len(worker_pids(gw.proc.pid)) == 2, 30, message="the killed worker replaced")
    wait_until(lambda: value(gw.metrics(), "chatfleet_worker_restarts_total", reason="exited") == 1,
               10, message="the restart counted")
    text = gw.metrics()
    assert value(text, "chatfleet_requests_total", outcome="ok") == 4
    assert value(text, "chatfleet_completion_tokens_total") == 12
    # the pod's exposition reads as one process's: the HELP texts dashboards show are ours
    assert "# HELP chatfleet_queue_depth Requests waiting in the gateway's admission queue" in text
    assert "Multiprocess metric" not in text
    replacement = (set(worker_pids(gw.proc.pid)) - {workers[1]}).pop()

    # a worker whose event loop stops (SIGSTOP: no heartbeat, though the socket still takes its
    # connections) is killed and replaced within the bound; meanwhile the replacement serves
    stopped = workers[1]
    os.kill(stopped, signal.SIGSTOP)
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    assert post_chat(conn) == 200
    assert holder([replacement], server_socket_inode(gw.port, conn.sock.getsockname()[1]) or 0)
    conn.close()
    wait_until(lambda: stopped not in worker_pids(gw.proc.pid)
               and len(worker_pids(gw.proc.pid)) == 2, HANG_TIMEOUT_S + 15,
               message="the hung worker replaced")
    assert time.monotonic() - t0 < HANG_TIMEOUT_S + 15
    text = gw.metrics()
    assert value(text, "chatfleet_worker_restarts_total", reason="hung") == 1
    assert value(text, "chatfleet_worker_restarts_total", reason="exited") == 1
    assert value(text, "chatfleet_requests_total", outcome="ok") == 5
    assert value(text, "chatfleet_completion_tokens_total") == 15
    log = gw.proc.log_text()
    assert f"(pid {victim}) was killed by SIGKILL" in log
    assert f"(pid {stopped}) sent no heartbeat" in log


def test_sigterm_drains_every_worker_and_exits_0(engine_sim, gateway) -> None:
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, server__drain_timeout_s=20), args=["--workers", "2"])
    two_workers(gw)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", gw.v1 + "/chat/completions",
                           json=chat(600, stream=True)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            # new requests are refused at once, whichever worker takes them: 503, not a hang
            wait_until(lambda: httpx.get(gw.url + "/readyz", timeout=5).status_code == 503, 5,
                       interval=0.02, message="/readyz failing")
            refused = httpx.post(gw.v1 + "/chat/completions", json=chat(3), timeout=5)
            assert refused.status_code == 503 and "retry-after" in refused.headers
            rest = list(lines)
    assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""], rest[-3:]
    gw.proc.popen.wait(timeout=20)
    assert gw.proc.returncode == 0, gw.proc.log_tail()
    assert time.monotonic() - t0 < 20


def test_workers_finish_their_streams_and_exit_when_the_supervisor_dies(engine_sim, gateway) -> None:
    """No orphan serves the port after the supervisor is killed: each worker loses its admission
    link, refuses new work, lets its running stream end, and exits."""
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, server__drain_timeout_s=20), args=["--workers", "2"])
    workers = two_workers(gw)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", gw.v1 + "/chat/completions",
                           json=chat(300, stream=True)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            gw.proc.popen.send_signal(signal.SIGKILL)
            rest = list(lines)
    assert "data: [DONE]" in rest, rest[-3:]
    wait_until(lambda: not any(running(pid) for pid in workers), 30, message="the workers exited")


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting for its parent)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_auto_is_one_process_with_the_simulated_engine(gateway) -> None:
    gw: Server = gateway({"CHATFLEET_SERVER__WORKERS": "auto"})
    assert worker_pids(gw.proc.pid) == []
    assert httpx.get(gw.v1 + "/models", timeout=10).json()["data"][0]["id"] == SIM_MODEL


def test_more_workers_than_one_with_the_simulated_engine_exit_2_saying_what_to_run() -> None:
    done = subprocess.run([sys.executable, "-m", "chatfleet", "serve", "--port", "1",
                           "--workers", "2"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CHATFLEET_ENGINE__KIND": "simulated"})
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "chatfleet engine-sim" in message and "CHATFLEET_ENGINE__KIND=openai" in message
    assert "CHATFLEET_ENGINE__URL" in message
