"""The pod supervisor's costs, measured (docs/operations.md, "Worker processes").

    PYTHONPATH=src:. python3 bench/pod_workers/measure.py

Starts engine-sim, then a gateway with 2 workers and one with 1, and prints JSON:
- the supervisor's CPU while the pod is idle (utime+stime over ``--idle-s``);
- the time from ``kill -9`` of a worker to its replacement's "listening" log line (ms, x3);
- the CPU of 100 /metrics scrapes after 50 requests, pod (all its processes) vs one process;
- a micro-benchmark of one token's metric writes (Histogram.observe + Counter.inc) in
  prometheus-client's multiprocess mode vs a process's own registry (ns per token).
CPU is read from /proc (utime+stime), so a busy machine changes wall times, not these.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.conftest import chat, start_engine_sim, start_gateway, upstream_env  # noqa: E402
from tests.integration.test_workers_admission import worker_pids  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def pod_cpu_s(pid: int) -> float:
    return cpu_s(pid) + sum(cpu_s(child) for child in worker_pids(pid))


MICRO = r"""
import os, sys, time, tempfile
if sys.argv[1] == "multi":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from prometheus_client import CollectorRegistry, Counter, Histogram
r = CollectorRegistry()
h = Histogram("itl", "x", ["model"], registry=r, buckets=[0.001*i for i in range(1, 20)]).labels("m")
c = Counter("tokens", "x", ["model"], registry=r).labels("m")
n = 200_000
t0 = time.process_time()
for i in range(n):
    h.observe(0.0123)
    c.inc()
print((time.process_time() - t0) / n * 1e9)
"""


def micro(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", MICRO, mode], capture_output=True, text=True,
                         check=True).stdout
    return float(out)


def scrape_cpu(gw, pid: int, scrapes: int = 100) -> float:
    with httpx.Client(timeout=10) as client:
        for _ in range(50):
            client.post(gw.v1 + "/chat/completions", json=chat(16)).raise_for_status()
        time.sleep(1)
        before = pod_cpu_s(pid)
        for _ in range(scrapes):
            client.get(gw.url + "/metrics").raise_for_status()
        return (pod_cpu_s(pid) - before) / scrapes * 1000


def restart_ms(gw, pid: int) -> float:
    victim = worker_pids(pid)[0]
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        fresh = [p for p in worker_pids(pid) if p != victim]
        for line in gw.proc.log_text().splitlines():
            match = re.match(r"(\S+ \S+) INFO chatfleet.server: listening .* worker_pid=(\d+)", line)
            if match and int(match.group(2)) in fresh and int(match.group(2)) not in seen:
                seen.add(int(match.group(2)))
                at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return (at - killed) * 1000
        time.sleep(0.02)
    raise TimeoutError("no replacement")


seen: set[int] = set()


def main() -> None:
    idle_s = 20.0
    sim = start_engine_sim()
    result: dict[str, object] = {}
    try:
        env = upstream_env(sim, server__log_level="info")
        env["CHATFLEET_KB__DATA_DIR"] = tempfile.mkdtemp()
        pod = start_gateway(env, args=["--workers", "2"])
        try:
            time.sleep(3)
            seen.update(worker_pids(pod.proc.pid))
            before = cpu_s(pod.proc.pid)
            time.sleep(idle_s)
            result["supervisor_idle_cpu_percent"] = round((cpu_s(pod.proc.pid) - before) / idle_s * 100, 3)
            result["pod_scrape_cpu_ms"] = round(scrape_cpu(pod, pod.proc.pid), 3)
            restarts = []
            for _ in range(3):
                restarts.append(round(restart_ms(pod, pod.proc.pid)))
                time.sleep(2)
            result["kill_to_replacement_listening_ms"] = restarts
        finally:
            pod.proc.terminate()
        single = start_gateway(upstream_env(sim))
        try:
            result["single_scrape_cpu_ms"] = round(scrape_cpu(single, single.proc.pid), 3)
        finally:
            single.proc.terminate()
    finally:
        sim.proc.terminate()
    result["token_metric_writes_ns"] = {"single": round(micro("single")),
                                        "multiprocess": round(micro("multi"))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
