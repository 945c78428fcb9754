"""API keys (values auth.*): the gateway and the helm test pod get the keys only by reference to an
existing Secret, the rate limit reaches the gateway as its settings, bad values are refused with
the fix, and NOTES say whether keys are on."""

from __future__ import annotations

import os
from typing import Any

import pytest

from chatfleet.settings import Settings
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
from tests.chart.test_chart import SIM

AUTH = {"auth.existingSecret": "chatfleet-api-keys"}
RATE = {**AUTH, "auth.rateLimit.requestsPerSecond": 2.5, "auth.rateLimit.burst": 40}


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "valueFrom" in e}


def auth_env(container: dict[str, Any]) -> dict[str, str | None]:
    return {k: v for k, v in env(container).items()
            if k == "CHATFLEET_API_KEYS" or k.startswith("CHATFLEET_AUTH__")}


def test_without_a_secret_the_gateway_gets_no_keys_and_no_rate_limit() -> None:
    docs = render(SIM)
    gateway = containers(docs)["gateway"]
    assert auth_env(gateway) == {}
    assert secret_refs(gateway) == {}
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    assert "env" not in test_pod
    annotations = one(docs, "Deployment")["metadata"]["annotations"]
    assert "checkov.io/skip5" not in annotations


def test_the_keys_come_from_the_existing_secret_by_reference() -> None:
    docs = render({**SIM, **AUTH, "auth.secretKey": "keys"})
    gateway = containers(docs)["gateway"]
    assert secret_refs(gateway) == {"CHATFLEET_API_KEYS": {"name": "chatfleet-api-keys", "key": "keys"}}
    assert auth_env(gateway) == {"CHATFLEET_API_KEYS": None}, "no rate limit unless asked"
    assert "Secret" not in by_kind(docs), "the chart never makes a Secret holding keys"
    annotations = one(docs, "Deployment")["metadata"]["annotations"]
    assert "CHATFLEET_API_KEYS" in annotations["checkov.io/skip5"]


def test_the_helm_test_pod_authenticates_with_the_same_secret() -> None:
    pod = one(render({**SIM, **AUTH}), "Pod")
    check = pod["spec"]["containers"][0]
    assert secret_refs(check) == {"CHATFLEET_API_KEYS": {"name": "chatfleet-api-keys", "key": "api-keys"}}
    script = check["args"][0]
    assert 'headers["Authorization"] = "Bearer " + keys[0]' in script
    assert "CKV_K8S_35" in pod["metadata"]["annotations"]["checkov.io/skip6"]


def test_the_rate_limit_reaches_the_gateway_as_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = containers(render({**SIM, **RATE}))["gateway"]
    assert auth_env(gateway) == {"CHATFLEET_API_KEYS": None, "CHATFLEET_AUTH__RATE_LIMIT_RPS": "2.5",
                                 "CHATFLEET_AUTH__RATE_LIMIT_BURST": "40"}
    for key in [k for k in os.environ if k.startswith("CHATFLEET_")]:
        monkeypatch.delenv(key)
    for name, value in env(gateway).items():
        monkeypatch.setenv(name, "key-one,key-two" if name == "CHATFLEET_API_KEYS" else value)
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-one", "key-two"]
    assert settings.auth.rate_limit_rps == 2.5 and settings.auth.rate_limit_burst == 40


@pytest.mark.parametrize(("values", "message"), [
    ({"auth.rateLimit.requestsPerSecond": 5},
     "auth.rateLimit.requestsPerSecond is set but auth.existingSecret is empty"),
    ({"auth.apiKeys": "sk-1"}, "'apiKeys' not allowed"),
    ({**AUTH, "auth.rateLimit.requestsPerSecond": -1}, "/auth/rateLimit/requestsPerSecond"),
    ({**AUTH, "auth.rateLimit.burst": 0}, "/auth/rateLimit/burst"),
    ({**AUTH, "auth.secretKey": ""}, "/auth/secretKey"),
], ids=["rate-without-keys", "plaintext-keys", "negative-rate", "zero-burst", "empty-secret-key"])
def test_bad_auth_values_are_refused_with_what_to_fix(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    if "existingSecret is empty" in message:
        assert "kubectl create secret generic chatfleet-api-keys --from-literal=api-keys=" in result.stderr


def test_notes_say_whether_keys_are_required() -> None:
    off = notes(SIM)
    assert "API keys: off." in off and "Authorization: Bearer" not in off
    on = notes({**SIM, **RATE})
    assert "API keys: required on every API route (Authorization: Bearer <key>)" in on
    assert "Each key may send 2.5 requests/s (bursts of 40) to each gateway pod" in on
    assert "get secret chatfleet-api-keys -o jsonpath='{.data.api-keys}'" in on
    assert '-H "Authorization: Bearer $KEY"' in on
