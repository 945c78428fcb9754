"""The gateway's log on a real process (engine-sim upstream, API keys on, ``log.format=json``): one
JSON access line per request with its status, latency, request id, priority and queue wait, the
refusals of the outer middleware included; a start-up line naming the address it listens on; every
line of the process a JSON object; and neither the API key, a query string nor prompt text in any
of it."""

from __future__ import annotations

import json
import secrets
from typing import Any

import httpx

from tests.conftest import SIM_MODEL, Server, chat, upstream_env
from tests.support.procs import wait_until

ACCESS = "chatfleet.access"


def log_lines(gw: Server) -> list[dict[str, Any]]:
    """Every line the gateway wrote, each parsed as JSON (a line that is not JSON fails here);
    a last line still being written is left for the next look."""
    text = gw.proc.log_text()
    lines = []
    for raw in text[:text.rfind("\n") + 1].splitlines():
        line = json.loads(raw)
        assert {"time", "level", "logger", "message"} <= set(line), raw
        lines.append(line)
    return lines


def access_lines(gw: Server) -> list[dict[str, Any]]:
    return [line for line in log_lines(gw) if line["logger"] == ACCESS]


def wait_for_access(gw: Server, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The access line of each request, waited for (a line is written once the answer has left,
    so the client may have it first); exactly one line per request."""
    def logged() -> bool:
        ids = {line["request_id"] for line in access_lines(gw)}
        return set(request_ids) <= ids
    wait_until(logged, timeout=10, message="an access line for every request")
    lines = {}
    for line in access_lines(gw):
        assert line["request_id"] not in lines, f"two access lines for one request: {line}"
        lines[line["request_id"]] = line
    return lines


def assert_line(line: dict[str, Any], *, method: str, path: str, status: int,
                priority: str | None = None, queued: bool = False) -> None:
    assert line["level"] == "INFO", line
    assert (line["method"], line["path"], line["status"]) == (method, path, status), line
    assert isinstance(line["latency_s"], float) and 0 <= line["latency_s"] < 30, line
    assert line["priority"] == priority, line
    if queued:
        assert isinstance(line["queue_wait_s"], float) and 0 <= line["queue_wait_s"] <= line["latency_s"]
    else:
        assert line["queue_wait_s"] is None, line
    assert line["disconnected"] is False, line


def test_one_json_access_line_per_request_with_no_key_query_or_prompt_in_the_log(
        engine_sim, gateway) -> None:
    key = "sk-test-" + secrets.token_urlsafe(24)
    secret_prompt = "my bank password is " + secrets.token_urlsafe(16)
    query_secret = "qs-" + secrets.token_urlsafe(16)
    sim: Server = engine_sim()
    gw: Server = gateway({**upstream_env(sim, server__log_level="info", log__format="json",
                                         limits__max_tokens=64),
                          "CHATFLEET_API_KEYS": key})
    auth = {"Authorization": f"Bearer {key}"}
    ids: dict[str, str] = {}

    with httpx.Client(base_url=gw.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", headers=auth,
                           json=chat(5, stream=True)) as streamed:
            assert streamed.status_code == 200
            events = [line for line in streamed.iter_lines() if line.startswith("data: {")]
            ids["streamed"] = streamed.headers["X-Request-Id"]
        assert json.loads(events[0][len("data: "):])["id"] == ids["streamed"]

        whole = client.post("/v1/chat/completions", json=chat(3),
                            headers={**auth, "X-ChatFleet-Priority": "batch"})
        assert whole.status_code == 200 and whole.json()["id"] == whole.headers["X-Request-Id"]
        ids["whole"] = whole.headers["X-Request-Id"]

        secret = client.post("/v1/chat/completions", headers=auth, json={
            "model": SIM_MODEL, "messages": [{"role": "user", "content": secret_prompt}],
            "max_tokens": 2})
        assert secret.status_code == 200
        ids["secret"] = secret.headers["X-Request-Id"]

        for name, response in {
            "no key": client.get("/v1/models", params={"api_key": query_secret}),
            "wrong key": client.post("/v1/chat/completions", json=chat(3),
                                     headers={"Authorization": f"Bearer {key}x"}),
            "unknown model": client.get(f"/v1/models/not-{SIM_MODEL}", headers=auth),
            "bad body": client.post("/v1/chat/completions", headers=auth,
                                    json={**chat(3), "max_tokens": 65}),
        }.items():
            assert response.status_code == {"no key": 401, "wrong key": 401, "unknown model": 404,
                                             "bad body": 400}[name], (name, response.text)
            ids[name] = response.headers["X-Request-Id"]
        assert client.get("/livez").status_code == 200

    lines = wait_for_access(gw, list(ids.values()))
    assert len(set(ids.values())) == len(ids), "every answer has its own request id"
    assert len(lines) == len(ids), "one line per request, none for the probe (at DEBUG)"
    assert_line(lines[ids["streamed"]], method="POST", path="/v1/chat/completions", status=200,
                priority="interactive", queued=True)
    assert_line(lines[ids["whole"]], method="POST", path="/v1/chat/completions", status=200,
                priority="batch", queued=True)
    assert_line(lines[ids["secret"]], method="POST", path="/v1/chat/completions", status=200,
                priority="interactive", queued=True)
    assert_line(lines[ids["no key"]], method="GET", path="/v1/models", status=401)
    assert_line(lines[ids["wrong key"]], method="POST", path="/v1/chat/completions", status=401)
    assert_line(lines[ids["unknown model"]], method="GET", path=f"/v1/models/not-{SIM_MODEL}",
                status=404)
    assert_line(lines[ids["bad body"]], method="POST", path="/v1/chat/completions", status=400)

    started = [line for line in log_lines(gw) if line["message"].startswith("listening on ")]
    assert len(started) == 1 and started[0]["level"] == "INFO", started
    assert started[0]["listen"] == gw.url and started[0]["message"].startswith(f"listening on {gw.url};")
    assert (started[0]["engine"], started[0]["model"], started[0]["upstream"]) == (
        "openai", SIM_MODEL, sim.v1)
    assert (started[0]["kb_store"], started[0]["retrieval"]) == ("local", "lexical")

    text = gw.proc.log_text()
    for secret_text in (key, key[8:20], secret_prompt, secret_prompt[-16:], query_secret):
        assert secret_text not in text, f"{secret_text!r} is in the gateway's log"


def test_a_client_that_leaves_mid_stream_is_logged_as_disconnected(engine_sim, gateway) -> None:
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, server__log_level="info", log__format="json"))
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json=chat(2000, stream=True)) as streamed:
            request_id = streamed.headers["X-Request-Id"]
            for line in streamed.iter_lines():
                if line.startswith("data: {"):
                    break  # leaves the stream after its first event: the connection closes
    line = wait_for_access(gw, [request_id])[request_id]
    assert (line["status"], line["disconnected"], line["priority"]) == (200, True, "interactive")
    assert "disconnected" in line["message"]


def test_a_temporary_knowledge_bases_id_is_nowhere_in_the_log(engine_sim, gateway) -> None:
    """The id is all that guards a file chat's uploaded text: its chat path is logged redacted
    (answered, refused by API-key auth before routing, or refused as evicted), and its eviction
    is logged without it. At DEBUG, to cover every line that names a path."""
    key = "sk-test-" + secrets.token_urlsafe(24)
    sim: Server = engine_sim()
    gw: Server = gateway({**upstream_env(sim, server__log_level="debug", log__format="json",
                                         kb__max_temp_kbs=1),
                          "CHATFLEET_API_KEYS": key})
    auth = {"Authorization": f"Bearer {key}"}
    question = {"model": SIM_MODEL, "max_tokens": 2,
                "messages": [{"role": "user", "content": "what does the drain do?"}]}
    redacted = "/knowledge_base/temp_kb/<redacted>/chat/completions"

    def upload() -> str:
        answer = client.post("/knowledge_base/upload_temp_docs", headers=auth, files=[
            ("files", ("brief.txt", b"The drain lets accepted streams finish."))])
        assert answer.status_code == 200 and answer.json()["code"] == 200, answer.text
        return str(answer.json()["data"]["id"])

    with httpx.Client(base_url=gw.url, timeout=30) as client:
        temp_id = upload()
        path = f"/knowledge_base/temp_kb/{temp_id}/chat/completions"
        answered = client.post(path, headers=auth, json=question)
        assert answered.status_code == 200, answered.text
        refused = client.post(path, headers={"Authorization": f"Bearer {key}x"}, json=question)
        assert refused.status_code == 401
        file_chat = client.post("/chat/file_chat", headers=auth, json={
            "query": "what does the drain do?", "knowledge_id": temp_id, "stream": False,
            "max_tokens": 2})
        assert file_chat.status_code == 200, file_chat.text
        newer_id = upload()  # past kb.max_temp_kbs: the first one is evicted
        evicted = client.post(path, headers=auth, json=question)
        assert evicted.status_code == 404 and "upload_temp_docs" in evicted.text

    ids = [r.headers["X-Request-Id"] for r in (answered, refused, evicted)]
    lines = wait_for_access(gw, ids)
    assert [(lines[i]["path"], lines[i]["status"]) for i in ids] == [
        (redacted, 200), (redacted, 401), (redacted, 404)]
    assert all(redacted in lines[i]["message"] for i in ids)
    assert any("deleted a temporary knowledge base" in line["message"] and "early" in line["message"]
               for line in log_lines(gw))
    text = gw.proc.log_text()
    for secret_text in (temp_id, newer_id):
        assert secret_text not in text, f"a temporary knowledge base's id {secret_text} is logged"
