"""routing.mode (docs/operations.md#routing-between-pods): `service` (the default) renders no
routing object; `inferencepool` renders an InferencePool of the gateway pods, the endpoint picker
(`chatfleet epp`) that pool names, its read-only RBAC, NetworkPolicies that let the picker poll
each pod's GET /load, and on request an HTTPRoute to the pool. Names, ports and labels must agree
across the objects, as the API server, the proxy and the kubelet would follow them."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from chatfleet.cli import app
from tests.chart.render import CHART, ROOT, by_kind, helm, lint_and_render_file, notes, one, render, set_args
from tests.chart.test_chart import INFERENCEPOOL, INFERENCEPOOL_FULL
from tests.support.crd import openapi_schema, problems

CRDS = ROOT / "tests" / "fixtures" / "crds"
CRD_SCHEMAS: dict[tuple[str, str], Path] = {
    ("inference.networking.k8s.io/v1", "InferencePool"):
        CRDS / "inferencepools.inference.networking.k8s.io-v1.6.0.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): CRDS / "httproutes.gateway.networking.k8s.io-v1.6.1.yaml",
}
"""Kinds whose CRDs the Gateway implementation installs (never this chart), vendored for tests."""

ROUTE = {**INFERENCEPOOL, "routing.httpRoute.enabled": True, "routing.httpRoute.gatewayName": "inference-gateway"}
EXAMPLE_VALUES = ROOT / "examples" / "values-inferencepool.yaml"


@cache
def _schema(path: Path) -> dict[str, Any]:
    return openapi_schema(path)


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """Why an API server with the vendored CRD would refuse ``doc``; empty when it would store it."""
    return problems(doc, _schema(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]))


def picker_objects(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return by_kind([d for d in docs
                    if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "endpoint-picker"])


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(docs).get(kind, []) if d["metadata"]["name"] == name]
    return doc


def pod_template(deployment: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    template = deployment["spec"]["template"]
    return template["metadata"]["labels"], template["spec"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def container_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def flags(container: dict[str, Any]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"][1:])


def _port_matches(rule_port: dict[str, Any], port: int, port_name: str | None) -> bool:
    return rule_port["port"] in (port, port_name)


def _peer_matches(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    """A same-namespace pod with ``labels`` against one NetworkPolicyPeer."""
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return False
    return selects(peer["podSelector"].get("matchLabels", {}), labels)


def admits(policy: dict[str, Any], direction: str, peer_labels: dict[str, str], port: int,
           port_name: str | None = None) -> bool:
    """Whether ``policy`` lets traffic to (``egress``) or from (``ingress``) a pod of the same
    namespace with ``peer_labels`` through, on ``port`` (named ``port_name`` on the receiving
    pod): NetworkPolicy's rules for podSelector peers (no peers or no ports: all)."""
    peers_key = "from" if direction == "ingress" else "to"
    for rule in policy["spec"].get(direction, []):
        peers = rule.get(peers_key)
        ports = rule.get("ports")
        if (peers is None or any(_peer_matches(p, peer_labels) for p in peers)) and \
                (ports is None or any(_port_matches(p, port, port_name) for p in ports)):
            return True
    return False


def test_service_mode_renders_no_routing_object() -> None:
    """The default is today's chart: k8s/ (rendered before routing existed, kept equal to the chart
    by test_k8s.py) shows the defaults render the same objects; here, nothing of the picker."""
    for docs in (render(), render({"routing.mode": "service", **{k: v for k, v in ROUTE.items()
                                                              if k != "routing.mode"}})):
        kinds = by_kind(docs)
        assert "InferencePool" not in kinds and "HTTPRoute" not in kinds
        assert picker_objects(docs) == {}
        assert not any("epp" in d["metadata"]["name"] for d in docs)
        (gateway_policy,) = kinds["NetworkPolicy"]
        assert len(gateway_policy["spec"]["ingress"]) == 1


