"""The real operator (``chatfleet operator``, kopf, a subprocess) against kmock's Kubernetes API and
a real local HTTP server answering Prometheus' query API with fixed series.

What must hold: in enforce mode exactly the target's floor field is written, by a server-side
apply as the operator's own field manager, with the value the policy computes from what
Prometheus said; in recommend mode nothing but the policy's status (and Events) is written, except
the chart's floor on a target the chart left the field out of; no request ever goes to a Deployment; bad policies end up in their status
while the operator carries on with the good ones; one instance acts (kopf peering).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml
from aiohttp import web

from tests.chart.render import render
from tests.chart.test_operator import rules_granted
from tests.support.crd import problems, status_problems
from tests.support.metrics import documented, families, family_name, value
from tests.support.procs import ManagedProcess, free_port

NS = "llm"
DEPLOYMENT = "chatfleet"
POLICIES = "chatfleet.io/v1alpha1/chatfleetpolicies"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
SCALED_OBJECTS = "keda.sh/v1alpha1/scaledobjects"
DEPLOYMENTS = "apps/v1/deployments"
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
EVENTS = "v1/events"


@dataclass
class FakePrometheus:
    """Answers /api/v1/query_range: demand ``rate`` req/s now, rising by ``slope`` req/s each
    second (never below 0), and ``capacity`` req/s per replica (or nothing) for the capacity
    query; and /api/v1/query: ``cold_start`` seconds (or nothing) for the cold-start query about
    DEPLOYMENT's pods, nothing for other pods. Records every query."""

    rate: float = 10.0
    slope: float = 0.0
    capacity: float | None = None
    cold_start: float | None = None
    fail: bool = False
    """Answer 503, as a Prometheus that is restarting does."""
    queries: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def query_range(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.queries.append(q)
        if self.fail:
            return web.json_response({"status": "error", "errorType": "unavailable",
                                      "error": "restarting"}, status=503)
        start, end, step = float(q["start"]), float(q["end"]), float(q["step"])
        n = int((end - start) // step) + 1
        times = [start + i * step for i in range(n)]
        now = time.time()
        if "namespace_job:chatfleet_requests:rate5m" in q["query"]:
            values: list[float] | None = [max(self.rate + self.slope * (t - now), 0.0)
                                          for t in times]
        elif "chatfleet_requests_total" in q["query"]:
            values = None if self.capacity is None else [self.capacity] * n
        else:
            return web.json_response({"status": "error", "errorType": "bad_data",
                                      "error": "unknown query"}, status=400)
        result = [] if values is None else [
            {"metric": {"namespace": NS, "job": DEPLOYMENT},
             "values": [[t, str(v)] for t, v in zip(times, values, strict=True)]}]
        return web.json_response({"status": "success",
                                  "data": {"resultType": "matrix", "result": result}})

    async def query(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.queries.append(q)
        if self.fail:
            return web.json_response({"status": "error", "errorType": "unavailable",
                                      "error": "restarting"}, status=503)
        if "kube_pod_status_ready_time" not in q["query"]:
            return web.json_response({"status": "error", "errorType": "bad_data",
                                      "error": "unknown query"}, status=400)
        ours = f'pod=~"{DEPLOYMENT}-[a-z0-9]+-[a-z0-9]+"' in q["query"]
        result = [] if self.cold_start is None or not ours else [
            {"metric": {}, "value": [float(q["time"]), str(self.cold_start)]}]
        return web.json_response({"status": "success",
                                  "data": {"resultType": "vector", "result": result}})


@pytest.fixture
async def prometheus() -> AsyncIterator[FakePrometheus]:
    fake = FakePrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query_range", fake.query_range)
    app.router.add_get("/api/v1/query", fake.query)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


def hpa(min_replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": DEPLOYMENT, "namespace": NS},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": DEPLOYMENT},
                     "minReplicas": min_replicas, "maxReplicas": 20,
                     "metrics": [{"type": "Pods", "pods": {
                         "metric": {"name": "chatfleet_queue_depth"},
                         "target": {"type": "AverageValue", "averageValue": "8"}}}]}}


def scaled_object(min_count: int = 1) -> dict[str, Any]:
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": DEPLOYMENT, "namespace": NS},
            "spec": {"scaleTargetRef": {"name": DEPLOYMENT}, "minReplicaCount": min_count,
                     "maxReplicaCount": 20, "triggers": []}}


