"""A CRD's schema applied as an API server applies it, for tests (the ChatFleetPolicy CRD's by
default; the vendored InferencePool and HTTPRoute CRDs for the chart's routing objects): the OpenAPI
v3 schema (with nullable, and unknown fields refused as ``kubectl apply``'s strict field
validation refuses them) through jsonschema, then its ``x-kubernetes-validations`` CEL rules
through a CEL interpreter (cel-python)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import yaml
from jsonschema import Draft4Validator

ROOT = Path(__file__).parents[2]
CRD_FILE = ROOT / "charts" / "chatfleet" / "crds" / "chatfleetpolicies.chatfleet.io.yaml"
EXAMPLE_FILE = ROOT / "hpa" / "chatfleetpolicy.yaml"


def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return doc


def openapi_schema(path: Path = CRD_FILE) -> dict[str, Any]:
    """The openAPIV3Schema of the one version the CRD file at ``path`` holds (default: the
    ChatFleetPolicy CRD; tests/fixtures/crds/ holds vendored ones of other projects)."""
    (version,) = yaml.safe_load(path.read_text())["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAPI v3.0 schema as JSON Schema draft 4 (whose boolean ``exclusiveMinimum`` is
    OpenAPI 3.0's): ``nullable`` becomes a null type; an object that lists its properties and
    does not preserve unknown fields refuses others. ``x-kubernetes-*`` keys are left in (draft 4
    ignores them)."""
    out = {key: value for key, value in node.items() if key not in ("properties", "items")}
    if "properties" in node:
        out["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in node:
        out["items"] = json_schema(node["items"])
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


@cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_rules(schema: Mapping[str, Any], value: Any, path: str) -> Iterator[str]:
    """The messages of the CEL rules ``value`` breaks, at every level of ``schema``."""
    for check in schema.get("x-kubernetes-validations", []):
        result = _program(check["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        if not bool(result):
            yield f"{path}: {check.get('message', check['rule'])}"
    if isinstance(value, Mapping):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from _cel_rules(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _cel_rules(schema["items"], item, f"{path}[{i}]")


def problems(obj: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    """Why the API server would refuse ``obj`` (a whole ChatFleetPolicy, or what ``schema``
    describes: a part of one, or another CRD's object); empty when it would store it."""
    schema = schema if schema is not None else openapi_schema()
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in Draft4Validator(json_schema(schema)).iter_errors(obj)]
    if errors:  # the rules run only on objects of the right shape, as the API server's do
        return errors
    return list(_cel_rules(schema, obj, "<root>"))


def status_problems(status: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse (or prune) a status the operator writes."""
    return problems(status, openapi_schema()["properties"]["status"])