@pytest.mark.parametrize("gateway_port", [8000, 8080])
def test_the_pool_is_exactly_the_gateway_pods_on_their_port(gateway_port: int) -> None:
    docs = render({**INFERENCEPOOL, "gateway.port": gateway_port, "operator.enabled": True})
    pool = one(docs, "InferencePool")
    assert pool["metadata"]["name"] == "chatfleet" and pool["metadata"]["namespace"] == "llm"
    selector = pool["spec"]["selector"]["matchLabels"]
    gateway_labels, gateway_pod = pod_template(named(docs, "Deployment", "chatfleet"))
    assert selects(selector, gateway_labels)
    gateway = next(c for c in gateway_pod["containers"] if c["name"] == "gateway")
    assert pool["spec"]["targetPorts"] == [{"number": container_port(gateway, "http")}]
    assert container_port(gateway, "http") == gateway_port
    others = [pod_template(named(docs, "Deployment", name))[0] for name in ("chatfleet-epp", "chatfleet-operator")]
    others.append(one(docs, "Pod")["metadata"]["labels"])  # the helm test pod
    for labels in others:
        assert not selects(selector, labels), labels


def test_the_pools_endpoint_picker_is_the_picker_service_and_its_pods() -> None:
    docs = render(INFERENCEPOOL, namespace="team-a")
    pool = one(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    service = named(docs, "Service", ref["name"])
    assert (ref["group"], ref["kind"]) == ("", "Service")
    assert ref["failureMode"] == "FailOpen", "docs/operations.md#routing-between-pods says why"
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == ref["port"]["number"] == 9002
    assert (service_port["name"], service_port["appProtocol"]) == ("grpc", "http2")
    labels, pod = pod_template(named(docs, "Deployment", ref["name"]))
    assert selects(service["spec"]["selector"], labels)
    (container,) = pod["containers"]
    assert container_port(container, service_port["targetPort"]) == 9002
    args = flags(container)
    assert container["args"][0] == "epp"
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-namespace"] == "team-a"
    assert args["port"] == "9002" and args["metrics-port"] == str(container_port(container, "metrics"))
    for probe, service_name in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        assert container[probe]["grpc"] == {"port": 9002, "service": service_name}
    gateway_image = pod_template(named(docs, "Deployment", "chatfleet"))[1]["containers"][0]["image"]
    assert container["image"] == gateway_image
    (monitor,) = picker_objects(docs)["PodMonitor"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], labels)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_ports_and_failure_mode_follow_the_values() -> None:
    docs = render({**INFERENCEPOOL, "routing.epp.port": 9100, "routing.epp.metrics.port": 9191,
                   "routing.epp.failureMode": "FailClose", "routing.epp.extraArgs": ["--prefix-chars=256"]})
    ref = one(docs, "InferencePool")["spec"]["endpointPickerRef"]
    assert ref["port"] == {"number": 9100} and ref["failureMode"] == "FailClose"
    assert named(docs, "Service", "chatfleet-epp")["spec"]["ports"][0]["port"] == 9100
    (container,) = pod_template(named(docs, "Deployment", "chatfleet-epp"))[1]["containers"]
    args = flags(container)
    assert (args["port"], args["metrics-port"], args["prefix-chars"]) == ("9100", "9191", "256")
    assert container["readinessProbe"]["grpc"]["port"] == 9100