def policy(name: str, **spec: Any) -> dict[str, Any]:
    """A ChatFleetPolicy; a spec value None leaves the field out."""
    base = {"targetRef": {"kind": "HorizontalPodAutoscaler", "name": DEPLOYMENT},
            "mode": "enforce", "minReplicas": 1, "maxReplicas": 16, "coldStartSeconds": 120,
            "replicaCapacity": 1.0, "targetUtilization": 0.85, "slo": {"ttftSeconds": 2}}
    base.update(spec)
    base = {key: value for key, value in base.items() if value is not None}
    return {"apiVersion": "chatfleet.io/v1alpha1", "kind": "ChatFleetPolicy",
            "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1,
                         "resourceVersion": "1"},
            "spec": base}


class ApiServer(kmock.KubernetesEmulator):
    """kmock, plus what a real API server fills in on create and kopf relies on: a name from
    ``generateName`` (kopf's Events; without it the second Event is a 409) and a ``uid`` (kopf
    keeps each object's timers under its uid)."""

    async def _handle(self, request: kmock.Request) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            meta.setdefault("uid", str(uuid.uuid4()))
        return await super()._handle(request)


@pytest.fixture
async def api() -> AsyncIterator[kmock.KubernetesEmulator]:
    """kmock with the resources the operator discovers, and a Deployment nobody may touch."""
    async with ApiServer() as emulator, kmock.Server(emulator):
        yield declare(emulator)


