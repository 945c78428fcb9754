"""How ``download_doc`` answers with a stored file: never as a page of the gateway's own origin.

An uploaded ``.html`` (or ``.md``, whose viewer might render it) served inline as ``text/html``
would run its scripts on the API's origin: stored cross-site scripting against anyone who opens a
reference link. So:

- ``preview=true``: text files (txt, md, csv, html, htm) are shown as what they are, text:
  ``text/plain; charset=utf-8``, inline. PDFs are shown inline as ``application/pdf`` by the
  browser's own viewer (its scripts, if any, run in that viewer's sandbox, not in a page of this
  origin). Anything else (docx) is an attachment even in a preview: browsers cannot show it.
- ``preview=false`` (Chatchat's default, and what kb_chat's reference links ask for): an
  attachment, typed by the file's extension.
- Always ``X-Content-Type-Options: nosniff`` (no browser second-guesses the type) and, but on a
  PDF preview, ``Content-Security-Policy: sandbox; default-src 'none'``: should a browser render
  the bytes anyway, the document has a unique origin and may run and load nothing. (A PDF cannot
  have it: Chromium's viewer is an embedded plugin, which a sandboxed document may not load.)
- ``Content-Disposition`` as RFC 6266 says: an ASCII ``filename`` for old clients, the real name
  in ``filename*=UTF-8''...``, percent-encoded, so no name can end or add to the header.
"""

from __future__ import annotations

import mimetypes
from pathlib import PurePosixPath
from urllib.parse import quote

from starlette.responses import Response

__all__ = ["SANDBOX_CSP", "content_disposition", "stored_file_response"]

SANDBOX_CSP = "sandbox; default-src 'none'"
"""A document with a unique, opaque origin that may run no script and load nothing."""

_TEXT_PREVIEWS = frozenset({".txt", ".md", ".csv", ".html", ".htm"})
_PDF = ".pdf"


def _ascii_fallback(name: str) -> str:
    """``name`` with what may not stand in a quoted ASCII header parameter replaced by ``_``."""
    return "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)


def content_disposition(kind: str, name: str) -> str:
    """``kind`` (``inline`` or ``attachment``) with the file name twice, as RFC 6266 (section 4.3)
    recommends: ``filename`` in ASCII, then ``filename*`` with the name in UTF-8."""
    return f"{kind}; filename=\"{_ascii_fallback(name)}\"; filename*=UTF-8''{quote(name, safe='')}"


def stored_file_response(name: str, content: bytes, *, preview: bool) -> Response:
    """The answer that serves ``content``, stored under ``name``, as the module docstring says."""
    extension = PurePosixPath(name).suffix.lower()
    headers = {"X-Content-Type-Options": "nosniff"}
    if preview and extension in _TEXT_PREVIEWS:
        media_type, kind = "text/plain; charset=utf-8", "inline"
    elif preview and extension == _PDF:
        media_type, kind = "application/pdf", "inline"
    else:
        media_type, kind = mimetypes.guess_type(name)[0] or "application/octet-stream", "attachment"
    if media_type != "application/pdf" or kind == "attachment":
        headers["Content-Security-Policy"] = SANDBOX_CSP
    headers["Content-Disposition"] = content_disposition(kind, name)
    return Response(content, media_type=media_type, headers=headers)