def test_no_gateway_selector_picks_up_the_picker_pods() -> None:
    docs = render(INFERENCEPOOL)
    labels, _ = pod_template(named(docs, "Deployment", "chatfleet-epp"))
    assert not selects(named(docs, "Service", "chatfleet")["spec"]["selector"], labels)
    assert not selects(named(docs, "PodDisruptionBudget", "chatfleet")["spec"]["selector"]["matchLabels"], labels)
    assert not selects(one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"], labels)
    assert not selects(named(docs, "NetworkPolicy", "chatfleet")["spec"]["podSelector"]["matchLabels"], labels)


def test_the_picker_may_only_read_pods_inferencepools_and_inferenceobjectives_in_its_namespace() -> None:
    docs = render(INFERENCEPOOL, namespace="team-a")
    objects = picker_objects(docs)
    assert "ClusterRole" not in objects and "ClusterRoleBinding" not in objects
    (role,) = objects["Role"]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    assert granted == {(group, resource, verb) for group, resource in
                       (("", "pods"), ("inference.networking.k8s.io", "inferencepools"),
                        ("inference.networking.x-k8s.io", "inferenceobjectives"))
                       for verb in ("get", "list", "watch")}
    (binding,) = objects["RoleBinding"]
    (account,) = objects["ServiceAccount"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "team-a"}]
    assert {o["metadata"]["namespace"] for o in (role, binding, account)} == {"team-a"}
    _, pod = pod_template(named(docs, "Deployment", "chatfleet-epp"))
    assert pod["serviceAccountName"] == account["metadata"]["name"] and pod["automountServiceAccountToken"]
    gateway_pod = pod_template(named(docs, "Deployment", "chatfleet"))[1]
    assert gateway_pod["automountServiceAccountToken"] is False, "the gateway pods stay token-less"


@pytest.mark.parametrize("values", [INFERENCEPOOL, INFERENCEPOOL_FULL], ids=["open-peers", "restricted-peers"])
def test_network_policies_let_the_picker_poll_each_gateway_and_nothing_else(values: dict[str, Any]) -> None:
    docs = render(values)
    epp_labels, epp_pod = pod_template(named(docs, "Deployment", "chatfleet-epp"))
    gateway_labels, gateway_pod = pod_template(named(docs, "Deployment", "chatfleet"))
    gateway_policy = named(docs, "NetworkPolicy", "chatfleet")
    epp_policy = named(docs, "NetworkPolicy", "chatfleet-epp")
    assert selects(gateway_policy["spec"]["podSelector"]["matchLabels"], gateway_labels)
    assert selects(epp_policy["spec"]["podSelector"]["matchLabels"], epp_labels)
    assert epp_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ports = {p["name"]: p["containerPort"] for c in gateway_pod["containers"] for p in c.get("ports", [])}
    # EPP -> gateway:8000 (GET /load): out of the picker, into the gateway pods.
    assert admits(epp_policy, "egress", gateway_labels, ports["http"])
    assert admits(gateway_policy, "ingress", epp_labels, ports["http"], "http")
    # EPP -> the engine's /metrics (its KV-cache usage): the one peer that reaches that port.
    assert admits(epp_policy, "egress", gateway_labels, ports["engine"])
    assert admits(gateway_policy, "ingress", epp_labels, ports["engine"], "engine")
    assert not admits(gateway_policy, "ingress", {"app": "any-other-pod"}, ports["engine"], "engine")
    assert not admits(epp_policy, "egress", {"app": "any-other-pod"}, ports["http"])
    assert not admits(epp_policy, "egress", gateway_labels, 9999)
    # The Kubernetes API server, on its ports only.
    api_rules = [r for r in epp_policy["spec"]["egress"] if "to" not in r]
    assert [[p["port"] for p in r["ports"]] for r in api_rules] == [[443, 6443]]
    # Into the picker: ext_proc and /metrics only, ext_proc from the configured peers.
    (container,) = epp_pod["containers"]
    rules = {tuple(p["port"] for p in r["ports"]): r for r in epp_policy["spec"]["ingress"]}
    assert set(rules) == {("grpc",), ("metrics",)}
    assert {p["name"] for p in container["ports"]} == {"grpc", "metrics"}
    assert rules[("grpc",)].get("from") == values.get("routing.epp.networkPolicy.from")


