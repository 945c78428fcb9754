"""What a production install gets from the chart (issue 16): defaults that work on a typical
cluster or fail at render with the fix, pods that survive real clusters (extra volumes, init
containers, runtime class, secrets that roll the pods, bounded scratch space, spread over nodes),
and a helm test pod no gateway selector picks up. Rendered by real helm."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml

from tests.chart.render import (CHART, ROOT, by_kind, containers, env, helm, lint_and_render_file, notes, one,
                                render, set_args)
from tests.chart.test_chart import SIM
from tests.conftest import Server, upstream_env
from tests.support.procs import free_port
from tests.support.tools import tool_path

SHARED_KB = {"knowledgeBase.store": "pgvector", "knowledgeBase.pgvector.existingSecret": "chatfleet-pg"}
PRODUCTION_VALUES = ROOT / "examples" / "values-production.yaml"


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def volumes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(docs)["volumes"]}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def refused(values: dict[str, Any], binary: str = "helm") -> str:
    result = helm("template", "x", str(CHART), *set_args(values), binary=binary)
    assert result.returncode != 0, "rendered values that cannot work"
    return result.stderr


# Defaults: one GPU pod, its knowledge bases on a ReadWriteOnce claim of the default StorageClass,
# the weights in an emptyDir: nothing a typical GPU cluster lacks, and nothing split across pods.

def test_defaults_render_one_pod_with_storage_a_typical_cluster_has() -> None:
    docs = render()
    kinds = by_kind(docs)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 1), (
        "the local knowledge base serves one pod")
    claims = kinds["PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == ["chatfleet-kb"]
    for claim in claims:
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], "default classes are ReadWriteOnce"
        assert "storageClassName" not in claim["spec"]
    assert volumes(docs)["kb-data"]["persistentVolumeClaim"] == {"claimName": "chatfleet-kb"}
    assert volumes(docs)["model-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}
    engine = containers(docs)["engine"]
    assert engine["resources"]["requests"]["ephemeral-storage"] == "50Gi", (
        "the weights' emptyDir is on the node's disk: schedule where it fits")
    assert env(containers(docs)["gateway"])["CHATFLEET_KB__STORE"] == "local"


def test_default_notes_say_what_the_defaults_mean() -> None:
    text = notes()
    assert "WARNING" not in text
    assert "Autoscaling is capped at autoscaling.maxReplicas=1 while the knowledge bases are local" in text
    assert "each pod downloads them into its own emptyDir (up to 50Gi" in text


@pytest.mark.parametrize("binary", ["helm", "helm3"])
def test_a_read_write_many_model_cache_on_the_default_class_fails_with_the_fix(binary: str) -> None:
    """Most default StorageClasses are ReadWriteOnce: the claim would never bind and `helm
    install` would report success over Pending pods."""
    stderr = refused({"engine.vllm.modelCache.enabled": True}, binary)
    assert "engine.vllm.modelCache asks for a ReadWriteMany claim of the cluster's default StorageClass" in stderr
    for fix in ("engine.vllm.modelCache.storageClassName", "engine.vllm.modelCache.existingClaim",
                "engine.vllm.modelCache.enabled=false"):
        assert fix in stderr, fix


def test_a_read_write_once_model_cache_with_several_pods_fails_with_the_fix() -> None:
    stderr = refused({**SHARED_KB, "autoscaling.maxReplicas": 4, "engine.vllm.modelCache.enabled": True,
                      "engine.vllm.modelCache.accessModes": ["ReadWriteOnce"]})
    assert ("engine.vllm.modelCache.accessModes is [ReadWriteOnce] but up to 4 pods may run "
            "(autoscaling.maxReplicas=4)") in stderr, stderr


@pytest.mark.parametrize("values", [
    {"engine.vllm.modelCache.enabled": True, "engine.vllm.modelCache.storageClassName": "nfs-client"},
    {"engine.vllm.modelCache.enabled": True, "engine.vllm.modelCache.existingClaim": "weights"},
    {"engine.vllm.modelCache.enabled": True, "engine.vllm.modelCache.accessModes": ["ReadWriteOnce"]},
    {**SIM, "engine.vllm.modelCache.enabled": True},
], ids=["rwx-class", "existing-claim", "rwo-one-pod", "sim-has-no-cache"])
def test_model_caches_that_can_bind_render(values: dict[str, Any]) -> None:
    docs = render(values)
    claims = {c["metadata"]["name"]: c for c in by_kind(docs)["PersistentVolumeClaim"]}
    if "engine.vllm.modelCache.storageClassName" in values:
        assert claims["chatfleet-model-cache"]["spec"]["storageClassName"] == "nfs-client"
        assert "ephemeral-storage" not in containers(docs)["engine"]["resources"]["requests"]


def test_the_production_example_scales_out_with_shared_storage() -> None:
    docs = lint_and_render_file(PRODUCTION_VALUES)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (claim,) = by_kind(docs)["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs-client"
    assert "kb-data" not in volumes(docs)


# The pod template.

def test_pods_skip_service_links_and_relabel_volumes_only_on_mismatch() -> None:
    for docs in (render(), render(SIM)):
        spec = pod_spec(docs)
        assert spec["enableServiceLinks"] is False, "a Service named vllm would set VLLM_PORT"
        assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        assert env(containers(docs)["engine"])["USER"] == "chatfleet", "no passwd entry for the UID"
    assert one(render(), "Pod")["spec"]["enableServiceLinks"] is False


def test_every_emptydir_is_bounded_and_requested() -> None:
    everything = {"operator.enabled": True, "routing.mode": "inferencepool"}
    for values in ({}, SIM, {"knowledgeBase.local.persistence.enabled": False}, everything):
        deployments = by_kind(render(values))["Deployment"]
        assert len(deployments) == (3 if values is everything else 1)
        for deployment in deployments:
            for volume in deployment["spec"]["template"]["spec"]["volumes"]:
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), (deployment["metadata"]["name"], volume)
    docs = render({"tmpSize": "3Gi", "knowledgeBase.local.persistence.enabled": False,
                   "knowledgeBase.local.persistence.size": "5Gi"})
    assert volumes(docs)["tmp"]["emptyDir"] == {"sizeLimit": "3Gi"}
    assert volumes(docs)["kb-data"]["emptyDir"] == {"sizeLimit": "5Gi"}
    assert containers(docs)["gateway"]["resources"]["requests"]["ephemeral-storage"] == "3Gi"


def test_extra_volumes_mounts_init_containers_and_env_reach_the_pod() -> None:
    values = {
        "extraVolumes": [{"name": "certs", "configMap": {"name": "corp-ca"}}],
        "gateway.extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True}],
        "engine.extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/corp", "readOnly": True}],
        "initContainers": [{"name": "wait-db", "image": "busybox:1.37", "command": ["true"]}],
        "gateway.extraEnv": [{"name": "SSL_CERT_DIR", "value": "/etc/corp-ca"}],
        "engine.vllm.extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
        "runtimeClassName": "nvidia",
        "priorityClassName": "llm-serving",
    }
    docs = render(values)
    spec = pod_spec(docs)
    assert volumes(docs)["certs"] == {"name": "certs", "configMap": {"name": "corp-ca"}}
    assert spec["initContainers"] == values["initContainers"]
    assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "llm-serving"
    pod = containers(docs)
    assert {"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True} in pod["gateway"]["volumeMounts"]
    assert {"name": "certs", "mountPath": "/etc/ssl/corp", "readOnly": True} in pod["engine"]["volumeMounts"]
    assert env(pod["gateway"])["SSL_CERT_DIR"] == "/etc/corp-ca"
    assert env(pod["engine"])["VLLM_LOGGING_LEVEL"] == "DEBUG"
    sim = containers(render({**SIM, "engine.sim.extraEnv": [{"name": "A", "value": "1"}],
                             "engine.extraVolumeMounts": [{"name": "certs", "mountPath": "/c"}],
                             "extraVolumes": values["extraVolumes"]}))["engine"]
    assert env(sim)["A"] == "1" and {"name": "certs", "mountPath": "/c"} in sim["volumeMounts"]
    assert "runtimeClassName" not in pod_spec(render()), "empty: the cluster's default runtime"


def test_the_engine_takes_its_own_security_context_over_the_shared_one() -> None:
    pod = containers(render({"engine.securityContext": {"runAsUser": 2000, "readOnlyRootFilesystem": False}}))
    assert pod["engine"]["securityContext"]["runAsUser"] == 2000
    assert pod["engine"]["securityContext"]["readOnlyRootFilesystem"] is False
    assert pod["engine"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}, "merged, not replaced"
    assert pod["gateway"]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "runAsUser" not in pod["gateway"]["securityContext"]


@pytest.mark.parametrize(("values", "message"), [
    ({"runtimeClassName": 3}, "/runtimeClassName"),
    ({"extraVolumes": [{"configMap": {"name": "x"}}]}, "/extraVolumes/0"),
    ({"gateway.extraVolumeMounts": [{"name": "x"}]}, "/gateway/extraVolumeMounts/0"),
    ({"initContainers": [{"name": "x"}]}, "/initContainers/0"),
    ({"engine.sim.extraEnv": [{"value": "1"}]}, "/engine/sim/extraEnv/0"),
    ({"tmpSize": "2 gigs"}, "/tmpSize"),
    ({"autoscaling.keda.fallback.replicas": 0}, "/autoscaling/keda/fallback/replicas"),
], ids=["runtime-class", "volume-name", "mount-path", "init-image", "sim-env", "tmp", "fallback"])
def test_bad_new_values_are_refused_with_the_path(values: dict[str, Any], message: str) -> None:
    assert message in refused(values)


def test_a_changed_token_value_rolls_the_pods() -> None:
    def checksum(token: str, **values: Any) -> str:
        annotations = one(render({"engine.vllm.hfToken.value": token, **values}), "Deployment")[
            "spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/secrets"]
    assert checksum("hf_one") != checksum("hf_two")
    assert checksum("hf_one") == checksum("hf_one", commonLabels={"team": "llm"}), (
        "the Secret's data, not its labels: a relabel rolls nothing")
    for values in ({}, {"engine.vllm.hfToken.existingSecret": "hf"}, SIM):
        annotations = one(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert "checksum/secrets" not in annotations, "no Secret of the chart's to follow"


def test_pods_spread_over_nodes_by_default_and_only_then() -> None:
    (constraint,) = pod_spec(render())["topologySpreadConstraints"]
    assert constraint == {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                          "whenUnsatisfiable": "ScheduleAnyway",
                          "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "chatfleet",
                                                            "app.kubernetes.io/instance": "chatfleet"}},
                          "matchLabelKeys": ["pod-template-hash"]}
    own = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "chatfleet"}}}]
    assert pod_spec(render({"topologySpreadConstraints": own}))["topologySpreadConstraints"] == own
    assert "topologySpreadConstraints" not in pod_spec(render({"spreadAcrossNodes": False}))


def test_a_drain_may_evict_pods_that_are_not_ready() -> None:
    pdb = one(render(), "PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# The helm test pod.

def test_no_gateway_selector_picks_up_the_helm_test_pod() -> None:
    docs = render({**SHARED_KB, "autoscaling.maxReplicas": 4})
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    labels = test_pod["metadata"]["labels"]
    deployment = one(docs, "Deployment")
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one(docs, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        # The HPA's Pods metrics are averaged over the pods of its target's selector.
        "HorizontalPodAutoscaler": selectors_of_target(docs),
        "topologySpread": pod_spec(docs)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selects(selector, gateway_labels), kind
        assert not selects(selector, labels), f"the {kind} selects the helm test pod"
    assert labels["app.kubernetes.io/component"] == "test"
    assert labels["app.kubernetes.io/instance"] == "chatfleet"


def selectors_of_target(docs: list[dict[str, Any]]) -> dict[str, str]:
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    deployment = one(docs, "Deployment")
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    return deployment["spec"]["selector"]["matchLabels"]


def test_a_restricted_network_policy_still_admits_the_helm_test_pod() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    docs = render({"networkPolicy.from": peers})
    labels = one(docs, "Pod")["metadata"]["labels"]
    allowed = one(docs, "NetworkPolicy")["spec"]["ingress"][0]["from"]
    assert allowed[0] == peers[0]
    assert any(selects(peer.get("podSelector", {}).get("matchLabels", {"x": "y"}), labels) for peer in allowed)
    no_test = one(render({"networkPolicy.from": peers, "helmTest.enabled": False}), "NetworkPolicy")
    assert no_test["spec"]["ingress"][0]["from"] == peers


def test_helm_test_waits_for_readiness_then_checks_chat_and_a_knowledge_base_write() -> None:
    script = one(render({"helmTest.readyTimeoutSeconds": 600}), "Pod")["spec"]["containers"][0]["args"][0]
    assert "time.monotonic() + 600" in script
    for path in ("/readyz", "/v1/chat/completions", "/knowledge_base/create_knowledge_base",
                 "/knowledge_base/list_knowledge_bases", "/knowledge_base/delete_knowledge_base"):
        assert path in script, path
    compile(script, "helm-test", "exec")


def helm_test_script(values: dict[str, Any], base: str) -> str:
    script = one(render({**SIM, "engine.sim.profile": "tiny-cpu", **values}), "Pod")["spec"]["containers"][0]["args"][0]
    assert 'base = "http://chatfleet.llm.svc:80"' in script
    return script.replace('base = "http://chatfleet.llm.svc:80"', f'base = "{base}"')


def test_the_helm_test_script_passes_against_a_real_gateway(
        engine_sim: Callable[..., Server], gateway: Callable[..., Server]) -> None:
    """The pod's script, run as `helm test` would, against a gateway on engine-sim: ready, a chat
    completion with tokens, a knowledge base written, listed and deleted (none left behind)."""
    server = gateway(upstream_env(engine_sim()))
    result = subprocess.run([sys.executable, "-c", helm_test_script({}, server.url)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "readyz 200" in result.stdout and "chat completion:" in result.stdout
    assert "knowledge base:" in result.stdout and "| listed: True |" in result.stdout
    listed = httpx.get(server.url + "/knowledge_base/list_knowledge_bases", timeout=10).json()["data"]
    assert listed == [], "the check deletes the knowledge base it made"


def test_the_helm_test_script_fails_when_nothing_becomes_ready() -> None:
    script = helm_test_script({"helmTest.readyTimeoutSeconds": 2}, f"http://127.0.0.1:{free_port()}")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode != 0
    assert "not ready after 2 s" in result.stderr, result.stderr


# The Deployment's replica count when an autoscaler takes over (autoscaling.mode none -> hpa/keda).

RESOURCES = {  # what the chart renders, so helm's discovery maps every kind
    "v1/services": "Service", "v1/serviceaccounts": "ServiceAccount", "v1/secrets": "Secret",
    "v1/configmaps": "ConfigMap", "v1/pods": "Pod", "v1/persistentvolumeclaims": "PersistentVolumeClaim",
    "apps/v1/deployments": "Deployment", "autoscaling/v2/horizontalpodautoscalers": "HorizontalPodAutoscaler",
    "policy/v1/poddisruptionbudgets": "PodDisruptionBudget", "networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
    "monitoring.coreos.com/v1/prometheusrules": "PrometheusRule", "keda.sh/v1alpha1/scaledobjects": "ScaledObject",
}


class ApiServer(kmock.KubernetesEmulator):
    """kmock, but naming the core group's version "v1" in its APIResourceList: kmock 0.8 says
    "/v1", which Helm 4's client-go cannot map (no Service, ConfigMap... kinds); Helm 3 tolerates it."""

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion") == "/v1":
            payload["groupVersion"] = "v1"
        return payload


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[kmock.KubernetesEmulator, Path]]:
    """kmock's emulated API server with the chart's kinds, and a kubeconfig for it: helm's
    `lookup` reads it during `helm template --dry-run=server`."""
    async with ApiServer() as emulator, kmock.Server(emulator):
        for resource, kind in RESOURCES.items():
            emulator.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=True)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}],
            "users": [{"name": "kmock", "user": {"token": "kmock-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "llm"}}]}))
        yield emulator, kubeconfig


def live_deployment(replicas: int) -> dict[str, Any]:
    """The Deployment an earlier release of the chart made (with Helm's ownership marks, so the
    install dry-run does not refuse it as someone else's)."""
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "chatfleet", "namespace": "llm",
                         "labels": {"app.kubernetes.io/managed-by": "Helm"},
                         "annotations": {"meta.helm.sh/release-name": "chatfleet",
                                         "meta.helm.sh/release-namespace": "llm"}},
            "spec": {"replicas": replicas}}


async def replicas_against(kubeconfig: Path, values: dict[str, Any], binary: str) -> int | None:
    proc = await asyncio.create_subprocess_exec(
        tool_path(binary), "template", "chatfleet", str(CHART), "-n", "llm", "--dry-run=server",
        "--disable-openapi-validation", *set_args(values),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)})
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, stderr.decode()
    docs = [d for d in yaml.safe_load_all(stdout.decode()) if d]
    return one(docs, "Deployment")["spec"].get("replicas")


@pytest.mark.parametrize("binary", ["helm", "helm3"])
@pytest.mark.parametrize("mode", ["hpa", "keda"])
async def test_switching_to_an_autoscaler_keeps_the_live_replica_count(
        cluster: tuple[kmock.KubernetesEmulator, Path], mode: str, binary: str) -> None:
    """A release with autoscaling.mode none runs 3 pods. The upgrade to an autoscaler renders the
    live count instead of dropping the field, which the API server would default to 1 (Helm 3
    deletes a field the last manifest had; Helm 4's server-side apply one its manager stops applying)."""
    emulator, kubeconfig = cluster
    values = {**SHARED_KB, "autoscaling.mode": mode, "autoscaling.minReplicas": 2, "autoscaling.maxReplicas": 8}
    assert await replicas_against(kubeconfig, values, binary) is None, "a fresh install: the autoscaler's"
    emulator.objects["apps/v1/deployments", "llm", "chatfleet"] = live_deployment(3)
    assert await replicas_against(kubeconfig, values, binary) == 3
    assert await replicas_against(kubeconfig, {**SHARED_KB, "autoscaling.mode": "none", "replicaCount": 5},
                                  binary) == 5
