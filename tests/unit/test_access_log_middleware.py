"""AccessLog around small ASGI apps: what it logs for answers, failures and odd paths, and the
request id it adds. (The real gateway's lines: tests/integration/test_access_log.py.)"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from chatfleet.api.access_log import AccessLog
from chatfleet.logs import FIELDS


def scope(path: str, method: str = "GET") -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"",
            "state": {}}


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"r-1")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def answer_without_id(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def fail(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("boom")


async def wait_for_client(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()  # the client leaves while the request waits


async def run(app: Any, request: Scope, incoming: list[Message] | None = None) -> list[Message]:
    sent: list[Message] = []
    messages = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await AccessLog(app)(request, receive, send)
    return sent


def fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS) for r in caplog.records if r.name == "chatfleet.access"]


async def test_an_answer_is_logged_with_its_status_and_request_id(caplog) -> None:
    caplog.set_level(logging.INFO)
    await run(answer, scope("/v1/models"))
    [line] = fields(caplog)
    assert (line["method"], line["path"], line["status"], line["request_id"]) == (
        "GET", "/v1/models", 200, "r-1")
    assert line["priority"] is None and line["queue_wait_s"] is None and not line["disconnected"]


async def test_an_answer_without_a_request_id_gets_one_and_the_log_names_it(caplog) -> None:
    caplog.set_level(logging.INFO)
    sent = await run(answer_without_id, scope("/x"))
    headers = dict(sent[0]["headers"])
    assert headers[b"x-request-id"].decode() == fields(caplog)[0]["request_id"]
    assert headers[b"x-request-id"].startswith(b"req-")


async def test_with_the_line_filtered_out_an_answer_still_gets_a_request_id(caplog) -> None:
    caplog.set_level(logging.WARNING)
    sent = await run(answer_without_id, scope("/x"))
    assert dict(sent[0]["headers"])[b"x-request-id"].startswith(b"req-")
    sent = await run(answer, scope("/v1/models"))
    assert dict(sent[0]["headers"])[b"x-request-id"] == b"r-1"  # its own id, not a second one
    assert len(sent[0]["headers"]) == 1 and sent[1]["body"] == b"{}"
    assert fields(caplog) == []


async def test_an_app_that_fails_is_logged_as_500_and_the_error_goes_on(caplog) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError):
        await run(fail, scope("/v1/chat/completions", "POST"))
    assert fields(caplog)[0]["status"] == 500


async def test_a_client_that_leaves_before_any_answer_is_logged_as_499(caplog) -> None:
    caplog.set_level(logging.INFO)
    await run(wait_for_client, scope("/v1/chat/completions", "POST"), [{"type": "http.disconnect"}])
    [line] = fields(caplog)
    assert (line["status"], line["disconnected"]) == (499, True)


async def test_a_path_with_control_characters_cannot_forge_a_line(caplog) -> None:
    caplog.set_level(logging.INFO)
    await run(answer, scope("/v1/x\nINFO forged"))
    [record] = [r for r in caplog.records if r.name == "chatfleet.access"]
    assert "\n" not in record.getMessage() and "\\n" in record.getMessage()


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/load", "/metrics", "/metrics/engine"])
async def test_probes_and_scrapes_are_logged_at_debug_only(path: str, caplog) -> None:
    caplog.set_level(logging.INFO)
    await run(answer, scope(path))
    assert fields(caplog) == []
    caplog.set_level(logging.DEBUG)
    await run(answer, scope(path))
    assert [r.levelno for r in caplog.records if r.name == "chatfleet.access"] == [logging.DEBUG]


@pytest.mark.parametrize(("path", "logged"), [
    ("/knowledge_base/temp_kb/0123456789abcdef0123456789abcdef/chat/completions",
     "/knowledge_base/temp_kb/<redacted>/chat/completions"),
    ("/knowledge_base/temp_kb/not-an-id/chat/x", "/knowledge_base/temp_kb/<redacted>/chat/x"),
    ("/knowledge_base/local_kb/ops/chat/completions", "/knowledge_base/local_kb/ops/chat/completions"),
])
async def test_a_temporary_knowledge_bases_id_is_logged_redacted(path: str, logged: str,
                                                                 caplog) -> None:
    caplog.set_level(logging.INFO)
    await run(answer, scope(path, "POST"))
    [record] = [r for r in caplog.records if r.name == "chatfleet.access"]
    assert getattr(record, FIELDS)["path"] == logged and logged in record.getMessage()