def test_without_engine_metrics_the_engine_port_stays_closed() -> None:
    docs = render({**INFERENCEPOOL, "routing.epp.engineMetrics": False})
    epp_labels, epp_pod = pod_template(named(docs, "Deployment", "chatfleet-epp"))
    gateway_labels, _ = pod_template(named(docs, "Deployment", "chatfleet"))
    assert "engine-metrics-port" not in flags(epp_pod["containers"][0])
    assert not admits(named(docs, "NetworkPolicy", "chatfleet"), "ingress", epp_labels, 8001, "engine")
    assert not admits(named(docs, "NetworkPolicy", "chatfleet-epp"), "egress", gateway_labels, 8001)
    engine = render({**INFERENCEPOOL, "engine.port": 8101})
    (container,) = pod_template(named(engine, "Deployment", "chatfleet-epp"))[1]["containers"]
    assert flags(container)["engine-metrics-port"] == "8101"


def test_the_api_server_can_be_named() -> None:
    peer = {"ipBlock": {"cidr": "10.0.0.1/32"}}
    docs = render({**INFERENCEPOOL, "routing.epp.networkPolicy.apiServer": [peer],
                   "routing.epp.networkPolicy.apiServerPorts": [6443],
                   "routing.epp.networkPolicy.metricsFrom": [{"namespaceSelector": {}}]})
    policy = named(docs, "NetworkPolicy", "chatfleet-epp")
    assert {"to": [peer], "ports": [{"port": 6443, "protocol": "TCP"}]} in policy["spec"]["egress"]
    metrics_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics")
    assert metrics_rule["from"] == [{"namespaceSelector": {}}]


