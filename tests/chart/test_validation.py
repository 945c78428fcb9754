"""Every rendering of the chart validated by real tools: kubernetes-validate --strict (built-in
kinds, Kubernetes 1.30 and the newest schema it ships), the CRDs' own models (custom resources) or
their vendored schemas (the routing objects: tests/fixtures/crds/), and checkov on the chart itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring
from pydantic import BaseModel, ConfigDict

from tests.chart.render import CHART, ROOT, render_text
from tests.chart.test_chart import MATRIX
from tests.chart.test_routing import CRD_SCHEMAS, crd_problems
from tests.support.crd import problems
from tests.support.tools import tool_path


class _PeeringMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    namespace: str | None = None
    labels: dict[str, str] = {}


class ClusterKopfPeering(BaseModel):
    """kopf's peering object (kopf.dev/v1; kopf's CRD keeps no spec): name, labels, status."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["kopf.dev/v1"]
    kind: Literal["ClusterKopfPeering"]
    metadata: _PeeringMeta


class KopfPeering(ClusterKopfPeering):
    kind: Literal["KopfPeering"]  # type: ignore[assignment]


CUSTOM_KINDS: dict[tuple[str, str], type[BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): monitoring.PodMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("kopf.dev/v1", "ClusterKopfPeering"): ClusterKopfPeering,
    ("kopf.dev/v1", "KopfPeering"): KopfPeering,
}

CHART_CRD_KINDS = {("chatfleet.io/v1alpha1", "ChatFleetPolicy")}
"""Kinds whose CRDs the chart installs itself (crds/): checked against that CRD's schema."""


EXAMPLES = sorted((ROOT / "examples").glob("values-*.yaml"))
"""The example value files users install with (-f): validated like the matrix."""

POD_EXTRAS = {
    "extraVolumes": [{"name": "certs", "configMap": {"name": "corp-ca"}}],
    "gateway.extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True}],
    "engine.extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/corp", "readOnly": True}],
    # What checkov asks of any container, the chart's own included.
    "initContainers": [{"name": "wait", "image": "busybox:1.37", "command": ["true"],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}},
                        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}}],
    "runtimeClassName": "nvidia", "priorityClassName": "llm-serving",
    "engine.securityContext": {"runAsUser": 20000}, "engine.vllm.hfToken.value": "hf_dummy",
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "chatfleet"}}}],
    "networkPolicy.from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}],
}
"""The values issue 16 added to the pod, all at once."""

