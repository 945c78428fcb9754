"""The chart, rendered by real helm over a matrix of values: what a user installing it gets."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import pytest
import yaml

from tests.chart.render import (
    CHART,
    by_kind,
    containers,
    env,
    helm,
    notes,
    one,
    render,
    set_args,
)

GPU = {"engine.kind": "vllm"}
SIM = {"engine.kind": "sim"}
EXISTING = {"engine.vllm.modelCache.enabled": True, "engine.vllm.modelCache.existingClaim": "shared-models",
            "engine.vllm.hfToken.existingSecret": "hf-secret"}
TOKEN_VALUE = {"engine.vllm.hfToken.value": "hf_dummy_for_tests"}
MODEL_CACHE_RWX = {"engine.vllm.modelCache.enabled": True, "engine.vllm.modelCache.storageClassName": "nfs-client"}
INGRESS = {"ingress.enabled": True, "ingress.className": "nginx"}


KB_CLAIM = {"knowledgeBase.local.persistence.enabled": True,
            "knowledgeBase.local.persistence.storageClassName": "fast-ssd"}
KB_EXISTING_CLAIM = {"knowledgeBase.local.persistence.enabled": True,
                     "knowledgeBase.local.persistence.existingClaim": "kb-data"}
KB_PGVECTOR = {"knowledgeBase.store": "pgvector", "knowledgeBase.pgvector.existingSecret": "chatfleet-pg"}
KB_EMBEDDINGS = {"knowledgeBase.embeddings.url": "http://embeddings.llm.svc:8080/v1",
                 "knowledgeBase.embeddings.model": "BAAI/bge-m3"}
KB_EMBEDDINGS_KEY = {**KB_EMBEDDINGS, "knowledgeBase.embeddings.existingSecret": "embeddings-key"}


def kb_variant(engine: str, existing: bool, ingress: bool) -> tuple[str, dict[str, Any]]:
    """Knowledge bases: the defaults (local, emptyDir, BM25 only) on gpu with an existing claim;
    else local on a chart-made claim, pgvector with embeddings and their key, or local on an
    existing claim with keyless embeddings: every knowledge-base branch under every autoscaler."""
    if existing:
        return ("", {}) if engine == "gpu" else ("-kb-existingclaim-embeddings",
                                                {**KB_EXISTING_CLAIM, **KB_EMBEDDINGS})
    if ingress:
        return "-kb-pgvector-embeddings", {**KB_PGVECTOR, **KB_EMBEDDINGS_KEY}
    return "-kb-claim", KB_CLAIM


OPERATOR = {"operator.enabled": True}
OPERATOR_PEERING = {**OPERATOR, "operator.peering.enabled": True, "operator.replicas": 2,
                    "operator.clusterWide": True}
OPERATOR_NAMESPACES = {**OPERATOR, "operator.peering.enabled": True, "operator.replicas": 2,
                       "operator.watchNamespaces": ["llm", "team-b"]}


def operator_variant(mode: str, existing: bool, ingress: bool) -> tuple[str, dict[str, Any]]:
    """Off in half the cases; else standalone, or with peering cluster-wide, or with peering
    and a Role per watched namespace: every operator template in several renders."""
    if not existing:
        return "", {}
    if not ingress:
        return "-operator", OPERATOR
    if mode == "keda":
        return "-operator-peering-ns", OPERATOR_NAMESPACES
    return "-operator-peering", OPERATOR_PEERING


WORKERS = {"gateway.workers": 4, "gateway.admission.interactiveReservedSlots": 4}

INFERENCEPOOL = {"routing.mode": "inferencepool"}
INFERENCEPOOL_FULL = {**INFERENCEPOOL, "routing.epp.replicas": 2, "routing.httpRoute.enabled": True,
                      "routing.httpRoute.gatewayName": "inference-gateway",
                      "routing.httpRoute.hostnames": ["chat.example.com"],
                      "networkPolicy.from": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "envoy-gateway-system"}}}],
                      "routing.epp.networkPolicy.from": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "envoy-gateway-system"}}}]}


def routing_variant(mode: str, existing: bool, ingress: bool) -> tuple[str, dict[str, Any]]:
    """routing.mode inferencepool in the created-claim cases with an ingress: with every routing
    option (two pickers, the HTTPRoute, NetworkPolicy peers) without an autoscaler, else plain."""
    if existing or not ingress:
        return "", {}
    return ("-inferencepool-full", INFERENCEPOOL_FULL) if mode == "none" else ("-inferencepool", INFERENCEPOOL)


def matrix() -> list[Any]:
    """engine gpu/sim x autoscaling hpa/keda/none x existing claim+secret or chart-made x ingress,
    with the operator (operator_variant) on in the existing-claim half, a knowledge-base store
    (kb_variant) in 18 of the 24, a number of gateway workers (WORKERS) with ingress and no
    autoscaler, and routing.mode inferencepool (routing_variant) in 6."""
    cases = []
    for engine, mode, existing, ingress in itertools.product(
            ("gpu", "sim"), ("hpa", "keda", "none"), (False, True), (False, True)):
        suffix, operator = operator_variant(mode, existing, ingress)
        kb_suffix, kb = kb_variant(engine, existing, ingress)
        workers = WORKERS if mode == "none" and ingress else {}
        routing_suffix, routing = routing_variant(mode, existing, ingress)
        values: dict[str, Any] = {**(GPU if engine == "gpu" else SIM), "autoscaling.mode": mode,
                                  **(EXISTING if existing else {**TOKEN_VALUE, **MODEL_CACHE_RWX}),
                                  **(INGRESS if ingress else {}),
                                  **operator, **kb, **workers, **routing}
        case_id = (f"{engine}-{mode}-{'existing' if existing else 'created'}-"
                   f"{'ingress' if ingress else 'noingress'}{suffix}{kb_suffix}"
                   f"{'-workers4' if workers else ''}{routing_suffix}")
        cases.append(pytest.param(values, id=case_id))
    return cases


MATRIX = matrix()


@pytest.mark.parametrize("values", MATRIX)
def test_helm_lint_strict(values: dict[str, Any]) -> None:
    result = helm("lint", "--strict", str(CHART), *set_args(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("values", MATRIX)
def test_helm_3_lints_and_renders_what_helm_4_renders(values: dict[str, Any]) -> None:
    lint = helm("lint", "--strict", str(CHART), *set_args(values), binary="helm3")
    assert lint.returncode == 0 and "[WARNING]" not in lint.stdout, lint.stdout + lint.stderr
    args = ["template", "chatfleet", str(CHART), "--namespace", "llm", *set_args(values)]
    rendered = [helm(*args, binary=binary) for binary in ("helm3", "helm")]
    assert all(r.returncode == 0 for r in rendered), [r.stderr for r in rendered]
    helm3_docs, helm4_docs = ([d for d in yaml.safe_load_all(r.stdout) if d] for r in rendered)
    assert helm3_docs == helm4_docs


def test_default_values_render_a_gpu_pod_with_everything_around_it() -> None:
    docs = render()
    kinds = by_kind(docs)
    for kind in ("Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler",
                 "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule",
                 "PersistentVolumeClaim", "ConfigMap", "Pod"):
        assert kind in kinds, f"default values render no {kind}"
    assert any(cm["metadata"]["labels"].get("grafana_dashboard") == "1" for cm in kinds["ConfigMap"])
    pod = containers(docs)
    assert set(pod) == {"gateway", "engine"}
    engine = pod["engine"]
    assert engine["image"].startswith("vllm/vllm-openai:")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "--max-num-seqs=64" in engine["args"]
    assert env(pod["gateway"])["CHATFLEET_ADMISSION__ENGINE_SLOTS"] == "64"
    assert env(pod["gateway"])["CHATFLEET_ENGINE__URL"] == "http://127.0.0.1:8001/v1"
    startup = engine["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, "a model download needs 30 min"
    assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
    spec = one(docs, "Deployment")["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}, "no claim needing ReadWriteMany"
    assert [c["metadata"]["name"] for c in kinds["PersistentVolumeClaim"]] == ["chatfleet-kb"]
    tolerations = spec["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_engine_slots_follow_max_num_seqs_unless_set() -> None:
    pod = containers(render({"engine.maxNumSeqs": 128}))
    assert "--max-num-seqs=128" in pod["engine"]["args"]
    assert env(pod["gateway"])["CHATFLEET_ADMISSION__ENGINE_SLOTS"] == "128"
    pod = containers(render({"engine.maxNumSeqs": 128, "gateway.admission.engineSlots": 96}))
    assert env(pod["gateway"])["CHATFLEET_ADMISSION__ENGINE_SLOTS"] == "96"


def test_a_mig_slice_is_requested_by_its_resource_name() -> None:
    engine = containers(render({"engine.vllm.gpu.resourceName": "nvidia.com/mig-3g.40gb"}))["engine"]
    assert engine["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 1
    assert "nvidia.com/gpu" not in engine["resources"]["limits"]


def test_sim_engine_needs_no_gpu_and_answers_as_the_simulated_model() -> None:
    docs = render({**SIM, "engine.sim.profile": "llama-3-8b-h100"})
    pod = containers(docs)
    engine = pod["engine"]
    assert engine["args"][:1] == ["engine-sim"] and "llama-3-8b-h100" in engine["args"]
    assert not any("gpu" in key for key in engine["resources"].get("limits", {}))
    assert env(pod["gateway"])["CHATFLEET_ENGINE__MODEL"] == "chatfleet-sim/llama-3-8b-h100"
    kinds = by_kind(docs)
    assert [c["metadata"]["name"] for c in kinds["PersistentVolumeClaim"]] == ["chatfleet-kb"]
    assert "Secret" not in kinds
    assert "tolerations" not in one(docs, "Deployment")["spec"]["template"]["spec"]


def test_existing_claim_and_secret_are_used_not_created() -> None:
    docs = render(EXISTING)
    kinds = by_kind(docs)
    assert [c["metadata"]["name"] for c in kinds["PersistentVolumeClaim"]] == ["chatfleet-kb"]
    assert "Secret" not in kinds
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert volumes["hf-token"]["secret"]["secretName"] == "hf-secret"
    engine = containers(docs)["engine"]
    assert env(engine)["HF_TOKEN_PATH"] == "/var/run/secrets/huggingface/token"
    assert "HF_TOKEN" not in env(engine), "the token is a mounted file, never an env value"


def test_a_token_value_becomes_a_secret_the_engine_mounts() -> None:
    docs = render(TOKEN_VALUE)
    secret = one(docs, "Secret")
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert list(secret["data"]) == ["HF_TOKEN"]


@pytest.mark.parametrize("mode", ["hpa", "keda", "none"])
def test_replicas_are_set_only_without_an_autoscaler(mode: str) -> None:
    docs = render({"autoscaling.mode": mode, "replicaCount": 3, "knowledgeBase.store": "pgvector",
                   "knowledgeBase.pgvector.existingSecret": "chatfleet-pg"})
    spec = one(docs, "Deployment")["spec"]
    assert spec.get("replicas") == (3 if mode == "none" else None)


def test_ingress_routes_to_the_gateway_port() -> None:
    ingress = one(render(INGRESS), "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "chatfleet", "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "nginx"


def test_the_engine_port_is_closed_to_the_network() -> None:
    docs = render()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == ["http"]
    service_ports = [p["targetPort"] for p in one(docs, "Service")["spec"]["ports"]]
    assert service_ports == ["http"]
    monitor = one(docs, "ServiceMonitor")
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [
        ("http", "/metrics"), ("http", "/metrics/engine")]
    for endpoint in monitor["spec"]["endpoints"]:
        assert {"sourceLabels": ["__metrics_path__"], "targetLabel": "metrics_path"} in endpoint["relabelings"]


@pytest.mark.parametrize("engine", ["gpu", "sim"])
def test_scale_down_drains_before_anything_is_killed(engine: str) -> None:
    """preStop sleep (endpoint removal) -> SIGTERM -> drain; the engine stays up through all of it,
    and the grace period covers the sum, so no in-flight stream loses its engine."""
    values = {**(GPU if engine == "gpu" else SIM), "gateway.drainTimeoutSeconds": 45,
              "gateway.preStopSleepSeconds": 7}
    docs = render(values)
    pod_spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    pod = containers(docs)
    gateway_sleep = int(pod["gateway"]["lifecycle"]["preStop"]["exec"]["command"][1])
    hold = pod["engine"]["lifecycle"]["preStop"]["exec"]["command"]
    engine_hold = int(re.search(r"time.monotonic\(\) \+ (\d+)", hold[2])[1])
    assert gateway_sleep == 7
    assert env(pod["gateway"])["CHATFLEET_SERVER__DRAIN_TIMEOUT_S"] == "45"
    assert hold[:2] == ["python3", "-c"] and engine_hold >= 7 + 45
    assert pod_spec["terminationGracePeriodSeconds"] > engine_hold


@pytest.mark.parametrize(("values", "drain"), [
    ({}, 30 + math.ceil(8192 / 20) + 10),
    ({"engine.vllm.maxModelLen": 32768}, 30 + math.ceil(32768 / 20) + 10),
    ({"gateway.limits.maxTokens": 2048, "engine.vllm.maxModelLen": 2048,
      "gateway.drain.minDecodeTokensPerSecond": 16}, 30 + 2048 // 16 + 10),
    ({**SIM, "gateway.limits.maxTokens": 1000, "gateway.admission.maxQueueWaitSeconds": 5,
      "gateway.drain.marginSeconds": 0}, 5 + 1000 // 20),
])
def test_the_drain_covers_the_longest_answer_the_pod_accepts(values: dict[str, Any],
                                                              drain: int) -> None:
    """Derived (drainTimeoutSeconds null): the longest queue wait, then the longest answer (the
    larger of the max_tokens cap and vLLM's context) at the slowest decode speed, then a margin;
    the grace period covers the preStop sleep, that drain and the engine's last 5 s."""
    docs = render(values)
    pod_spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert env(containers(docs)["gateway"])["CHATFLEET_SERVER__DRAIN_TIMEOUT_S"] == str(drain)
    assert pod_spec["terminationGracePeriodSeconds"] == 5 + drain + 15


def test_notes_say_how_long_a_pod_drains_and_warn_when_a_set_drain_cuts_answers() -> None:
    derived = " ".join(notes().split())
    assert "drains for up to 450 s (grace period 470 s)" in derived
    assert "covers the longest answer it accepts, 8192 tokens at 20 tokens/s" in derived
    assert "gateway.drainTimeoutSeconds" not in derived
    short = " ".join(notes({"gateway.drainTimeoutSeconds": 60}).split())
    assert "drains for up to 60 s (grace period 80 s)" in short
    assert "answers longer than about 600 tokens are cut at scale-down" in short


@pytest.mark.parametrize("engine", ["gpu", "sim"])
def test_every_container_runs_locked_down(engine: str) -> None:
    docs = render(GPU if engine == "gpu" else SIM)
    pod_spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["automountServiceAccountToken"] is False
    for container in pod_spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, f"{container['name']} has no writable /tmp"


def test_helm_test_pod_checks_readiness_and_one_chat_completion() -> None:
    pod = one(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "/readyz" in script and "/v1/chat/completions" in script
    assert "http://chatfleet.llm.svc:80" in script


@pytest.mark.parametrize(("values", "message"), [
    ({"engine.kind": "tpu"}, "/engine/kind"),
    ({"gateway.admision": {"maxQueue": 1}}, "admision"),
    ({"engine.vllm.gpuMemoryUtilization": 1.5}, "gpuMemoryUtilization"),
    ({"autoscaling.mode": "vpa"}, "/autoscaling/mode"),
    ({"engine.vllm.modelCache.size": "50 gigs"}, "/engine/vllm/modelCache/size"),
])
def test_bad_values_are_refused_with_the_path_to_fix(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
