"""Knowledge bases (values knowledgeBase.*): what the gateway container gets for each store, the
volume of the local store, secrets only by reference, refusals with the fix, and NOTES warnings."""

from __future__ import annotations

import os
from typing import Any

import pytest

from chatfleet.settings import KnowledgeSettings, Settings
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
from tests.chart.test_chart import (
    KB_CLAIM,
    KB_EMBEDDINGS,
    KB_EMBEDDINGS_KEY,
    KB_EXISTING_CLAIM,
    KB_PGVECTOR,
    SIM,
)

DATA_DIR = "/var/lib/chatfleet/kb"
PGVECTOR_NO_SECRET = ("knowledgeBase.store is pgvector but knowledgeBase.pgvector.existingSecret is "
                      "empty: create a Secret holding the DSN (kubectl create secret generic "
                      "chatfleet-pg --from-literal=dsn=postgresql://")
LOST = "knowledgeBase.local.persistence.enabled is false"


def gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return containers(docs)["gateway"]


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}


def pod_volumes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}


def kb_claims(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    claims = by_kind(docs).get("PersistentVolumeClaim", [])
    return [d for d in claims if d["metadata"]["name"].endswith("-kb")]


def test_local_store_by_default_writes_to_a_claim_at_its_data_dir() -> None:
    docs = render(SIM)
    container = gateway(docs)
    kb_env = {k: v for k, v in env(container).items() if k.startswith("CHATFLEET_KB__")}
    assert kb_env == {
        "CHATFLEET_KB__STORE": "local", "CHATFLEET_KB__DATA_DIR": DATA_DIR,
        "CHATFLEET_KB__CHUNK_SIZE": "750", "CHATFLEET_KB__CHUNK_OVERLAP": "150",
        "CHATFLEET_KB__TOP_K": "3", "CHATFLEET_KB__SCORE_THRESHOLD": "2",
        "CHATFLEET_KB__MAX_UPLOAD_BYTES": "67108864", "CHATFLEET_KB__INGEST_WORKERS": "1",
        "CHATFLEET_KB__MAX_QUEUED_UPLOADS": "16", "CHATFLEET_KB__TEMP_TTL_S": "3600",
        "CHATFLEET_KB__MAX_TEMP_KBS": "100", "CHATFLEET_KB__MAX_FILE_TEXT_CHARS": "20000000",
        "CHATFLEET_KB__MAX_FILE_CHUNKS": "50000", "CHATFLEET_KB__MAX_KB_CHUNKS": "1000000",
        "CHATFLEET_KB__MAX_PARSE_S": "120"}, (
        "no embeddings env: BM25-only retrieval")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[DATA_DIR]["name"] == "kb-data" and not mounts[DATA_DIR].get("readOnly")
    assert pod_volumes(docs)["kb-data"] == {"name": "kb-data",
                                            "persistentVolumeClaim": {"claimName": "chatfleet-kb"}}
    (claim,) = kb_claims(docs)
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}, (
        "ReadWriteOnce on the default StorageClass: binds on a typical cluster")
    assert DATA_DIR not in {m["mountPath"] for m in containers(docs)["engine"]["volumeMounts"]}


def test_local_persistence_mounts_a_claim_the_chart_keeps() -> None:
    docs = render({**SIM, **KB_CLAIM, "knowledgeBase.local.persistence.size": "20Gi",
                   "knowledgeBase.local.mountPath": "/data/kb"})
    (claim,) = kb_claims(docs)
    assert claim["metadata"]["name"] == "chatfleet-kb"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                             "resources": {"requests": {"storage": "20Gi"}}}
    assert pod_volumes(docs)["kb-data"]["persistentVolumeClaim"] == {"claimName": "chatfleet-kb"}
    container = gateway(docs)
    assert env(container)["CHATFLEET_KB__DATA_DIR"] == "/data/kb"
    assert {"name": "kb-data", "mountPath": "/data/kb"} in container["volumeMounts"]


def test_an_existing_claim_is_mounted_not_created() -> None:
    docs = render({**SIM, **KB_EXISTING_CLAIM})
    assert not kb_claims(docs)
    assert pod_volumes(docs)["kb-data"]["persistentVolumeClaim"] == {"claimName": "kb-data"}


@pytest.mark.parametrize("values", [
    {**KB_CLAIM, "knowledgeBase.local.persistence.enabled": False},
    {**KB_CLAIM, **KB_PGVECTOR},
], ids=["persistence-off", "pgvector"])
def test_the_kb_claim_renders_only_with_local_persistence(values: dict[str, Any]) -> None:
    assert not kb_claims(render({**SIM, **values}))