PER_POD_STORES = {"engine.kind": "sim", "autoscaling.mode": "keda", "autoscaling.maxReplicas": 4,
                  "knowledgeBase.local.perPodStores": True, "knowledgeBase.local.persistence.enabled": False}


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: a values file for checkov's --var-file."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def newest_schema_version() -> str:
    help_text = subprocess.run([tool_path("kubernetes-validate"), "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    match = re.search(r"Defaults to\s+(\d+\.\d+\.\d+)", help_text)
    assert match, help_text
    return match.group(1)


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Case id -> (file with the built-in kinds of that rendering, its custom resources)."""
    folder = tmp_path_factory.mktemp("renders")
    out = {}
    cases = [(case.id, case.values[0]) for case in MATRIX] + [
        (f"example-{path.stem}", yaml.safe_load(path.read_text())) for path in EXAMPLES] + [
        ("pod-extras", POD_EXTRAS), ("kb-per-pod-stores", PER_POD_STORES)]
    for case_id, values in cases:
        docs = [d for d in yaml.safe_load_all(render_text(values)) if d]
        known = CUSTOM_KINDS.keys() | CRD_SCHEMAS.keys() | CHART_CRD_KINDS
        custom = [d for d in docs if (d["apiVersion"], d["kind"]) in known]
        builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in known]
        path = folder / f"{case_id}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        out[case_id] = (path, custom)
    return out


@pytest.mark.parametrize("version", ["1.30.0", "newest"])
def test_kubernetes_validate_strict_finds_nothing(renders, version: str) -> None:
    version = newest_schema_version() if version == "newest" else version
    files = [str(path) for path, _ in renders.values()]
    result = subprocess.run([tool_path("kubernetes-validate"), "--strict", "-k", version, *files],
                            capture_output=True, text=True, timeout=300, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if not line.startswith("INFO")]
    assert result.returncode == 0 and not problems, "\n".join(problems)
    passed = [line for line in lines if " passed for resource " in line]
    assert len(passed) >= 6 * len(files), "kubernetes-validate checked fewer objects than rendered"


def test_custom_resources_match_their_crd_models(renders) -> None:
    """Unknown fields would be dropped by the models: a round trip must give the object back."""
    seen: set[str] = set()
    for case_id, (_, custom) in renders.items():
        for doc in custom:
            if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS.keys() | CHART_CRD_KINDS:
                continue
            model = CUSTOM_KINDS[(doc["apiVersion"], doc["kind"])]
            parsed = model.model_validate(doc)
            again = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
            assert again == doc, f"{case_id}: {doc['kind']} has fields its CRD does not define"
            seen.add(doc["kind"])
    assert seen == {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject",
                    "ClusterKopfPeering", "KopfPeering"}


def test_routing_resources_match_their_vendored_crds(renders) -> None:
    """The InferencePool and HTTPRoute of every inferencepool rendering, as the API server with
    those CRDs would check them (OpenAPI schema, then CEL rules)."""
    seen = set()
    for case_id, (_, custom) in renders.items():
        for doc in custom:
            if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
                assert crd_problems(doc) == [], case_id
                seen.add(doc["kind"])
    assert seen == {"InferencePool", "HTTPRoute"}


def test_chart_policies_match_the_charts_crd(renders) -> None:
    """The chart's ChatFleetPolicy (operator on, with an HPA or a ScaledObject), as the API server
    with the chart's CRD would check it; one in every such rendering."""
    kinds = set()
    for case_id, (_, custom) in renders.items():
        policies = [d for d in custom if (d["apiVersion"], d["kind"]) in CHART_CRD_KINDS]
        for doc in policies:
            assert problems(doc) == [], case_id
            kinds.add(doc["spec"]["targetRef"]["kind"])
        if "-operator" in case_id and ("-hpa-" in case_id or "-keda-" in case_id):
            assert len(policies) == 1, case_id
    assert kinds == {"HorizontalPodAutoscaler", "ScaledObject"}


@pytest.mark.parametrize("values", [
    {},
    {"engine": {"kind": "sim"}, "autoscaling": {"mode": "keda"}, "operator": {"enabled": True},
     "routing": {"mode": "inferencepool", "epp": {"replicas": 2},
                 "httpRoute": {"enabled": True, "gatewayName": "inference-gateway"}}},
    # checkov renders into the namespace default: the chart's policy goes there, so it is watched.
    {"operator": {"enabled": True, "replicas": 2, "peering": {"enabled": True},
                  "watchNamespaces": ["default", "team-b"]}},
    {"knowledgeBase": {"local": {"persistence": {"enabled": True}}}},
    {"knowledgeBase": {"store": "pgvector", "pgvector": {"existingSecret": "chatfleet-pg"},
                       "embeddings": {"url": "http://embeddings.llm.svc:8080/v1", "model": "BAAI/bge-m3",
                                      "existingSecret": "embeddings-key"}}},
    {"auth": {"existingSecret": "chatfleet-api-keys", "rateLimit": {"requestsPerSecond": 5}}},
    {"gateway": {"workers": 4, "admission": {"interactiveReservedSlots": 4},
                 "resources": {"limits": {"cpu": "5"}}}},
    yaml.safe_load((ROOT / "examples" / "values-production.yaml").read_text()),
    nested(POD_EXTRAS),
    nested(PER_POD_STORES),
], ids=["defaults", "sim-keda-operator-inferencepool", "operator-peering-namespaces", "kb-local-claim",
        "kb-pgvector-embeddings", "auth-rate-limit", "workers-cpu-limit", "example-production",
        "pod-extras", "kb-per-pod-stores"])
def test_checkov_passes_with_only_written_waivers(values: dict[str, Any], tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm_dir = str(Path(tool_path("helm")).parent)
    result = subprocess.run(
        [tool_path("checkov"), "-d", str(CHART), "--framework", "helm", "--var-file", str(values_file),
         "--skip-download", "--compact", "--quiet", "-o", "json"],
        capture_output=True, text=True, timeout=600, check=False,
        env={"PATH": f"{helm_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = yaml.safe_load(result.stdout)
    reports = report if isinstance(report, list) else [report]
    summary = reports[0]["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 100, summary
    for skipped in reports[0]["results"].get("skipped_checks", []):
        reason = skipped.get("suppress_comment") or ""
        assert len(reason) > 20, f"{skipped['check_id']} waived without a reason"
