"""The ChatFleetPolicy CRD (charts/chatfleet/crds/) and its example (hpa/chatfleetpolicy.yaml):
the CRD is a valid apiextensions.k8s.io/v1 object; its schema takes the example and refuses
what it can (checked as an API server checks: OpenAPI schema, then CEL rules); its defaults
are the operator's."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from chatfleet.autoscale.operator import GROUP, PLURAL, VERSION, parse_policy
from tests.support.crd import CRD_FILE, EXAMPLE_FILE, crd, openapi_schema, problems
from tests.support.tools import tool_path


def example() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE_FILE.read_text())
    return doc


def test_the_crd_is_valid_and_names_what_the_operator_watches() -> None:
    result = subprocess.run([tool_path("kubernetes-validate"), "--strict", str(CRD_FILE)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource" in result.stdout
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert (spec["group"], spec["names"]["plural"], spec["scope"]) == (GROUP, PLURAL, "Namespaced")
    (version,) = spec["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}, "the operator patches /status"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Mode"] == ".spec.mode" and columns["Floor"] == ".status.floor"
    assert columns["Target"] == ".spec.targetRef.name"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'


def test_the_example_is_accepted_and_the_operator_can_act_on_it() -> None:
    doc = example()
    assert (doc["apiVersion"], doc["kind"]) == (f"{GROUP}/{VERSION}", "ChatFleetPolicy")
    assert problems(doc) == []
    parsed = parse_policy(doc["spec"])
    assert parsed.mode == "recommend", "the example starts in recommend mode"
    assert parsed.target.kind == "HorizontalPodAutoscaler" and parsed.target_name == "chatfleet"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return change


_DELETE = object()


@pytest.mark.parametrize(("change", "message"), [
    (_set("minReplicas", 9), "minReplicas must not be greater than maxReplicas"),
    (_set("targetRef", _DELETE), "'targetRef' is a required property"),
    (_set("targetRef.kind", "Deployment"), "is not one of ['HorizontalPodAutoscaler', 'ScaledObject']"),
    (_set("targetRef.name", ""), "should be non-empty"),
    (_set("mode", "auto"), "'auto' is not one of ['recommend', 'enforce']"),
    (_set("minReplicas", 0), "less than the minimum of 1"),
    (_set("maxReplicas", 2.5), "is not of type 'integer'"),
    (_set("replicaCapacity", 0), "less than or equal to the minimum of 0"),
    (_set("targetUtilization", 1.5), "greater than the maximum of 1"),
    (_set("coldStartSeconds", -1), "less than the minimum of 0"),
    (_set("slo.attainment", 0), "less than or equal to the minimum of 0"),
    (_set("slo.ttftSeconds", "2s"), "is not of type 'number'"),
    (_set("replicas", 3), "'replicas' was unexpected"),
], ids=["min-over-max", "no-target", "deployment-target", "empty-name", "unknown-mode",
        "zero-min", "fractional-max", "zero-capacity", "utilization-over-1", "negative-cold-start",
        "zero-attainment", "ttft-as-string", "unknown-field"])
def test_bad_policies_are_refused_by_the_schema(change: Callable[[dict[str, Any]], None],
                                                message: str) -> None:
    doc = example()
    change(doc["spec"])
    found = problems(doc)
    assert len(found) == 1 and message in found[0], found


def test_the_crd_defaults_are_the_operators() -> None:
    """A policy with only the required fields means the same to the API server (which fills the
    schema's defaults in) and to the operator (which fills its own, for objects stored before)."""
    properties = openapi_schema()["properties"]["spec"]["properties"]
    minimal = {key: example()["spec"][key]
               for key in openapi_schema()["properties"]["spec"]["required"]}
    defaulted = copy.deepcopy(minimal)
    for key, schema in properties.items():
        if "default" in schema:
            defaulted[key] = schema["default"]
    defaulted["slo"] = {key: schema["default"]
                        for key, schema in properties["slo"]["properties"].items()}
    assert problems({**example(), "spec": minimal}) == []
    assert parse_policy(minimal) == parse_policy(defaulted)