def test_pgvector_takes_the_dsn_from_the_existing_secret_and_mounts_nothing() -> None:
    docs = render({**SIM, **KB_PGVECTOR, "knowledgeBase.pgvector.secretKey": "uri",
                   "knowledgeBase.pgvector.poolSize": 25})
    container = gateway(docs)
    assert secret_refs(container) == {"CHATFLEET_KB__PG_DSN": {"name": "chatfleet-pg", "key": "uri"}}
    values = env(container)
    assert values["CHATFLEET_KB__STORE"] == "pgvector"
    assert values["CHATFLEET_KB__PG_POOL_SIZE"] == "25"
    assert "CHATFLEET_KB__DATA_DIR" not in values
    assert "kb-data" not in pod_volumes(docs)
    assert "kb-data" not in {m["name"] for m in container["volumeMounts"]}
    assert "Secret" not in by_kind(docs), "the chart never makes a Secret holding the DSN"


def test_embeddings_reach_the_gateway_with_the_api_key_by_reference() -> None:
    container = gateway(render({**SIM, **KB_PGVECTOR, **KB_EMBEDDINGS_KEY,
                                "knowledgeBase.embeddings.batchSize": 128}))
    values = env(container)
    assert values["CHATFLEET_KB__EMBEDDINGS__URL"] == "http://embeddings.llm.svc:8080/v1"
    assert values["CHATFLEET_KB__EMBEDDINGS__MODEL"] == "BAAI/bge-m3"
    assert values["CHATFLEET_KB__EMBEDDINGS__BATCH_SIZE"] == "128"
    assert secret_refs(container) == {
        "CHATFLEET_KB__PG_DSN": {"name": "chatfleet-pg", "key": "dsn"},
        "CHATFLEET_KB__EMBEDDINGS__API_KEY": {"name": "embeddings-key", "key": "api-key"}}
    keyless = gateway(render({**SIM, **KB_EMBEDDINGS}))
    assert "CHATFLEET_KB__EMBEDDINGS__API_KEY" not in env(keyless) and not secret_refs(keyless)


