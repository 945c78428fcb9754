"""`chatfleet epp --pool-name`: the pool is an InferencePool's ready pods, as kmock's Kubernetes
API says them (tests/support/kube_api.py), and the picker follows their changes.

The pods are HTTP servers answering ``GET /load`` (tests/support/load_pods.py) on loopback
addresses of their own, 127.0.0.2 and up, all on the pool's one target port: the endpoints the
picker derives (``podIP:targetPort``) are the servers it polls. Every pick is asked for over the
picker's gRPC as Envoy asks (tests/support/epp.py). kmock filters neither by label nor by field,
so the pod outside the selector here reaches the picker, which must leave it out itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import trustme
from grpc_health.v1 import health_pb2

from tests.chart.render import render
from tests.support.epp import EppServer, destination, start_epp
from tests.support.kube_api import KubeApiServer
from tests.support.load_pods import LoadPod, load
from tests.support.procs import free_port, wait_until

NS = "llm"
POOL = "chatfleet"
INFERENCE = "inference.networking.k8s.io"
POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools"
OBJECTIVES = "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferenceobjectives"
INFERENCE_X = "inference.networking.x-k8s.io"
PODS = "/api/v1/namespaces/llm/pods"
SELECTOR = {"app": "chatfleet", "tier": "gpu"}
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}


def pool_object(port: int, labels: dict[str, str] = SELECTOR) -> dict[str, Any]:
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": POOL, "namespace": NS},
            "spec": {"selector": {"matchLabels": labels}, "targetPorts": [{"number": port}],
                     "endpointPickerRef": {"name": "chatfleet-epp", "port": {"number": 9002}}}}


def pod_object(name: str, ip: str, *, ready: bool, labels: dict[str, str] = SELECTOR) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "status": {"phase": "Running", "podIP": ip, "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def readiness(ready: bool) -> dict[str, Any]:
    """The status patch a kubelet makes when the pod's readiness probe flips."""
    return {"status": {"conditions": [{"type": "Initialized", "status": "True"},
                                      {"type": "Ready", "status": "True" if ready else "False"}]}}


@dataclass
class Cluster:
    api: KubeApiServer
    port: int
    pods: dict[str, LoadPod]
    """By pod name; ``a`` and ``b`` ready, ``c`` not, ``other`` ready but outside the selector."""

    def endpoint(self, name: str) -> str:
        return self.pods[name].endpoint

    def add_pod(self, name: str, ip: str, *, ready: bool = True,
                labels: dict[str, str] = SELECTOR) -> None:
        self.pods[name] = LoadPod(ip, self.port)
        self.api.request("POST", PODS, pod_object(name, ip, ready=ready, labels=labels))


RESOURCES = {"v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True),
             "inference.networking.k8s.io/v1/inferencepools": kmock.ResourceInfo(
                 kind="InferencePool", namespaced=True),
             "inference.networking.x-k8s.io/v1alpha2/inferenceobjectives": kmock.ResourceInfo(
                 kind="InferenceObjective", namespaced=True)}


