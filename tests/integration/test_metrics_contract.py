"""/metrics is the contract of docs/metrics.md, and promtool finds nothing to complain about."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from tests.conftest import Server, upstream_env
from tests.support.metrics import documented, families, family_name

MODEL = "chatfleet-sim/tiny-cpu"


def drive_traffic(gw: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    httpx.post(gw.v1 + "/chat/completions", json=body, timeout=10).raise_for_status()
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body | {"stream": True}, timeout=10) as r:
        r.read()
    httpx.post(gw.v1 + "/chat/completions", json={"model": "nope", "messages": []}, timeout=10)


def promtool_check(text: str) -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (the test command installs Debian's prometheus)"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30, check=False)
    return (result.stdout + result.stderr).strip()


@pytest.fixture(scope="module")
def servers() -> tuple[Server, Server]:
    from tests.conftest import start_engine_sim, start_gateway
    sim = start_engine_sim()
    gw = start_gateway(upstream_env(sim))
    drive_traffic(gw)
    yield gw, sim
    gw.proc.terminate()
    sim.proc.terminate()


def test_the_gateway_exports_exactly_the_documented_metrics(servers) -> None:
    gw, _ = servers
    exported = families(gw.metrics())
    doc = documented("Gateway")
    assert len(doc) >= 13, "the Gateway rows of docs/metrics.md were not found"
    expected = {family_name(n): labels for n, labels in doc.items()}
    assert set(exported) == set(expected)
    for name, labels in expected.items():
        assert exported[name] == labels, name


def test_engine_sim_exports_exactly_the_documented_vllm_metrics(servers) -> None:
    _, sim = servers
    exported = families(httpx.get(sim.url + "/metrics", timeout=5).text)
    doc = documented("engine-sim")
    assert len(doc) >= 10, "the engine-sim rows of docs/metrics.md were not found"
    expected = {family_name(n): labels | {"engine", "model_name"} for n, labels in doc.items()}
    assert set(exported) == set(expected)
    for name, labels in expected.items():
        assert exported[name] == labels, name


def test_promtool_finds_nothing_wrong_with_the_gateway_scrape(servers) -> None:
    gw, _ = servers
    assert promtool_check(gw.metrics()) == ""


def test_promtool_flags_only_the_colons_of_vllm_names_on_engine_sim(servers) -> None:
    """vLLM's names contain ':' (Prometheus reserves it for recording rules); engine-sim must copy
    them exactly, so that lint is expected, and it is the only one."""
    _, sim = servers
    lines = promtool_check(httpx.get(sim.url + "/metrics", timeout=5).text).splitlines()
    assert lines and all(line.endswith("metric names should not contain ':'") for line in lines), lines


def test_the_gateway_relays_the_engines_metrics_on_metrics_engine(servers) -> None:
    """Prometheus scrapes the engine through the gateway's port (the chart keeps the engine port
    closed): /metrics/engine is the engine's own exposition, vLLM's names and labels."""
    gw, sim = servers
    relayed = httpx.get(gw.url + "/metrics/engine", timeout=5)
    assert relayed.status_code == 200
    assert relayed.headers["content-type"].startswith("text/plain")
    assert families(relayed.text) == families(httpx.get(sim.url + "/metrics", timeout=5).text)
    assert not any(name.startswith("chatfleet_") for name in families(relayed.text))


def test_metrics_engine_says_why_when_there_is_nothing_to_relay(gateway, engine_sim) -> None:
    embedded: Server = gateway({})
    r = httpx.get(embedded.url + "/metrics/engine", timeout=5)
    assert r.status_code == 404 and "exports no metrics" in r.json()["error"]["message"]
    sim: Server = engine_sim()
    fronted: Server = gateway(upstream_env(sim))
    sim.proc.terminate()
    r = httpx.get(fronted.url + "/metrics/engine", timeout=10)
    assert r.status_code == 503 and "not reachable" in r.json()["error"]["message"]