@pytest.mark.parametrize("values", [
    {},
    {**KB_CLAIM, **KB_EMBEDDINGS, "knowledgeBase.chunkSize": 2000, "knowledgeBase.chunkOverlap": 0,
     "knowledgeBase.topK": 10, "knowledgeBase.scoreThreshold": 0.5,
     "knowledgeBase.maxUploadBytes": 1073741824},
    {**KB_PGVECTOR, **KB_EMBEDDINGS_KEY},
], ids=["defaults", "local-tuned", "pgvector-embeddings"])
def test_the_gateway_accepts_every_kb_variable_the_chart_sets(values: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CHATFLEET_KB__* name is a field of KnowledgeSettings (nested models ignore unknown
    keys, so a typo would be silently dropped) and the whole env validates as the gateway's
    Settings, secrets standing in for their Secrets."""
    container = gateway(render({**SIM, **values}))
    for name in (e["name"] for e in container["env"] if e["name"].startswith("CHATFLEET_KB__")):
        model: Any = KnowledgeSettings
        for part in name.removeprefix("CHATFLEET_KB__").lower().split("__"):
            assert part in model.model_fields, f"{name}: no field {part!r} in {model.__name__}"
            model = model.model_fields[part].annotation
    for key in [k for k in os.environ if k.startswith("CHATFLEET_")]:
        monkeypatch.delenv(key)
    refs = secret_refs(container)
    for name, value in env(container).items():
        monkeypatch.setenv(name, "postgresql://u:p@db:5432/kb" if name.endswith("PG_DSN")
                           else "sk-test" if name in refs else value)
    kb = Settings().kb
    assert kb.store.value == env(container)["CHATFLEET_KB__STORE"]
    assert kb.max_upload_bytes == int(env(container)["CHATFLEET_KB__MAX_UPLOAD_BYTES"])
    assert kb.score_threshold == float(env(container)["CHATFLEET_KB__SCORE_THRESHOLD"])


def test_model_aliases_reach_the_gateway_as_one_list_it_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert "CHATFLEET_ENGINE__MODEL_ALIASES" not in env(gateway(render(SIM)))
    docs = render({**SIM, "gateway.modelAliases": ["glm4-chat", "qwen:7b"]})
    value = env(gateway(docs))["CHATFLEET_ENGINE__MODEL_ALIASES"]
    assert value == "glm4-chat,qwen:7b"
    monkeypatch.setenv("CHATFLEET_ENGINE__MODEL_ALIASES", value)
    assert Settings().engine.model_aliases == ["glm4-chat", "qwen:7b"]


@pytest.mark.parametrize("binary", ["helm", "helm3"])
def test_pgvector_without_a_secret_fails_with_the_fix(binary: str) -> None:
    result = helm("template", "x", str(CHART), *set_args({"knowledgeBase.store": "pgvector"}), binary=binary)
    assert result.returncode != 0
    assert PGVECTOR_NO_SECRET in result.stderr, result.stderr
    assert "knowledgeBase.pgvector.existingSecret=chatfleet-pg" in result.stderr


@pytest.mark.parametrize(("values", "message"), [
    ({"knowledgeBase.chunkOverlap": 750},
     "knowledgeBase.chunkOverlap (750) must be smaller than knowledgeBase.chunkSize (750)"),
    ({"knowledgeBase.embeddings.url": "http://e/v1"}, "knowledgeBase.embeddings.model is empty"),
    ({"knowledgeBase.store": "chroma"}, "/knowledgeBase/store"),
    ({"knowledgeBase.pgvector.dsn": "postgresql://u:p@db/kb"}, "'dsn' not allowed"),
    ({"knowledgeBase.pgvector.poolSize": 0}, "/knowledgeBase/pgvector/poolSize"),
    ({"knowledgeBase.topK": 0}, "/knowledgeBase/topK"),
    ({"knowledgeBase.scoreThreshold": 2.5}, "/knowledgeBase/scoreThreshold"),
    ({"knowledgeBase.chunkSize": 10}, "/knowledgeBase/chunkSize"),
    ({"knowledgeBase.maxUploadBytes": 100}, "/knowledgeBase/maxUploadBytes"),
    ({"knowledgeBase.embeddings.url": "embeddings:8080"}, "/knowledgeBase/embeddings/url"),
    ({"knowledgeBase.local.persistence.size": "20 gigs"}, "/knowledgeBase/local/persistence/size"),
    ({"knowledgeBase.local.mountPath": "data"}, "/knowledgeBase/local/mountPath"),
], ids=["overlap", "url-without-model", "store", "plaintext-dsn", "pool", "topk", "threshold",
        "chunk", "upload", "url", "size", "mount"])
def test_bad_kb_values_are_refused_with_what_to_fix(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


PER_POD = {"knowledgeBase.local.perPodStores": True, "knowledgeBase.local.persistence.enabled": False}


@pytest.mark.parametrize(("values", "pods", "value"), [
    ({"autoscaling.maxReplicas": 8}, 8, "autoscaling.maxReplicas"),
    ({"autoscaling.mode": "keda", "autoscaling.maxReplicas": 3, **KB_CLAIM}, 3, "autoscaling.maxReplicas"),
    ({"autoscaling.mode": "none", "replicaCount": 2}, 2, "replicaCount"),
], ids=["hpa-eight", "keda-claim", "none-two"])
@pytest.mark.parametrize("binary", ["helm", "helm3"])
def test_a_local_kb_with_several_pods_fails_at_render_with_the_fix(values: dict[str, Any], pods: int,
                                                                   value: str, binary: str) -> None:
    """Each pod would keep its own knowledge bases: `helm install` refuses, naming what to set."""
    result = helm("template", "x", str(CHART), *set_args({**SIM, **values}), binary=binary)
    assert result.returncode != 0
    assert (f"knowledgeBase.store is local but up to {pods} gateway pods may run ({value}={pods})"
            in result.stderr), result.stderr
    for fix in ("--from-literal=dsn=postgresql://", "knowledgeBase.store=pgvector",
                "knowledgeBase.pgvector.existingSecret=chatfleet-pg", f"({value}=1)",
                "knowledgeBase.local.perPodStores=true"):
        assert fix in result.stderr, fix


def test_per_pod_stores_render_an_emptydir_each_and_notes_warn() -> None:
    values = {**SIM, "autoscaling.maxReplicas": 4, **PER_POD}
    docs = render(values)
    assert pod_volumes(docs)["kb-data"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert not kb_claims(docs)
    text = notes(values)
    assert "WARNING: knowledgeBase.local.perPodStores is true and up to 4 gateway pods may run" in text
    assert "invisible to the others" in text
    assert ("--set knowledgeBase.store=pgvector "
            "--set knowledgeBase.pgvector.existingSecret=chatfleet-pg") in text


def test_per_pod_stores_on_one_shared_claim_fail() -> None:
    result = helm("template", "x", str(CHART), *set_args({
        **SIM, "autoscaling.maxReplicas": 4, "knowledgeBase.local.perPodStores": True}))
    assert result.returncode != 0
    assert "knowledgeBase.local.persistence.enabled=false" in result.stderr, result.stderr


@pytest.mark.parametrize("values", [
    {"autoscaling.mode": "none", "replicaCount": 1, **KB_CLAIM},
    {"autoscaling.maxReplicas": 1, **KB_CLAIM},
    {**KB_PGVECTOR, **KB_EMBEDDINGS},
], ids=["none-one", "hpa-max-one", "pgvector"])
def test_notes_stay_quiet_when_kbs_are_shared_or_one_pod_runs(values: dict[str, Any]) -> None:
    text = notes({**SIM, **values})
    assert "WARNING" not in text, text


def test_notes_warn_that_an_emptydir_loses_the_kbs() -> None:
    text = notes({**SIM, "autoscaling.mode": "none", "knowledgeBase.local.persistence.enabled": False})
    assert "perPodStores" not in text
    assert f"WARNING: {LOST}" in text and "LOST whenever a pod restarts" in text
    assert "Retrieval: lexical only (BM25): knowledgeBase.embeddings.url is not set" in text


def test_notes_say_how_retrieval_works() -> None:
    assert "Retrieval: lexical only (PostgreSQL full-text search)" in notes({**SIM, **KB_PGVECTOR})
    text = notes({**SIM, **KB_PGVECTOR, **KB_EMBEDDINGS})
    assert "Retrieval: hybrid, embeddings from BAAI/bge-m3 at http://embeddings.llm.svc:8080/v1" in text