def objective_object(name: str, priority: int | None, pool: str = POOL) -> dict[str, Any]:
    spec: dict[str, Any] = {"poolRef": {"group": INFERENCE, "kind": "InferencePool", "name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


@contextmanager
def populated(api: KubeApiServer) -> Iterator[Cluster]:
    """The pool and its pods put into ``api``; all stopped after."""
    state = Cluster(api, free_port(), {})
    try:
        api.request("POST", POOLS, pool_object(state.port))
        state.add_pod("a", "127.0.0.2")
        state.add_pod("b", "127.0.0.3")
        state.add_pod("c", "127.0.0.4", ready=False)
        state.add_pod("other", "127.0.0.5", labels={"app": "chatfleet", "tier": "cpu"})
        yield state
    finally:
        for pod in state.pods.values():
            pod.close()
        api.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with populated(KubeApiServer(RESOURCES)) as state:
        yield state


def start(cluster: Cluster, *args: str, ready: bool = True) -> EppServer:
    return start_epp(None, args=["--pool-name", POOL, "--pool-namespace", NS, "--kube-api", cluster.api.url,
                                 "--poll-interval", "0.02", "--log-level", "info", *args], ready=ready)


@pytest.fixture
def epp(cluster: Cluster) -> Iterator[EppServer]:
    server = start(cluster)
    yield server
    server.proc.terminate()


def picks(epp: EppServer, n: int) -> list[str | None]:
    """The endpoints of ``n`` picks, None for a refusal."""
    answers = [epp.ask(HEADERS, CHAT) for _ in range(n)]
    return [None if a[-1].HasField("immediate_response") else destination(a) for a in answers]


def eventually(check: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    wait_until(check, timeout=timeout, interval=0.02, message=message)


def test_only_ready_pods_of_the_selector_are_picked(cluster: Cluster, epp: EppServer) -> None:
    """The unready pod and the pod of another selector are idle: picked, were they in the pool."""
    for name in ("c", "other"):
        cluster.pods[name].load = load(0)
    cluster.pods["a"].load, cluster.pods["b"].load = load(3), load(3)
    eventually(lambda: set(picks(epp, 4)) == {cluster.endpoint("a"), cluster.endpoint("b")},
               "both ready pods picked (the loads read)")

    assert set(picks(epp, 12)) <= {cluster.endpoint("a"), cluster.endpoint("b")}


def test_a_pod_that_turns_unready_gets_no_request_after_1_s_and_returns_when_ready(
        cluster: Cluster, epp: EppServer) -> None:
    cluster.pods["a"].load, cluster.pods["b"].load = load(0), load(3)
    eventually(lambda: picks(epp, 1) == [cluster.endpoint("a")], "the idle pod a picked")

    flipped = time.monotonic()
    cluster.api.request("PATCH", f"{PODS}/a", readiness(False))
    seen: list[tuple[float, str | None]] = []
    while time.monotonic() - flipped < 2.0:
        seen.append((time.monotonic() - flipped, picks(epp, 1)[0]))
        time.sleep(0.005)  # pacing: a tight loop would fill pod b's queue between two polls

    last_to_a = max((t for t, endpoint in seen if endpoint == cluster.endpoint("a")), default=0.0)
    assert last_to_a < 1.0, f"pod a was still picked {last_to_a:.3f} s after it turned unready"
    late = {endpoint for t, endpoint in seen if t >= 1.0}
    assert cluster.endpoint("b") in late and cluster.endpoint("a") not in late

    cluster.api.request("PATCH", f"{PODS}/a", readiness(True))
    eventually(lambda: picks(epp, 1) == [cluster.endpoint("a")], "pod a back in the pool")


def test_an_added_pod_gets_requests_and_a_deleted_one_none(cluster: Cluster, epp: EppServer) -> None:
    cluster.pods["a"].load, cluster.pods["b"].load = load(3), load(3)
    cluster.add_pod("d", "127.0.0.6")
    cluster.pods["d"].load = load(0)
    eventually(lambda: picks(epp, 1) == [cluster.endpoint("d")], "the new idle pod d picked")

    cluster.api.request("DELETE", f"{PODS}/d")
    eventually(lambda: cluster.endpoint("d") not in picks(epp, 4), "pod d out of the pool", timeout=1.0)
    assert set(picks(epp, 12)) <= {cluster.endpoint("a"), cluster.endpoint("b")}


def test_a_changed_pool_selector_or_port_is_followed(cluster: Cluster, epp: EppServer) -> None:
    cluster.api.request("PATCH", f"{POOLS}/{POOL}", {"spec": {"selector": {"matchLabels": {"tier": "cpu"}}}})
    eventually(lambda: set(picks(epp, 4)) == {cluster.endpoint("other")}, "the pool is now the cpu pod")

    moved = LoadPod("127.0.0.5", free_port())
    try:
        cluster.api.request("PATCH", f"{POOLS}/{POOL}", {"spec": {"targetPorts": [{"number": moved.server.server_address[1]}]}})
        eventually(lambda: set(picks(epp, 4)) == {moved.endpoint}, "the pool's new target port")
    finally:
        moved.close()


def test_the_pool_keeps_serving_while_the_api_server_is_away_and_catches_up(
        cluster: Cluster, epp: EppServer) -> None:
    # b's slots are all taken: a wins every pick until a poll of a is 4 picks behind.
    cluster.pods["a"].load, cluster.pods["b"].load = load(0), load(4)
    eventually(lambda: picks(epp, 2) == [cluster.endpoint("a")] * 2, "pod a picked, pod b's load read")

    cluster.api.cut()
    cluster.api.request("PATCH", f"{PODS}/a", readiness(False))  # unseen: the picker's watch is cut
    eventually(lambda: "retrying" in epp.proc.log_text(), "the picker's watch failed and is retried")
    assert epp.proc.returncode is None
    assert picks(epp, 1) == [cluster.endpoint("a")], "the last known pool keeps serving"
    assert epp.health("readiness") == health_pb2.HealthCheckResponse.SERVING

    cluster.api.restore()
    eventually(lambda: picks(epp, 1) == [cluster.endpoint("b")], "the change made while away, seen")


def test_a_watch_too_old_to_resume_lists_again(cluster: Cluster, epp: EppServer) -> None:
    def pod_lists() -> int:
        return sum(1 for r in cluster.api.requests() if r.headers.get("User-Agent") == "chatfleet-epp"
                   and r.url.path == PODS and r.params.get("watch") != "true")

    listed = pod_lists()
    cluster.api.expire_next_watch("pods")
    cluster.api.cut()
    cluster.api.request("PATCH", f"{PODS}/c", readiness(True))
    cluster.api.restore()

    eventually(lambda: pod_lists() == listed + 1, "the pods listed again after 410 Expired")
    eventually(lambda: cluster.endpoint("c") in picks(epp, 6), "pod c, ready meanwhile, in the pool")
    assert "410 Gone" in epp.proc.log_text()


def test_not_ready_until_the_pool_is_read(cluster: Cluster) -> None:
    cluster.api.request("DELETE", f"{POOLS}/{POOL}")
    epp = start(cluster, ready=False)
    try:
        eventually(lambda: f"InferencePool {NS}/{POOL} not found" in epp.proc.log_text(), "the pool looked for")
        assert epp.health("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING

        cluster.api.request("POST", POOLS, pool_object(cluster.port))
        eventually(lambda: epp.health("readiness") == health_pb2.HealthCheckResponse.SERVING,
                   "ready once the pool and its pods are listed")
        assert set(picks(epp, 4)) <= {cluster.endpoint("a"), cluster.endpoint("b")}
    finally:
        epp.proc.terminate()


def test_the_charts_role_allows_every_call_the_picker_makes(cluster: Cluster, epp: EppServer) -> None:
    """Lists and watches of pods and of the pool only, each with its selector, every watch
    resumable (a version, bookmarks), and all of it granted by the chart's Role for the picker."""
    cluster.api.request("PATCH", f"{PODS}/c", readiness(True))
    eventually(lambda: cluster.endpoint("c") in picks(epp, 6), "pod c in the pool")

    ours = [r for r in cluster.api.requests() if r.headers.get("User-Agent") == "chatfleet-epp"]
    asked = {(r.resource.group or "", r.resource.plural, "watch" if r.params.get("watch") == "true" else
              "list" if r.name is None else "get") for r in ours if r.resource is not None}
    assert asked == {("", "pods", "list"), ("", "pods", "watch"),
                     (INFERENCE, "inferencepools", "list"), (INFERENCE, "inferencepools", "watch"),
                     (INFERENCE_X, "inferenceobjectives", "list"), (INFERENCE_X, "inferenceobjectives", "watch")}
    (role,) = [d for d in render({"routing.mode": "inferencepool"}, namespace=NS) if d["kind"] == "Role"
               and d["metadata"]["labels"].get("app.kubernetes.io/component") == "endpoint-picker"]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert asked <= granted
    for request in ours:
        if request.url.path == PODS:
            assert request.params["labelSelector"] == "app=chatfleet,tier=gpu"
        elif request.url.path == POOLS:
            assert request.params["fieldSelector"] == f"metadata.name={POOL}"
        if request.params.get("watch") == "true":
            assert request.params["allowWatchBookmarks"] == "true" and request.params["resourceVersion"]


def test_a_sheddable_objective_routes_as_batch_and_tells_the_pod(cluster: Cluster, epp: EppServer) -> None:
    """The pods' batch share is taken and their queues half full: a request whose objective has a
    negative priority is refused as batch; one whose objective is 0 (or names another pool's, or
    none) is routed as interactive. The pick carries the objective's priority to the pod."""
    for name in ("a", "b"):
        cluster.pods[name].load = load(4, running_batch=3, queued_i=4)
    cluster.api.request("POST", OBJECTIVES, objective_object("summaries", -1))
    cluster.api.request("POST", OBJECTIVES, objective_object("chat", None))
    cluster.api.request("POST", OBJECTIVES, objective_object("elsewhere", -5, pool="another-pool"))

    def ask(objective: str) -> Any:
        return epp.ask({**HEADERS, "x-gateway-inference-objective": objective}, CHAT)[-1]

    eventually(lambda: ask("summaries").HasField("immediate_response"), "the objective read")
    assert ask("summaries").immediate_response.status.code == 429
    chat = ask("chat")
    headers = {h.header.key: h.header.raw_value.decode() for h in chat.request_body.response.header_mutation.set_headers}
    assert headers["x-chatfleet-priority"] == "interactive"
    assert headers["x-gateway-destination-endpoint"] in {cluster.endpoint("a"), cluster.endpoint("b")}
    for unknown in ("elsewhere", "nobody"):
        routed = ask(unknown)
        assert routed.HasField("request_body")
        assert "x-chatfleet-priority" not in {h.header.key for h in routed.request_body.response.header_mutation.set_headers}
    # An explicit X-ChatFleet-Priority wins over the objective, as in the gateway.
    explicit = epp.ask({**HEADERS, "x-gateway-inference-objective": "summaries", "x-chatfleet-priority": "interactive"},
                       CHAT)[-1]
    assert explicit.HasField("request_body")

    cluster.api.request("DELETE", f"{OBJECTIVES}/summaries")
    eventually(lambda: ask("summaries").HasField("request_body"), "the deleted objective forgotten")


def test_over_tls_the_api_server_is_checked_against_the_cluster_ca(tmp_path: Path) -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    stranger.cert_pem.write_to_path(str(tmp_path / "other.crt"))
    with populated(KubeApiServer(RESOURCES, ca)) as cluster:
        assert cluster.api.url.startswith("https://")
        wrong = start(cluster, "--kube-ca-file", str(tmp_path / "other.crt"), ready=False)
        try:
            eventually(lambda: "CERTIFICATE_VERIFY_FAILED" in wrong.proc.log_text(), "the certificate refused")
            assert wrong.health("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            wrong.proc.terminate()

        right = start(cluster, "--kube-ca-file", str(tmp_path / "ca.crt"))
        try:
            assert set(picks(right, 4)) <= {cluster.endpoint("a"), cluster.endpoint("b")}
        finally:
            right.proc.terminate()


def test_the_token_is_read_again_when_it_rotates(cluster: Cluster, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    epp = start(cluster, "--kube-token-file", str(token))
    try:
        def tokens() -> set[str]:
            return {r.headers.get("Authorization", "") for r in cluster.api.requests()
                    if r.headers.get("User-Agent") == "chatfleet-epp"}

        assert tokens() == {"Bearer first-token"}
        token.write_text("second-token\n")  # the kubelet's rotation, before the old one expires
        cluster.api.cut()
        cluster.api.restore()
        eventually(lambda: "Bearer second-token" in tokens(), "the resumed watch with the new token")
    finally:
        epp.proc.terminate()


@pytest.mark.parametrize(("args", "says"), [
    ([], "exactly one of --endpoints"),
    (["--endpoints", "127.0.0.1:1", "--pool-name", POOL], "exactly one of --endpoints"),
    (["--pool-name", POOL], "name the API server with --kube-api"),
    (["--pool-name", POOL, "--kube-api", "http://127.0.0.1:1"], "name the InferencePool's namespace"),
    (["--pool-name", POOL, "--pool-namespace", NS, "--kube-api", "127.0.0.1:1"], "not an http(s) URL"),
    (["--pool-name", POOL, "--kube-token-file", __file__], "only with --kube-api"),
    (["--pool-name", POOL, "--pool-namespace", NS, "--kube-api", "https://127.0.0.1:1", "--kube-ca-file",
      __file__], "is not a PEM CA certificate"),
])
def test_a_pool_that_cannot_be_found_is_a_usage_error_saying_what_to_add(args: list[str], says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    done = subprocess.run([sys.executable, "-m", "chatfleet", "epp", "--port", "0", *args], env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 2, done.stderr
    assert says in " ".join(done.stderr.replace("│", " ").split())
