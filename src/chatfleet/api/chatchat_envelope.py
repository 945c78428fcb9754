"""Chatchat 0.3.1.3's answer envelope, ``{"code", "msg", "data"}``, for its routes.

Chatchat answers its knowledge-base routes with HTTP 200 and the real status in ``code`` (404 for
a missing knowledge base, 500 for a failure), and its WebUI and scripts read ``code`` and ``msg``.
ChatFleet keeps that on those routes, on purpose (docs/api.md). Overload and oversize bodies are
the exception: they keep their HTTP status (429/503 with Retry-After, 413), because load balancers,
retry logic and the autoscaling story depend on it; the body is still this envelope.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["CHATCHAT_PREFIXES", "envelope", "error_data", "is_chatchat_path"]

CHATCHAT_PREFIXES = ("/chat/", "/knowledge_base/", "/server/")

_ERROR_DATA: dict[str, Any] = {
    "/knowledge_base/list_files": [],
    "/knowledge_base/upload_temp_docs": {"id": None, "failed_files": []},
}
"""``data`` of an error envelope where Chatchat's clients read into it without checking ``code``:
its WebUI does ``r.get("data", {}).get("id")`` after a temporary upload, so ``null`` there
crashes the page instead of showing that nothing was uploaded."""


def is_chatchat_path(path: str) -> bool:
    return path.startswith(CHATCHAT_PREFIXES)


def error_data(path: str) -> Any:
    """Chatchat's ``data`` on an error answer of the route at ``path``: mostly null."""
    data = _ERROR_DATA.get(path)
    return None if data is None else json.loads(json.dumps(data))  # a copy the caller may change


def envelope(code: int, msg: str, data: Any = None, *, http_status: int = 200,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "msg": msg, "data": data}, status_code=http_status,
                        headers=headers)
