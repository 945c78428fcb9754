"""download_doc's answers (api/file_responses.py): what is inline, as what type, with which
headers, for each kind of stored file; and the RFC 6266 file name."""

from __future__ import annotations

import pytest

from chatfleet.api.file_responses import (
    SANDBOX_CSP,
    content_disposition,
    stored_file_response,
)

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@pytest.mark.parametrize(("name", "preview", "media_type", "kind", "sandboxed"), [
    ("a.html", True, "text/plain; charset=utf-8", "inline", True),
    ("a.HTM", True, "text/plain; charset=utf-8", "inline", True),
    ("a.md", True, "text/plain; charset=utf-8", "inline", True),
    ("a.csv", True, "text/plain; charset=utf-8", "inline", True),
    ("a.txt", True, "text/plain; charset=utf-8", "inline", True),
    ("a.pdf", True, "application/pdf", "inline", False),  # the browser's PDF viewer needs it
    ("a.docx", True, DOCX, "attachment", True),  # no browser shows it: downloaded
    ("a.html", False, "text/html; charset=utf-8", "attachment", True),
    ("a.pdf", False, "application/pdf", "attachment", True),
])
def test_a_stored_file_is_never_served_as_an_active_page(
        name: str, preview: bool, media_type: str, kind: str, sandboxed: bool) -> None:
    response = stored_file_response(name, b"<script>alert(1)</script>", preview=preview)
    assert response.headers["content-type"] == media_type
    assert response.headers["content-disposition"].startswith(f"{kind}; ")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers.get("content-security-policy") == (SANDBOX_CSP if sandboxed else None)
    assert response.body == b"<script>alert(1)</script>"


def test_the_name_is_given_in_ascii_and_in_utf8_and_cannot_break_the_header() -> None:
    assert content_disposition("attachment", 'a "b"\\c;%\r\n报告.txt') == (
        "attachment; filename=\"a _b__c;_____.txt\"; "
        "filename*=UTF-8''a%20%22b%22%5Cc%3B%25%0D%0A%E6%8A%A5%E5%91%8A.txt")