def test_the_picker_pod_runs_locked_down_like_the_gateway() -> None:
    docs = render(INFERENCEPOOL)
    _, pod = pod_template(named(docs, "Deployment", "chatfleet-epp"))
    _, gateway_pod = pod_template(named(docs, "Deployment", "chatfleet"))
    assert pod["securityContext"] == gateway_pod["securityContext"]
    (container,) = pod["containers"]
    gateway = next(c for c in gateway_pod["containers"] if c["name"] == "gateway")
    assert container["securityContext"] == gateway["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert "cpu" not in container["resources"]["limits"], "a CPU limit would throttle every pick"
    strategy = named(docs, "Deployment", "chatfleet-epp")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize(("replicas", "pdb_enabled", "expected"), [(1, True, False), (2, True, True), (3, False, False)])
def test_more_than_one_picker_gets_a_disruption_budget(replicas: int, pdb_enabled: bool, expected: bool) -> None:
    docs = render({**INFERENCEPOOL, "routing.epp.replicas": replicas, "podDisruptionBudget.enabled": pdb_enabled})
    assert named(docs, "Deployment", "chatfleet-epp")["spec"]["replicas"] == replicas
    budgets = picker_objects(docs).get("PodDisruptionBudget", [])
    assert bool(budgets) == expected
    if budgets:
        labels, _ = pod_template(named(docs, "Deployment", "chatfleet-epp"))
        assert budgets[0]["spec"]["maxUnavailable"] == 1
        assert selects(budgets[0]["spec"]["selector"]["matchLabels"], labels)


def test_the_pod_monitor_and_network_policy_follow_their_switches() -> None:
    docs = render({**INFERENCEPOOL, "routing.epp.metrics.podMonitor.enabled": False,
                   "networkPolicy.enabled": False})
    objects = picker_objects(docs)
    assert "PodMonitor" not in objects and "NetworkPolicy" not in objects and "NetworkPolicy" not in by_kind(docs)
    assert "Deployment" in objects and "Service" in objects


def test_the_http_route_sends_everything_to_the_pool_only_when_asked() -> None:
    assert "HTTPRoute" not in by_kind(render(INFERENCEPOOL))
    docs = render({**ROUTE, "routing.httpRoute.gatewayNamespace": "gateways",
                   "routing.httpRoute.hostnames": ["chat.example.com"]})
    route = one(docs, "HTTPRoute")
    pool = one(docs, "InferencePool")
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "inference-gateway", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["chat.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["timeouts"] == {"request": "600s"}
    no_timeout = one(render({**ROUTE, "routing.httpRoute.requestTimeout": ""}), "HTTPRoute")
    assert "timeouts" not in no_timeout["spec"]["rules"][0]


def test_the_routing_objects_pass_their_crds_and_the_check_can_fail() -> None:
    docs = render({**ROUTE, "routing.httpRoute.hostnames": ["chat.example.com"]})
    pool, route = one(docs, "InferencePool"), one(docs, "HTTPRoute")
    assert crd_problems(pool) == [] and crd_problems(route) == []
    no_port = copy.deepcopy(pool)
    del no_port["spec"]["endpointPickerRef"]["port"]
    assert crd_problems(no_port) == [
        "<root>.spec.endpointPickerRef: port is required when kind is 'Service' or unspecified "
        "(defaults to 'Service')"]
    twice = copy.deepcopy(pool)
    twice["spec"]["targetPorts"] *= 2
    assert crd_problems(twice) == ["<root>.spec.targetPorts: port number must be unique"]
    double_slash = copy.deepcopy(route)
    double_slash["spec"]["rules"][0]["matches"][0]["path"]["value"] = "/v1//chat"
    assert len(crd_problems(double_slash)) == 1
    unknown = copy.deepcopy(route)
    unknown["spec"]["rules"][0]["backendRefs"][0]["namespaceSelector"] = {}
    assert len(crd_problems(unknown)) == 1


def test_the_vendored_crds_are_the_ones_the_objects_name() -> None:
    for (api_version, kind), path in CRD_SCHEMAS.items():
        crd = yaml.safe_load(path.read_text())
        group, version = api_version.split("/")
        assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
        (served,) = crd["spec"]["versions"]
        assert served["name"] == version and served["served"] and served["storage"]
    assert not list((CHART / "crds").glob("*inference*")), "the Gateway implementation installs it"


def test_the_example_values_render_the_whole_inferencepool_setup() -> None:
    docs = lint_and_render_file(EXAMPLE_VALUES)
    assert crd_problems(one(docs, "InferencePool")) == [] and crd_problems(one(docs, "HTTPRoute")) == []
    assert {"Deployment", "Service", "Role", "RoleBinding", "ServiceAccount", "NetworkPolicy",
            "PodMonitor"} <= set(picker_objects(docs))


def test_the_install_notes_say_how_to_check_the_pool() -> None:
    assert "InferencePool" not in notes()
    text = notes(ROUTE)
    assert "InferencePool chatfleet, picked per request by chatfleet-epp (failureMode FailOpen)" in text
    assert "HTTPRoute chatfleet sends Gateway inference-gateway's traffic to it" in text
    assert "kubectl -n llm get inferencepool chatfleet" in text


@pytest.mark.parametrize(("values", "message"), [
    ({"routing.mode": "gateway"}, "/routing/mode"),
    ({**INFERENCEPOOL, "routing.epp.failureMode": "Open"}, "/routing/epp/failureMode"),
    ({**INFERENCEPOOL, "routing.epp.metrics.port": 9002},
     "routing.epp.port and routing.epp.metrics.port are both 9002"),
    ({**INFERENCEPOOL, "routing.httpRoute.enabled": True},
     "routing.httpRoute.enabled needs routing.httpRoute.gatewayName"),
    ({**ROUTE, "routing.httpRoute.requestTimeout": "10 minutes"}, "/routing/httpRoute/requestTimeout"),
    ({**INFERENCEPOOL, "routing.epp.replica": 2}, "replica"),
])
def test_bad_routing_values_are_refused_with_what_to_fix(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("values", [INFERENCEPOOL, INFERENCEPOOL_FULL], ids=["minimal", "full"])
def test_the_chart_passes_only_flags_chatfleet_epp_takes(values: dict[str, Any]) -> None:
    """The picker's container would exit at start on a flag its command does not have."""
    (container,) = pod_template(named(render(values), "Deployment", "chatfleet-epp"))[1]["containers"]
    options = {opt for param in typer.main.get_command(app).commands["epp"].params for opt in param.opts}

    assert {"--" + name for name in flags(container)} <= options
