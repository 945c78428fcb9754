"""Response declarations for /openapi.json, where FastAPI cannot derive them from a route.

Routes answer ``Response`` objects (JSON, an SSE stream when the body asks for one, a file, the
Prometheus text), so each declares its answers with ``responses=``, built from these helpers:
``json_content`` and ``json_schema`` (one model or a choice of models), ``sse_content`` (an event stream whose events
carry JSON payloads, in the ``itemSchema`` form FastAPI uses for its own SSE routes, so a client
or a fuzzer can check each event), ``RETRY_AFTER`` (the header on 429 and 503), and
``chatchat_errors`` (the HTTP errors of Chatchat's routes, in its envelope).

``install_openapi(app)`` adds what those declarations refer to: the models named only inside
content (stream payloads, choices of models) become components, and FastAPI's default 422
(``HTTPValidationError``) goes, because no route answers it: the OpenAI routes answer a malformed
body with 400 and OpenAI's envelope, the Chatchat routes with 422 and Chatchat's, as declared.
With API keys on, it also declares the bearer scheme and every protected operation's 401 (and
429 per key when keys are rate-limited).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chatfleet.api.auth import PUBLIC_PATHS
from chatfleet.api.chatchat_envelope import is_chatchat_path
from chatfleet.api.chatchat_schemas import ChatchatEnvelope
from chatfleet.api.schemas import ErrorResponse

__all__ = ["RETRY_AFTER", "chatchat_errors", "install_openapi", "json_content", "json_schema",
           "sse_content"]

_REF_TEMPLATE = "#/components/schemas/{model}"
_COMPONENTS: dict[str, type[BaseModel]] = {}
"""Models referred to by name from hand-written content; ``install_openapi`` defines them."""

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before sending the request again",
                               "required": True, "schema": {"type": "integer", "minimum": 0}}}

_CHATCHAT_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "The body could not be read (JSON that is not UTF-8, malformed multipart)"},
    413: {"description": "Body over limits.max_body_bytes (kb.max_upload_bytes for uploads)"},
    422: {"description": "The request fails the schema or a deployment limit; msg names the field"},
    429: {"description": "Overloaded (queue full or waited too long, or too many uploads waiting)",
          "headers": RETRY_AFTER},
    502: {"description": "The engine failed the request before the stream started"},
    503: {"description": "Draining, or the engine is unavailable", "headers": RETRY_AFTER},
}
"""Where Chatchat's routes answer an HTTP error (docs/api.md): the body is its envelope."""


def chatchat_errors(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these HTTP errors of a Chatchat route; ``descriptions`` (keyed
    ``_400`` and so on) replace the general ones."""
    return {status: {**_CHATCHAT_ERRORS[status], "model": ChatchatEnvelope,
                     **({"description": descriptions[f"_{status}"]}
                        if f"_{status}" in descriptions else {})}
            for status in statuses}


def json_schema(*choices: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    """A reference to one model (or a schema as it is), or ``anyOf`` several."""
    schemas = []
    for choice in choices:
        if isinstance(choice, dict):
            schemas.append(choice)
        else:
            _COMPONENTS[choice.__name__] = choice
            schemas.append({"$ref": _REF_TEMPLATE.format(model=choice.__name__)})
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def json_content(*choices: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    """``content`` of a JSON answer that is one of ``choices`` (models or JSON schemas)."""
    return {"application/json": {"schema": json_schema(*choices)}}


def sse_content(*payloads: type[BaseModel], done: bool = False) -> dict[str, Any]:
    """``content`` of a text/event-stream answer: each event's ``data`` is the JSON of one of
    ``payloads`` (or, with ``done``, the literal ``[DONE]`` that ends OpenAI streams). Comment
    lines (heartbeats of a queued stream) are no events."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": json_schema(*payloads)}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer", "minimum": 0}}}
    return {"text/event-stream": {"itemSchema": event}}


def _declare_api_keys(document: dict[str, Any], *, rate_limited: bool) -> None:
    """With API keys on: a bearer security scheme (the docs page's "Authorize" button), required
    by every operation but the public ones, which may then answer 401 (and 429 per key or per
    address that sent wrong keys)."""
    document.setdefault("components", {})["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer",
                   "description": "An API key of this deployment (CHATFLEET_API_KEYS)"}}
    for path, path_item in document.get("paths", {}).items():
        if path in PUBLIC_PATHS:
            continue
        model = ChatchatEnvelope if is_chatchat_path(path) else ErrorResponse
        for operation in path_item.values():
            operation["security"] = [{"apiKey": []}]
            responses = operation.setdefault("responses", {})
            responses["401"] = {"description": "No API key, or one this deployment does not accept",
                                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                                "content": json_content(model)}
            if rate_limited:
                responses.setdefault("429", {"description": "This API key is over its request rate, "
                                             "or this address sent too many wrong keys",
                                             "headers": RETRY_AFTER, "content": json_content(model)})


def install_openapi(app: FastAPI, *, api_keys: bool = False, rate_limited: bool = False) -> None:
    """Make ``app.openapi()`` complete the generated document as the module docstring says, and
    declare the API keys when they are on."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        components = document.setdefault("components", {}).setdefault("schemas", {})
        _, definitions = models_json_schema(
            [(model, "serialization") for model in _COMPONENTS.values()],
            ref_template=_REF_TEMPLATE)
        for name, schema in definitions.get("$defs", {}).items():
            components.setdefault(name, schema)
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.get("responses", {})
                default = responses.get("422", {}).get("content", {}).get("application/json", {})
                if default.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
        if "/HTTPValidationError" not in json.dumps(document.get("paths", {})):
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
        if api_keys:
            _declare_api_keys(document, rate_limited=rate_limited)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
