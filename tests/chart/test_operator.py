"""The chart's operator (operator.enabled): off by default; when on, a locked-down pod running
`chatfleet operator` with the values' flags, RBAC limited to what the operator touches (nothing on
Deployments), peering objects when peering is on, and pods no gateway selector picks up."""

from __future__ import annotations

from typing import Any

import pytest

from chatfleet.autoscale.operator import parse_policy
from tests.chart.render import CHART, by_kind, helm, notes, render, set_args
from tests.chart.test_chart import OPERATOR, OPERATOR_NAMESPACES, OPERATOR_PEERING
from tests.support.crd import problems

OPERATOR_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ClusterKopfPeering",
                  "KopfPeering", "PodMonitor"}


def operator_objects(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return by_kind([d for d in docs
                    if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"])


def operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = operator_objects(docs)["Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def flags(container: dict[str, Any]) -> dict[str, list[str]]:
    """--name=value arguments by name (--standalone: an empty value)."""
    out: dict[str, list[str]] = {}
    for arg in container["args"][1:]:
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


def rules_granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every rule of the operator's Roles and ClusterRoles."""
    objects = operator_objects(docs)
    granted = set()
    for role in objects.get("ClusterRole", []) + objects.get("Role", []):
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((group, resource, verb))
    return granted


NAMESPACED = {
    ("chatfleet.io", "chatfleetpolicies", verb) for verb in ("get", "list", "watch", "patch")
} | {
    ("chatfleet.io", "chatfleetpolicies/status", "patch"),
    ("autoscaling", "horizontalpodautoscalers", "get"),
    ("autoscaling", "horizontalpodautoscalers", "patch"),
    ("keda.sh", "scaledobjects", "get"),
    ("keda.sh", "scaledobjects", "patch"),
    ("", "events", "create"),
}


def test_off_by_default() -> None:
    docs = render()
    assert operator_objects(docs) == {}
    assert not OPERATOR_KINDS & set(by_kind(docs))


def test_the_operator_pod_runs_the_command_with_the_values() -> None:
    docs = render({**OPERATOR, "operator.prometheusUrl": "http://prom.mon.svc:9090",
                   "operator.intervalSeconds": 15, "operator.logLevel": "debug"})
    (deployment,) = operator_objects(docs)["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "standalone: never two at once"
    pod = operator_pod(docs)
    (container,) = pod["containers"]
    gateway = next(d for d in by_kind(docs)["Deployment"] if d["metadata"]["name"] == "chatfleet")
    gateway_image = gateway["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == gateway_image, "the gateway image by default"
    assert container["args"][0] == "operator"
    args = flags(container)
    assert args["--prometheus-url"] == ["http://prom.mon.svc:9090"]
    assert args["--interval"] == ["15"] and args["--log-level"] == ["debug"]
    assert args["--standalone"] == [""] and "--peering" not in args
    assert args["--namespace"] == ["llm"], "its own namespace unless told otherwise"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args["--metrics-port"] == [str(ports["metrics"])] and args["--metrics-host"] == ["0.0.0.0"]
    assert args["--liveness"] == [f"http://0.0.0.0:{ports['health']}/healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == "chatfleet-operator" and pod["automountServiceAccountToken"]
    (account,) = operator_objects(docs)["ServiceAccount"]
    assert account["metadata"]["name"] == "chatfleet-operator"


def test_the_operator_pod_is_locked_down() -> None:
    pod = operator_pod(render(OPERATOR))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}


def test_no_gateway_selector_picks_up_the_operator_pods() -> None:
    docs = render(OPERATOR)
    (deployment,) = operator_objects(docs)["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    kinds = by_kind(docs)
    gateway_selectors = [
        kinds["Service"][0]["spec"]["selector"],
        kinds["PodDisruptionBudget"][0]["spec"]["selector"]["matchLabels"],
        kinds["ServiceMonitor"][0]["spec"]["selector"]["matchLabels"],
        next(p for p in kinds["NetworkPolicy"] if "operator" not in p["metadata"]["name"])
        ["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in gateway_selectors:
        assert not selector.items() <= labels.items(), selector
    (monitor,) = operator_objects(docs)["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    (policy,) = operator_objects(docs)["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == ["metrics", "health"]


def test_by_default_it_may_patch_autoscalers_in_its_own_namespace_only() -> None:
    """No ClusterRole unless asked for: a Role and RoleBinding in the release namespace, and the
    operator watches that namespace alone."""
    docs = render(OPERATOR)
    objects = operator_objects(docs)
    assert "ClusterRole" not in objects and "ClusterRoleBinding" not in objects
    assert [(o["metadata"]["namespace"]) for o in objects["Role"]] == ["llm"]
    assert [(o["metadata"]["namespace"]) for o in objects["RoleBinding"]] == ["llm"]
    assert rules_granted(docs) == NAMESPACED
    (container,) = operator_pod(docs)["containers"]
    assert flags(container)["--namespace"] == ["llm"]


def test_cluster_wide_rbac_is_what_the_operator_touches_and_nothing_on_deployments() -> None:
    docs = render({**OPERATOR, "operator.clusterWide": True})
    objects = operator_objects(docs)
    assert "Role" not in objects and len(objects["ClusterRole"]) == 1
    assert rules_granted(docs) == NAMESPACED
    (binding,) = objects["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == objects["ClusterRole"][0]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chatfleet-operator",
                                    "namespace": "llm"}]
    assert "ClusterKopfPeering" not in objects, "standalone: no peering object"


def test_peering_adds_the_peering_object_and_only_its_rights() -> None:
    docs = render(OPERATOR_PEERING)
    objects = operator_objects(docs)
    (peering,) = objects["ClusterKopfPeering"]
    assert peering["apiVersion"] == "kopf.dev/v1"
    (container,) = operator_pod(docs)["containers"]
    assert flags(container)["--peering"] == [peering["metadata"]["name"]]
    assert "--standalone" not in flags(container)
    (deployment,) = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    peering_rights = {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert rules_granted(docs) == NAMESPACED | peering_rights


def test_watched_namespaces_get_a_role_and_a_peering_object_each() -> None:
    docs = render(OPERATOR_NAMESPACES)
    objects = operator_objects(docs)
    assert "ClusterRole" not in objects and "ClusterKopfPeering" not in objects
    namespaces = ["llm", "team-b"]
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(o["metadata"]["namespace"] for o in objects[kind]) == namespaces, kind
    for binding in objects["RoleBinding"]:
        assert binding["subjects"][0]["namespace"] == "llm", "the operator's own namespace"
    (container,) = operator_pod(docs)["containers"]
    assert flags(container)["--namespace"] == namespaces
    peering_rights = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert rules_granted(docs) == NAMESPACED | peering_rights


def test_an_own_operator_image_is_used() -> None:
    pod = operator_pod(render({**OPERATOR, "operator.image.repository": "registry.local/cf",
                               "operator.image.tag": "1.2.3"}))
    assert pod["containers"][0]["image"] == "registry.local/cf:1.2.3"


@pytest.mark.parametrize(("values", "message"), [
    ({**OPERATOR, "operator.replicas": 2}, "operator.replicas > 1 needs operator.peering.enabled"),
    ({**OPERATOR, "operator.peering.enable": True}, "enable"),
    ({**OPERATOR, "operator.prometheusUrl": "prometheus:9090"}, "/operator/prometheusUrl"),
    ({**OPERATOR, "operator.watchNamespaces": ["Team_B"]}, "/operator/watchNamespaces"),
    ({**OPERATOR, "operator.logLevel": "verbose"}, "/operator/logLevel"),
    ({**OPERATOR, "operator.clusterWide": True, "operator.watchNamespaces": ["llm"]},
     "operator.clusterWide serves every namespace"),
])
def test_bad_operator_values_are_refused(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(("mode", "kind", "field"), [
    ("hpa", "HorizontalPodAutoscaler", "minReplicas"),
    ("keda", "ScaledObject", "minReplicaCount"),
])
def test_with_the_operator_on_the_chart_leaves_the_floor_field_to_it(mode: str, kind: str,
                                                                     field: str) -> None:
    """Helm 4 applies server-side: a floor the chart rendered would conflict on the next upgrade
    with the operator, which owns the field. So with the operator on the chart renders no floor,
    only its value as the annotation the operator starts from; with it off, the floor as before."""
    values = {"autoscaling.mode": mode, "autoscaling.minReplicas": 3}
    (on,) = by_kind(render({**values, **OPERATOR}))[kind]
    assert field not in on["spec"]
    assert on["metadata"]["annotations"] == {"chatfleet.io/chart-floor": "3"}
    (off,) = by_kind(render(values))[kind]
    assert off["spec"][field] == 3
    assert "chatfleet.io/chart-floor" not in (off["metadata"].get("annotations") or {})


def chart_policy(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The chart's ChatFleetPolicy, if it rendered one (at most one)."""
    policies = by_kind(docs).get("ChatFleetPolicy", [])
    assert len(policies) <= 1
    return policies[0] if policies else None


@pytest.mark.parametrize(("mode", "kind"), [("hpa", "HorizontalPodAutoscaler"),
                                            ("keda", "ScaledObject")])
def test_with_the_operator_on_the_chart_names_its_own_autoscaler_in_a_policy(mode: str,
                                                                             kind: str) -> None:
    """The chart left the floor field to the operator, which writes it only for targets a policy
    names: so the chart renders one for its own HPA / ScaledObject, in recommend mode (the
    operator holds the chart's floor), with the chart's bounds, valid for the CRD the chart
    installs and taken by the operator as the chart means it."""
    values = {"autoscaling.mode": mode, "autoscaling.minReplicas": 2, "autoscaling.maxReplicas": 6,
              "knowledgeBase.store": "pgvector", "knowledgeBase.pgvector.existingSecret": "pg"}
    docs = render({**values, **OPERATOR}, release="chat", namespace="team-a")
    policy = chart_policy(docs)
    assert policy is not None
    (target,) = by_kind(docs)[kind]
    assert policy["metadata"]["name"] == "chat-chatfleet" and policy["metadata"]["namespace"] == "team-a"
    assert policy["spec"]["targetRef"] == {"kind": kind, "name": target["metadata"]["name"]}
    assert target["metadata"]["namespace"] == "team-a"
    assert problems(policy) == []
    parsed = parse_policy(policy["spec"])
    assert parsed.mode == "recommend"
    assert (parsed.spec.min_replicas, parsed.spec.max_replicas) == (2, 6)
    assert parsed.cold_start_s is None, "learned from the pods unless set"
    assert chart_policy(render(values)) is None, "no operator, no policy"


def test_the_policy_takes_its_fields_from_the_values() -> None:
    policy = chart_policy(render({**OPERATOR, "operator.policy.mode": "enforce",
                                  "operator.policy.replicaCapacity": 2.5,
                                  "operator.policy.coldStartSeconds": 240,
                                  "operator.policy.targetUtilization": 0.8,
                                  "operator.policy.trendWindowSeconds": 900,
                                  "operator.policy.lowerAfterSeconds": 1200,
                                  "operator.policy.slo": {"ttftSeconds": 0.5, "attainment": 0.95}}))
    assert policy is not None and problems(policy) == []
    parsed = parse_policy(policy["spec"])
    assert parsed.mode == "enforce" and parsed.cold_start_s == 240
    assert parsed.spec.replica_capacity == 2.5 and parsed.spec.target_utilization == 0.8
    assert (parsed.spec.trend_window_s, parsed.spec.lower_after_s) == (900, 1200)
    assert parsed.ttft_seconds == 0.5 and parsed.slo_error_ratio == pytest.approx(0.05)


@pytest.mark.parametrize("values", [
    {**OPERATOR, "operator.policy.create": False},
    {**OPERATOR, "autoscaling.mode": "none"},
], ids=["create-false", "no-autoscaler"])
def test_no_policy_without_create_or_an_autoscaler(values: dict[str, Any]) -> None:
    assert chart_policy(render(values)) is None


def test_notes_say_what_holds_the_floor() -> None:
    text = " ".join(notes({**OPERATOR, "autoscaling.mode": "keda", "autoscaling.minReplicas": 2,
                           "autoscaling.maxReplicas": 4, "knowledgeBase.store": "pgvector",
                           "knowledgeBase.pgvector.existingSecret": "pg"}).split())
    assert ("ChatFleetPolicy chatfleet (recommend mode) names it: the operator holds the floor at 2"
            in text), text
    assert "WARNING" not in text.partition("Operator:")[2].partition("Knowledge bases:")[0]
    text = " ".join(notes({**OPERATOR, "autoscaling.mode": "keda",
                           "operator.policy.create": False}).split())
    assert ("WARNING: operator.policy.create is false: until a ChatFleetPolicy names chatfleet"
            in text and "0: KEDA may scale the pods to zero" in text), text


def test_a_policy_the_operator_would_not_watch_is_refused() -> None:
    """The chart's policy in a namespace the operator does not watch would hold nothing, and a
    ScaledObject's floor would stay 0: the render fails with what to set."""
    result = helm("template", "chatfleet", str(CHART), "--namespace", "llm",
                  *set_args({**OPERATOR, "operator.watchNamespaces": ["team-b"]}))
    assert result.returncode != 0
    assert ("operator.watchNamespaces (team-b) leaves out the release namespace llm" in result.stderr
            and "add llm to operator.watchNamespaces, or set operator.policy.create: false"
            in result.stderr), result.stderr
    assert chart_policy(render({**OPERATOR, "operator.watchNamespaces": ["team-b"],
                                "operator.policy.create": False})) is None
    assert chart_policy(render({**OPERATOR, "operator.clusterWide": True})) is not None
