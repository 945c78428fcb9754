"""Scale-down with a long answer streaming (issue 16), on real processes.

The chart sizes a pod's drain from the longest answer it accepts at the slowest decode speed it
sees (charts/chatfleet/templates/_drain.tpl). Here that speed is measured on engine-sim, the chart
is rendered with it, and a real gateway runs with the drain the chart derived. SIGTERM, as the
kubelet sends it, arrives just after a longest answer has started: the answer finishes complete,
the gateway exits 0, and the engine container's rendered preStop hold lasts as long as the
gateway listens and 5 s more (the gateway's own last grace), no longer.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time

import httpx

from tests.chart.render import render
from tests.conftest import Server, chat, streamed_tokens, upstream_env
from tests.support.procs import wait_until

LONGEST = 1300
"""Tokens of the longest answer the test pod accepts: about 6 s on engine-sim's tiny-cpu, longer
than the 5 s the gateway still gives open connections after its drain, so a drain shorter than
the answer cuts it."""


async def decode_speed(client: httpx.AsyncClient, sim: Server, tokens: int = 200) -> float:
    """Tokens/s of one stream straight from engine-sim, first token to last."""
    first = last = 0.0
    async with client.stream("POST", sim.v1 + "/chat/completions",
                             json=chat(tokens, stream=True)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                last = time.perf_counter()
                first = first or last
    return (tokens - 1) / (last - first)


def rendered(values: dict[str, object]) -> tuple[dict[str, str], dict[str, object], int]:
    """The gateway container's environment, the engine container, and the grace period."""
    docs = render({"engine.kind": "sim", **values})
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "chatfleet")
    pod = deployment["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    env = {e["name"]: e["value"] for e in by_name["gateway"]["env"] if "value" in e}
    return env, by_name["engine"], pod["terminationGracePeriodSeconds"]


async def test_a_scale_down_lets_the_longest_answer_finish(engine_sim, gateway) -> None:
    """With two workers behind the pod's supervisor, as the chart runs the gateway (one worker's
    drain is tests/integration/test_resilience.py's)."""
    workers = 2
    sim: Server = engine_sim()
    async with httpx.AsyncClient(timeout=60) as client:
        speed = await decode_speed(client, sim)
        floor = round(speed / 2, 1)  # the chart's floor sits below the measured speed, too
        values = {"gateway.limits.maxTokens": LONGEST,
                  "gateway.drain.minDecodeTokensPerSecond": floor,
                  "gateway.drain.marginSeconds": 2, "gateway.admission.maxQueueWaitSeconds": 1}
        env, _, grace = rendered(values)
        drain = int(env["CHATFLEET_SERVER__DRAIN_TIMEOUT_S"])
        assert drain == 1 + math.ceil(LONGEST / floor) + 2
        assert grace >= 5 + drain + 5, "the kubelet must not kill the pod before the drain ends"
        names = ("CHATFLEET_SERVER__DRAIN_TIMEOUT_S", "CHATFLEET_LIMITS__MAX_TOKENS",
                 "CHATFLEET_ADMISSION__MAX_QUEUE_WAIT_S")
        gw: Server = gateway({**upstream_env(sim), **{n: env[n] for n in names}},
                             args=["--workers", str(workers)])
        _, engine, _ = rendered({**values, "gateway.port": gw.port})
        command = engine["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["python3", "-c"]

        over = await client.post(gw.v1 + "/chat/completions", json=chat(LONGEST + 1))
        assert over.status_code == 400, over.text
        assert f"at most {LONGEST}" in over.json()["error"]["message"]

        lines: list[str] = []

        async def longest_answer() -> float:
            async with client.stream("POST", gw.v1 + "/chat/completions",
                                     json=chat(LONGEST, stream=True)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
            return time.perf_counter()

        task = asyncio.create_task(longest_answer())
        deadline = time.monotonic() + 10
        while not streamed_tokens("\n".join(lines)):
            assert time.monotonic() < deadline and not task.done(), "no first token"
            await asyncio.sleep(0.01)
        # The pod is deleted: every container's preStop starts; the gateway gets SIGTERM.
        hold = subprocess.Popen([sys.executable, *command[1:]])
        try:
            sigterm_at = time.perf_counter()
            gw.proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(timeout=5) as probe:  # a new connection, as a probe's:
                ready = await probe.get(gw.url + "/readyz")  # idle keep-alives close at SIGTERM
            done_at = await asyncio.wait_for(task, timeout=drain + 5)
            hold_running_at_done = hold.poll() is None
            wait_until(lambda: gw.proc.returncode is not None, timeout=drain + 10,
                       message="gateway exit")
            exit_at = time.perf_counter()
            hold.wait(timeout=10)
            hold_gone_at = time.perf_counter()
        finally:
            if hold.poll() is None:
                hold.kill()

    print(f"workers {workers}: engine-sim decodes {speed:.0f} tokens/s per stream; floor "
          f"{floor} -> drain {drain} s, grace {grace} s; the answer ended "
          f"{done_at - sigterm_at:.2f} s after SIGTERM, the gateway exited after "
          f"{exit_at - sigterm_at:.2f} s, the engine's hold {hold_gone_at - exit_at:.2f} s later")
    assert ready.status_code == 503 and "draining" in ready.json()["reason"]
    assert streamed_tokens("\n".join(lines)) == LONGEST and lines[-1] == "data: [DONE]"
    assert done_at - sigterm_at > 0.5, "the answer was not in flight at SIGTERM"
    assert gw.proc.returncode == 0, gw.proc.log_tail()
    assert hold_running_at_done, "the engine stopped while the answer still needed it"
    assert hold.returncode == 0 and hold_gone_at - exit_at < 8, "the engine held on needlessly"
