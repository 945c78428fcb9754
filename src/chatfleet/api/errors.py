"""The one mapping from failures to HTTP answers: OpenAI's error envelope, or Chatchat's on its routes.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}`` with a message that
says what was wrong and how to fix it. Overload answers 429 (or 503 while draining) with Retry-After.
Handlers are registered once, by ``install_error_handlers``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatfleet.api.access_log import loggable_path
from chatfleet.api.chatchat_envelope import envelope, error_data, is_chatchat_path
from chatfleet.engines.base import EngineError
from chatfleet.rag.ingest import IngestBusy, IngestStopped
from chatfleet.rag.names import InvalidName
from chatfleet.rag.stores.base import KnowledgeBaseNotFound
from chatfleet.serving.admission import AdmissionRejected
from chatfleet.serving.completions import ROUTES
from chatfleet.serving.openai_format import error_body

__all__ = ["InvalidParameter", "ModelNotFound", "error_response", "install_error_handlers",
           "rejection_response", "validation_message"]

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"The model '{requested}' does not exist here; this deployment serves "
                         f"'{served}' (see GET /v1/models)")


class InvalidParameter(Exception):
    """A request value that passed the schema but breaks a deployment limit (400; 422 on
    Chatchat's routes, as their schema errors)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def error_response(status: int, message: str, *, error_type: str, param: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """OpenAI's error envelope; on Chatchat's routes (``path``) Chatchat's ``{code, msg, data}``
    with the same HTTP status."""
    if is_chatchat_path(path):
        return envelope(status, message, error_data(path), http_status=status, headers=headers)
    return JSONResponse(error_body(message, error_type=error_type, code=status, param=param),
                        status_code=status, headers=headers)


def rejection_response(exc: AdmissionRejected, path: str = "") -> JSONResponse:
    return error_response(exc.status, exc.message, error_type=exc.reason,
                          headers={"Retry-After": str(exc.retry_after_s)}, path=path)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first validation error, and the parameter it names."""
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")), None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in first and first.get("type") not in ("missing",) and not isinstance(first["input"], dict | list):
        msg += f" (got {first['input']!r:.80})"
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text, param


def _count_invalid(request: Request) -> None:
    """Count a completion request refused before admission as outcome=invalid."""
    service = getattr(request.app.state, "completions", None)
    route = request.scope.get("route")
    if service is not None and route is not None and route.path in ROUTES:
        service.record_invalid(route.path)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count_invalid(request)
        message, param = validation_message(exc)
        # Chatchat's routes answer a malformed body with 422, as FastAPI does there.
        status = 422 if is_chatchat_path(request.url.path) else 400
        return error_response(status, message, error_type="invalid_request_error", param=param,
                              path=request.url.path)

    @app.exception_handler(InvalidParameter)
    async def _bad_param(request: Request, exc: InvalidParameter) -> JSONResponse:
        _count_invalid(request)
        # A value over a limit is invalid like one the schema refuses: 422 on Chatchat's routes.
        status = 422 if is_chatchat_path(request.url.path) else 400
        return error_response(status, str(exc), error_type="invalid_request_error",
                              param=exc.param, path=request.url.path)

    @app.exception_handler(ModelNotFound)
    async def _no_model(request: Request, exc: ModelNotFound) -> JSONResponse:
        _count_invalid(request)
        return error_response(404, str(exc), error_type="model_not_found", param="model")

    @app.exception_handler(AdmissionRejected)
    async def _rejected(request: Request, exc: AdmissionRejected) -> JSONResponse:
        return rejection_response(exc, request.url.path)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        headers = {"Retry-After": "5"} if exc.status in (429, 503) else None
        return error_response(exc.status, exc.message, error_type=exc.error_type, headers=headers,
                              path=request.url.path)

    @app.exception_handler(InvalidName)
    async def _bad_kb_name(request: Request, exc: InvalidName) -> JSONResponse:
        return envelope(403, str(exc), error_data(request.url.path))

    @app.exception_handler(KnowledgeBaseNotFound)
    async def _no_kb(request: Request, exc: KnowledgeBaseNotFound) -> JSONResponse:
        return envelope(404, f"未找到知识库 {exc.kb} (knowledge base '{exc.kb}' does not exist; "
                             "see /knowledge_base/list_knowledge_bases)", error_data(request.url.path))

    @app.exception_handler(IngestBusy)
    async def _ingest_busy(request: Request, exc: IngestBusy) -> JSONResponse:
        return envelope(429, str(exc), error_data(request.url.path), http_status=429,
                        headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(IngestStopped)
    async def _ingest_stopped(request: Request, exc: IngestStopped) -> JSONResponse:
        return envelope(503, str(exc), error_data(request.url.path), http_status=503,
                        headers={"Retry-After": str(exc.retry_after_s), "Connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 413: "request_too_large"}
        kind = kinds.get(exc.status_code, "invalid_request_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            message = (f"the request body is not valid JSON: it is not UTF-8 "
                       f"({exc.__cause__.reason} at byte {exc.__cause__.start}); send UTF-8")
        return error_response(exc.status_code, message, error_type=kind,
                              headers=getattr(exc, "headers", None), path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method,
                      loggable_path(request.url.path))
        return error_response(500, "internal error; it was logged", error_type="internal_error",
                              path=request.url.path)