def declare(emulator: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    emulator.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False)
    emulator.resources[EVENTS] = kmock.ResourceInfo(kind="Event", namespaced=True)
    emulator.resources[POLICIES] = kmock.ResourceInfo(
        kind="ChatFleetPolicy", singular="chatfleetpolicy", namespaced=True,
        subresources={"status"}, verbs={"get", "list", "watch", "patch"})
    emulator.resources[HPAS] = kmock.ResourceInfo(kind="HorizontalPodAutoscaler", namespaced=True)
    emulator.resources[SCALED_OBJECTS] = kmock.ResourceInfo(kind="ScaledObject", namespaced=True)
    emulator.resources[DEPLOYMENTS] = kmock.ResourceInfo(kind="Deployment", namespaced=True)
    emulator.resources[PEERINGS] = kmock.ResourceInfo(kind="ClusterKopfPeering", namespaced=False)
    emulator.objects["v1/namespaces", None, NS] = {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": NS}}
    emulator.objects[DEPLOYMENTS, NS, DEPLOYMENT] = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": NS}, "spec": {"replicas": 3}}
    emulator.objects[PEERINGS, None, "chatfleet-operator"] = {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
        "metadata": {"name": "chatfleet-operator"}, "status": {}}
    return emulator


@dataclass
class Operator:
    proc: ManagedProcess
    metrics_url: str


@pytest.fixture
async def operator(api: kmock.KubernetesEmulator, prometheus: FakePrometheus, tmp_path: Path,
                   chart_rbac: set[tuple[str, str, str]]) -> AsyncIterator[Callable[..., Operator]]:
    """Starts ``chatfleet operator`` (with extra arguments) on kmock when called, after the test
    has put its objects. Afterwards, every request it made must be one the chart's RBAC allows."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(api.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
    started: list[ManagedProcess] = []

    def start(*args: str) -> Operator:
        port = free_port()
        proc = ManagedProcess(
            [sys.executable, "-m", "chatfleet", "operator", "--prometheus-url", prometheus.url,
             "--interval", "0.5", "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
             "--log-level", "info", *args],
            env={"KUBECONFIG": str(kubeconfig)}, name="operator").start()
        started.append(proc)
        return Operator(proc, f"http://127.0.0.1:{port}/metrics")

    yield start
    # In threads: kmock (this event loop) must keep answering kopf's farewell to its peers.
    await asyncio.gather(*(asyncio.to_thread(proc.terminate, 10) for proc in started))
    denied = sorted({f"{verb} {group}/{resource}" for group, resource, verb in
                     (access(r) for r in list(api)) if (group, resource, verb) not in chart_rbac})
    assert denied == [], "the chart's RBAC for the operator would refuse these"


_API_PATH = re.compile(r"^/(?:api|apis/(?P<group>[^/]+))/(?P<version>[^/]+)"
                       r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[^/]+)"
                       r"(?:/(?P<name>[^/]+)(?:/(?P<subresource>[^/]+))?)?$")
_VERBS = {"PATCH": "patch", "POST": "create", "PUT": "update", "DELETE": "delete"}


def access(request: kmock.Request) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) as RBAC sees ``request``; discovery requests,
    which every authenticated user may make, as ("", "", "discovery")."""
    match = _API_PATH.match(request.url.path)
    if match is None:
        return "", "", "discovery"
    resource = match["plural"] + (f"/{match['subresource']}" if match["subresource"] else "")
    method = str(request.method.value if hasattr(request.method, "value") else request.method)
    if method.upper() == "GET":
        verb = "get" if match["name"] else "watch" if request.params.get("watch") else "list"
    else:
        verb = _VERBS[method.upper()]
    return match["group"] or "", resource, verb


@pytest.fixture(scope="module")
def chart_rbac() -> set[tuple[str, str, str]]:
    """What the chart lets the operator do (cluster-wide, with peering), plus discovery."""
    docs = render({"operator.enabled": True, "operator.peering.enabled": True,
                   "operator.replicas": 2, "operator.clusterWide": True})
    return rules_granted(docs) | {("", "", "discovery")}


async def eventually(check: Callable[[], Any], proc: ManagedProcess, timeout: float = 20.0) -> Any:
    """Polls ``check()`` (the event loop keeps serving kmock meanwhile) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if proc.returncode is not None:
            raise AssertionError(f"operator exited {proc.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s; operator log:\n{proc.log_tail(80)}")
        await asyncio.sleep(0.05)


def scrape_when(op: Operator, check: Callable[[str], bool]) -> str | None:
    """The operator's /metrics text if ``check`` holds for it, else None (a blocking GET: the
    operator's metrics server is its own thread, it does not wait on kmock)."""
    text = httpx.get(op.metrics_url, timeout=5).text
    return text if check(text) else None


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON types (kmock keeps objects in mapping types of its own)."""
    return json.loads(json.dumps(obj, default=dict))


def status_of(api: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    status: dict[str, Any] = plain(api.objects[POLICIES, NS, name].get("status") or {})
    return status


def writes(api: kmock.KubernetesEmulator) -> list[kmock.Request]:
    return [r for r in list(api) if str(r.method).upper() not in {"GET", "method.GET"}
            and r.method != kmock.method.GET]


def resource_of(request: kmock.Request) -> str:
    res = request.resource
    return "" if res is None else f"{res.group or ''}/{res.version}/{res.plural}".lstrip("/")


def only_status_or_finalizer(request: kmock.Request) -> bool:
    """A write to a ChatFleetPolicy that touches its status, or kopf's finalizer (kopf keeps one
    on every object with a timer, so it can stop the timer before the object goes)."""
    if isinstance(request.data, list):  # JSON patch
        return all(op["op"] == "test" and op["path"] == "/metadata/resourceVersion"
                   or op["path"].startswith("/metadata/finalizers") for op in request.data)
    return set(request.data) == {"status"} and str(request.url).endswith("/status")


def expected_floor(rate: float, capacity: float, utilization: float = 0.85) -> int:
    return math.ceil(rate / (capacity * utilization) - 1e-9)


def floor_apply(floor: int, kind: str = "HorizontalPodAutoscaler") -> dict[str, Any]:
    """The server-side apply body that owns the floor field and nothing else."""
    api_version, field = (("autoscaling/v2", "minReplicas") if kind == "HorizontalPodAutoscaler"
                          else ("keda.sh/v1alpha1", "minReplicaCount"))
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": DEPLOYMENT},
            "spec": {field: floor}}


def assert_owned_by_the_operator(request: kmock.Request) -> None:
    """A server-side apply as the field manager chatfleet-operator, forced (it takes the field
    over once from whoever set it before: Helm 3, an older operator's merge patch)."""
    assert str(request.method).upper().endswith("PATCH")
    assert request.headers.get("Content-Type") == "application/apply-patch+yaml"
    assert request.params == {"fieldManager": "chatfleet-operator", "force": "true"}


def no_deployment_requests(api: kmock.KubernetesEmulator) -> None:
    touched = [f"{r.method} {r.url}" for r in list(api) if "deployments" in str(r.url)]
    assert touched == [], touched
    assert api.objects[DEPLOYMENTS, NS, DEPLOYMENT]["spec"] == {"replicas": 3}


async def test_enforce_patches_exactly_the_hpa_min_replicas(api, prometheus, operator) -> None:
    prometheus.rate, prometheus.capacity = 10.0, 2.0  # learned capacity: 2 req/s per replica
    api.objects[HPAS, NS, DEPLOYMENT] = hpa(min_replicas=1)
    api.objects[POLICIES, NS, "floor"] = policy("floor")
    op = operator()
    floor = expected_floor(10.0, 2.0)
    assert floor == 6
    await eventually(lambda: api.objects[HPAS, NS, DEPLOYMENT]["spec"]["minReplicas"] == floor,
                     op.proc)
    await eventually(lambda: status_of(api, "floor").get("applied"), op.proc)
    await asyncio.sleep(1.5)  # further ticks: the floor holds, so no further patches

    hpa_writes = [r for r in writes(api) if resource_of(r) == HPAS]
    assert [r.data for r in hpa_writes] == [floor_apply(floor)]
    assert hpa_writes[0].name == DEPLOYMENT and hpa_writes[0].namespace == NS
    assert_owned_by_the_operator(hpa_writes[0])
    spec = api.objects[HPAS, NS, DEPLOYMENT]["spec"]
    assert spec == {**hpa()["spec"], "minReplicas": floor}  # nothing else of the HPA changed
    no_deployment_requests(api)

    status = status_of(api, "floor")
    assert status_problems(status) == [], "the CRD's schema would refuse this status"
    assert status["floor"] == floor and status["targetMinReplicas"] == floor
    assert status["mode"] == "enforce" and status["neededReplicas"] == floor
    assert status["forecastRequestsPerSecond"] == pytest.approx(10.0)
    assert status["replicaCapacity"] == pytest.approx(2.0)
    assert status["inputs"]["job"] == DEPLOYMENT and status["inputs"]["capacitySamples"] >= 5
    assert status["reason"].startswith(f"raised to {floor}") or "kept" in status["reason"]
    assert status["conditions"][0]["status"] == "True"
    # Prometheus was asked about this Deployment (the HPA's scale target) only, and not about its
    # pods' cold start: the policy sets coldStartSeconds.
    assert prometheus.queries and all(f'namespace="{NS}",job="{DEPLOYMENT}"' in q["query"]
                                      for q in prometheus.queries)
    events = [r.data for r in writes(api) if resource_of(r) == EVENTS]
    assert any(e.get("reason") == "FloorSet" and f"floor {floor} (was 1)" in e.get("message", "")
               for e in events), events


async def test_the_cold_start_is_the_policys_else_learned_from_its_pods_else_the_default(
        api, prometheus, operator) -> None:
    """Three policies on one HPA, demand rising 0.01 req/s each second: one sets
    coldStartSeconds (it wins, and the pods' cold start is not even asked for), one leaves it
    to be learned from the Deployment's pods (600 s: the rise is projected 600 s ahead), and one
    reads a job whose pods Prometheus has never seen (the default 120 s)."""
    prometheus.rate, prometheus.slope, prometheus.capacity = 10.0, 0.01, 2.0
    prometheus.cold_start = 600.0
    api.objects[HPAS, NS, DEPLOYMENT] = hpa(min_replicas=1)
    api.objects[POLICIES, NS, "configured"] = policy("configured", mode="recommend")
    learned = policy("learned", mode="recommend", coldStartSeconds=None)
    assert "coldStartSeconds" not in learned["spec"] and problems(learned) == []
    api.objects[POLICIES, NS, "learned"] = learned
    api.objects[POLICIES, NS, "default"] = policy("default", mode="recommend",
                                                  coldStartSeconds=None, job="elsewhere")
    op = operator()
    names = ("configured", "learned", "default")
    await eventually(lambda: all("floor" in status_of(api, n) for n in names), op.proc)

    # forecast = level + slope * cold start: 10 + 0.01 * 120 and 10 + 0.01 * 600 req/s
    expected = {"configured": (120.0, "configured", 11.2), "learned": (600.0, "learned", 16.0),
                "default": (120.0, "default", 11.2)}
    for name, (seconds, source, forecast) in expected.items():
        status = status_of(api, name)
        assert status_problems(status) == [], "the CRD's schema would refuse this status"
        assert (status["inputs"]["coldStartSeconds"], status["inputs"]["coldStartSource"]) == (
            seconds, source), name
        # (less up to 0.15: the last 15 s step may end just before now)
        assert status["forecastRequestsPerSecond"] == pytest.approx(forecast, abs=0.2), name
        assert status["floor"] == expected_floor(forecast, 2.0), name
        assert f"in {seconds:.0f} s" in status["reason"], status["reason"]
    assert status_of(api, "learned")["floor"] == 10 > status_of(api, "configured")["floor"] == 7

    cold_start_queries = [q["query"] for q in prometheus.queries
                          if "kube_pod_status_ready_time" in q["query"]]
    assert any(f'pod=~"{DEPLOYMENT}-[a-z0-9]+-[a-z0-9]+"' in q for q in cold_start_queries)
    assert any('pod=~"elsewhere-[a-z0-9]+-[a-z0-9]+"' in q for q in cold_start_queries)
    assert all(f'namespace="{NS}"' in q and "kube_pod_created" in q for q in cold_start_queries)
    assert api.objects[HPAS, NS, DEPLOYMENT]["spec"] == hpa()["spec"]
    no_deployment_requests(api)


async def test_enforce_patches_a_scaled_objects_min_replica_count(api, prometheus,
                                                                  operator) -> None:
    prometheus.rate, prometheus.capacity = 4.0, None  # nothing learned: the configured 1 req/s
    api.objects[SCALED_OBJECTS, NS, DEPLOYMENT] = scaled_object(min_count=2)
    api.objects[POLICIES, NS, "keda"] = policy(
        "keda", targetRef={"kind": "ScaledObject", "name": DEPLOYMENT})
    op = operator()
    floor = expected_floor(4.0, 1.0)
    await eventually(
        lambda: api.objects[SCALED_OBJECTS, NS, DEPLOYMENT]["spec"]["minReplicaCount"] == floor,
        op.proc)
    await eventually(lambda: status_of(api, "keda").get("applied"), op.proc)
    so_writes = [r for r in writes(api) if resource_of(r) == SCALED_OBJECTS]
    assert [r.data for r in so_writes] == [floor_apply(floor, "ScaledObject")]
    assert_owned_by_the_operator(so_writes[0])
    assert not [r for r in list(api) if resource_of(r) == HPAS]
    no_deployment_requests(api)
    assert status_of(api, "keda")["replicaCapacity"] == pytest.approx(1.0)


async def test_recommend_mode_writes_only_the_status(api, prometheus, operator) -> None:
    prometheus.rate, prometheus.capacity = 10.0, 2.0
    api.objects[HPAS, NS, DEPLOYMENT] = hpa(min_replicas=1)
    api.objects[POLICIES, NS, "watch"] = policy("watch", mode="recommend")
    op = operator()
    await eventually(lambda: status_of(api, "watch").get("floor") == 6, op.proc)
    await asyncio.sleep(1.5)  # several more ticks

    assert api.objects[HPAS, NS, DEPLOYMENT]["spec"] == hpa()["spec"]
    allowed = {POLICIES, EVENTS, PEERINGS}
    stray = [f"{r.method} {r.url}" for r in writes(api) if resource_of(r) not in allowed]
    assert stray == []
    policy_writes = [r for r in writes(api) if resource_of(r) == POLICIES]
    assert policy_writes and all(only_status_or_finalizer(r) for r in policy_writes)
    assert any(str(r.url).endswith("/watch/status") for r in policy_writes)
    status = status_of(api, "watch")
    assert status["applied"] is False and status["targetMinReplicas"] == 1
    assert status["conditions"][0]["reason"] == "Recommended"
    events = [r.data for r in writes(api) if resource_of(r) == EVENTS]
    assert any(e.get("reason") == "FloorRecommended" and "recommends" in e.get("message", "")
               for e in events), events
    no_deployment_requests(api)


def put_the_charts_objects(api: kmock.KubernetesEmulator, mode: str, kind: str,
                           field: str) -> tuple[str, str]:
    """Puts the chart's autoscaler (``mode``, floor 3) and its own ChatFleetPolicy, as rendered with
    the operator on, into kmock; returns the autoscaler's resource and the policy's name."""
    docs = render({"operator.enabled": True, "autoscaling.mode": mode, "autoscaling.minReplicas": 3,
                   "autoscaling.maxReplicas": 8, "knowledgeBase.store": "pgvector",
                   "knowledgeBase.pgvector.existingSecret": "pg"}, release=DEPLOYMENT, namespace=NS)
    (target,) = [d for d in docs if d["kind"] == kind]
    (chart_policy,) = [d for d in docs if d["kind"] == "ChatFleetPolicy"]
    assert field not in target["spec"]
    assert target["metadata"]["annotations"]["chatfleet.io/chart-floor"] == "3"
    assert chart_policy["spec"]["mode"] == "recommend" and problems(chart_policy) == []
    resource = HPAS if mode == "hpa" else SCALED_OBJECTS
    api.objects[resource, NS, target["metadata"]["name"]] = target
    # What the API server adds on create (kopf keeps its timers under the uid).
    chart_policy["metadata"].update(uid=str(uuid.uuid4()), generation=1, resourceVersion="1")
    api.objects[POLICIES, NS, chart_policy["metadata"]["name"]] = chart_policy
    return resource, chart_policy["metadata"]["name"]


@pytest.mark.parametrize(("mode", "kind", "field"), [
    ("hpa", "HorizontalPodAutoscaler", "minReplicas"),
    ("keda", "ScaledObject", "minReplicaCount"),
])
async def test_the_charts_own_policy_holds_the_floor_the_chart_left_and_starts_there(
        api, prometheus, operator, mode: str, kind: str, field: str) -> None:
    """The chart with the operator on, as rendered: the HPA / ScaledObject has no floor field, only
    the chart's floor as an annotation, and the chart's own ChatFleetPolicy names it in recommend
    mode, with the chart's bounds. The operator writes that floor (and only that field, as its own
    field manager) from its first tick, and keeps it while the demand (1 req/s, one replica's
    worth) would need less."""
    prometheus.rate, prometheus.capacity = 1.0, 2.0
    resource, name = put_the_charts_objects(api, mode, kind, field)
    op = operator()
    await eventually(lambda: api.objects[resource, NS, DEPLOYMENT]["spec"].get(field) == 3, op.proc)
    await eventually(lambda: status_of(api, name).get("targetMinReplicas") == 3, op.proc)
    await asyncio.sleep(1.0)  # two more ticks: the floor holds, no further writes
    target_writes = [r for r in writes(api) if resource_of(r) == resource]
    assert [r.data for r in target_writes] == [floor_apply(3, kind)]
    assert_owned_by_the_operator(target_writes[0])
    status = status_of(api, name)
    assert status["applied"] is False and status["neededReplicas"] == 1
    assert status["floor"] == 3 and "held at minReplicas 3" in status["reason"], status["reason"]
    no_deployment_requests(api)


async def test_the_charts_floor_is_held_while_prometheus_cannot_be_read(api, prometheus,
                                                                        operator) -> None:
    """A wrong operator.prometheusUrl (or Prometheus down) at install: the chart's floor needs
    nothing from Prometheus, so the ScaledObject is not left at KEDA's 0 meanwhile."""
    prometheus.fail = True
    resource, name = put_the_charts_objects(api, "keda", "ScaledObject", "minReplicaCount")
    op = operator()
    await eventually(lambda: api.objects[resource, NS, DEPLOYMENT]["spec"].get("minReplicaCount")
                     == 3, op.proc)
    await eventually(lambda: status_of(api, name).get("conditions"), op.proc)
    assert status_of(api, name)["conditions"][0]["reason"] == "PrometheusUnavailable"
    assert [r.data for r in writes(api) if resource_of(r) == resource] == [
        floor_apply(3, "ScaledObject")]


async def test_a_chart_left_floor_is_held_at_the_charts_value_and_the_policy_starts_there(
        api, prometheus, operator) -> None:
    """The chart with the operator on: the rendered HPA has no minReplicas, only the chart's floor
    as an annotation. A policy of one's own (minReplicas 1, below the chart's floor) in recommend mode makes the operator write that floor (and only
    that field, as its own field manager); its hysteresis starts there, so the low demand (1
    req/s, one replica's worth) does not lower it on the first tick."""
    prometheus.rate, prometheus.capacity = 1.0, 2.0
    docs = render({"operator.enabled": True, "autoscaling.minReplicas": 3})
    rendered = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert "minReplicas" not in rendered["spec"]
    assert rendered["metadata"]["annotations"]["chatfleet.io/chart-floor"] == "3"
    chart_hpa = hpa()
    del chart_hpa["spec"]["minReplicas"]
    chart_hpa["metadata"]["annotations"] = {"chatfleet.io/chart-floor": "3"}
    api.objects[HPAS, NS, DEPLOYMENT] = chart_hpa
    api.objects[POLICIES, NS, "watch"] = policy("watch", mode="recommend")
    op = operator()
    await eventually(lambda: api.objects[HPAS, NS, DEPLOYMENT]["spec"].get("minReplicas") == 3,
                     op.proc)
    await eventually(lambda: status_of(api, "watch").get("targetMinReplicas") == 3, op.proc)
    await asyncio.sleep(1.0)  # two more ticks: the floor holds, no further writes
    hpa_writes = [r for r in writes(api) if resource_of(r) == HPAS]
    assert [r.data for r in hpa_writes] == [floor_apply(3)]
    assert_owned_by_the_operator(hpa_writes[0])
    status = status_of(api, "watch")
    assert status["applied"] is False and status["neededReplicas"] == 1
    assert status["floor"] == 3 and status["reason"].startswith("kept at 3"), status["reason"]
    no_deployment_requests(api)


async def test_bad_policies_are_reported_in_status_and_the_good_one_still_acts(
        api, prometheus, operator) -> None:
    prometheus.rate, prometheus.capacity = 3.0, None
    api.objects[HPAS, NS, DEPLOYMENT] = hpa(min_replicas=1)
    api.objects[POLICIES, NS, "inverted"] = policy("inverted", minReplicas=8, maxReplicas=2)
    api.objects[POLICIES, NS, "unknown-kind"] = policy(
        "unknown-kind", targetRef={"kind": "Deployment", "name": DEPLOYMENT})
    api.objects[POLICIES, NS, "missing"] = policy(
        "missing", targetRef={"kind": "HorizontalPodAutoscaler", "name": "nope"})
    api.objects[POLICIES, NS, "odd-slo"] = policy("odd-slo", slo={"ttftSeconds": 1.7})
    no_target = policy("no-target")
    del no_target["spec"]["targetRef"]
    api.objects[POLICIES, NS, "no-target"] = no_target
    api.objects[POLICIES, NS, "good"] = policy("good")
    op = operator()
    bad = ("inverted", "unknown-kind", "missing", "odd-slo", "no-target")

    def conditions() -> dict[str, tuple[str, str]] | None:
        got = {}
        for name in bad:
            ready = (status_of(api, name).get("conditions") or [{}])[0]
            got[name] = (ready.get("status"), ready.get("reason"))
        return got if all(reason for _, reason in got.values()) else None

    got = await eventually(conditions, op.proc)
    assert got == {"inverted": ("False", "InvalidPolicy"),
                   "unknown-kind": ("False", "InvalidPolicy"),
                   "missing": ("False", "TargetNotFound"),
                   "odd-slo": ("False", "InvalidPolicy"),
                   "no-target": ("False", "InvalidPolicy")}
    assert "min_replicas (8) <= max_replicas (2)" in status_of(api, "inverted")["reason"]
    assert "'Deployment' is not one of" in status_of(api, "unknown-kind")["reason"]
    assert "nope does not exist" in status_of(api, "missing")["reason"]
    assert "not a bound of the TTFT histogram" in status_of(api, "odd-slo")["reason"]
    assert "spec.targetRef is missing" in status_of(api, "no-target")["reason"]
    assert all("floor" not in status_of(api, name) for name in bad)
    assert [status_problems(status_of(api, name)) for name in bad] == [[]] * len(bad)
    # Three of them the CRD refuses; the operator reports them all the same: objects stored under
    # an older CRD, or by an API server without CEL rules (before Kubernetes 1.25). The other two
    # only the operator can see: a target that does not exist, a TTFT bound that is no bucket.
    refused = {name for name in bad if problems({**plain(api.objects[POLICIES, NS, name]),
                                                 "status": {}})}
    assert refused == {"inverted", "unknown-kind", "no-target"}
    assert problems(policy("good")) == []
    await eventually(lambda: api.objects[HPAS, NS, DEPLOYMENT]["spec"]["minReplicas"]
                     == expected_floor(3.0, 1.0), op.proc)
    assert op.proc.returncode is None

    def warned() -> set[str]:
        return {r.data["involvedObject"]["name"] for r in writes(api)
                if resource_of(r) == EVENTS and r.data.get("type") == "Warning"}
    await eventually(lambda: warned() == set(bad), op.proc)
    no_deployment_requests(api)


async def test_peering_metrics_and_prometheus_outage(api, prometheus, operator) -> None:
    """kopf peering announces the instance; /metrics has exactly the documented operator
    names; a Prometheus error changes nothing and is reported."""
    prometheus.rate, prometheus.capacity = 10.0, 2.0
    api.objects[HPAS, NS, DEPLOYMENT] = hpa(min_replicas=1)
    api.objects[POLICIES, NS, "floor"] = policy("floor")
    op = operator()
    await eventually(lambda: api.objects[HPAS, NS, DEPLOYMENT]["spec"]["minReplicas"] == 6, op.proc)
    peering = api.objects[PEERINGS, None, "chatfleet-operator"]
    assert peering.get("status"), "kopf did not announce itself in the peering object"

    labels = {"policy_namespace": NS, "policy": "floor"}
    text = await eventually(lambda: scrape_when(
        op, lambda t: value(t, "chatfleet_operator_floor", **labels) == 6), op.proc)
    doc = {family_name(name): labels for name, labels in documented("Operator").items()}
    assert len(doc) >= 6, "the Operator rows of docs/metrics.md were not found"
    assert families(text) == doc
    assert value(text, "chatfleet_operator_floor_patches_total", **labels) == 1

    prometheus.rate = 30.0  # Prometheus goes down just as demand triples: the floor must hold
    prometheus.fail = True
    hpa_writes = len([r for r in writes(api) if resource_of(r) == HPAS])
    await eventually(lambda: (status_of(api, "floor").get("conditions") or [{}])[0].get("reason")
                     == "PrometheusUnavailable", op.proc)
    await asyncio.sleep(1.0)  # two more failing ticks
    status = status_of(api, "floor")
    assert status["conditions"][0]["status"] == "False" and "503" in status["reason"]
    assert status["floor"] == 6  # the last decision stays on record
    assert api.objects[HPAS, NS, DEPLOYMENT]["spec"]["minReplicas"] == 6
    assert len([r for r in writes(api) if resource_of(r) == HPAS]) == hpa_writes
    text = scrape_when(op, lambda _: True)
    assert value(text, "chatfleet_operator_ticks_total", **labels, outcome="prometheus_error") >= 2
    assert value(text, "chatfleet_operator_floor_patches_total", **labels) == 1

    def warnings() -> list[str]:
        return [r.data["reason"] for r in writes(api)
                if resource_of(r) == EVENTS and r.data.get("type") == "Warning"]
    await eventually(warnings, op.proc)
    assert warnings() == ["PrometheusUnavailable"]  # once, not once per failing tick
    no_deployment_requests(api)


async def test_of_two_peers_only_the_higher_priority_one_acts(api, prometheus, operator) -> None:
    """Two replicas behind one ClusterKopfPeering: the one with the higher priority acts, the
    other stands by (kopf pauses its timers) and says so."""
    prometheus.rate, prometheus.capacity = 10.0, 2.0
    api.objects[HPAS, NS, DEPLOYMENT] = hpa(min_replicas=1)
    api.objects[POLICIES, NS, "floor"] = policy("floor")
    low = operator("--priority", "10")
    await eventually(lambda: api.objects[HPAS, NS, DEPLOYMENT]["spec"]["minReplicas"] == 6, low.proc)
    high = operator("--priority", "20")
    await eventually(lambda: "Pausing operations in favour of" in low.proc.log_text(), low.proc)

    def ticks(op: Operator) -> float:
        return value(scrape_when(op, lambda _: True) or "", "chatfleet_operator_ticks_total")
    await eventually(lambda: ticks(high) >= 1, high.proc)
    await asyncio.sleep(0.5)  # a tick under way when the pause came may still finish
    standing_by, acting = ticks(low), ticks(high)
    await asyncio.sleep(1.5)  # three ticks' worth
    assert ticks(low) == standing_by
    assert ticks(high) >= acting + 2
    peers = api.objects[PEERINGS, None, "chatfleet-operator"]["status"]
    assert sorted(p["priority"] for p in peers.values()) == [10, 20]
    assert [r.data for r in writes(api) if resource_of(r) == HPAS] == [floor_apply(6)]
    no_deployment_requests(api)
