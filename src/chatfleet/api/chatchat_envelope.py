"""Chatchat 0.3.1.3's answer envelope, ``{"code", "msg", "data"}``, for its routes.

Chatchat answers its knowledge-base routes with HTTP 200 and the real status in ``code`` (404 for
a missing knowledge base, 500 for a failure), and its WebUI and scripts read ``code`` and ``msg``.
ChatFleet keeps that on those routes, on purpose (docs/api.md). Overload and oversize bodies are
the exception: they keep their HTTP status (429/503 with Retry-After, 413), because load balancers,
retry logic and the autoscaling story depend on it; the body is still this envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["CHATCHAT_PREFIXES", "envelope", "is_chatchat_path"]

CHATCHAT_PREFIXES = ("/chat/", "/knowledge_base/", "/server/")


def is_chatchat_path(path: str) -> bool:
    return path.startswith(CHATCHAT_PREFIXES)


def envelope(code: int, msg: str, data: Any = None, *, http_status: int = 200,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "msg": msg, "data": data}, status_code=http_status,
                        headers=headers)
