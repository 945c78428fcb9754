"""An upstream engine that misbehaves, and /v1 bodies built to cost (issue 12, points 4, 5, 11, 15).

A real gateway (engine.kind=openai, API keys on) relays to ``tests/support/bad_upstream.py``, a
real HTTP server that sends scripted bad data. Bad data before the first token is a 502 in
OpenAI's error shape; after it, an error event and ``[DONE]``; both counted as
``outcome="engine_error"``, never ``client_disconnected``. Nothing the upstream sends is held
whole: the gateway's peak RSS (``/proc/<pid>/status`` VmHWM, reset through ``clear_refs``) stays
within a few MB while it is sent tens of MB.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.chart.render import one, render
from tests.conftest import Server, start_gateway
from tests.support.bad_upstream import BAD_PAYLOADS, ESCAPED, MODEL, bad_upstream_env, start_bad_upstream
from tests.support.metrics import value

KEY = "hostile-upstream-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BAD_DATA = "the upstream engine sent bad data"
HUGE = 64 << 20
"""Bytes of the huge error body and of the huge line: the gateway used to hold each whole."""
RSS_BOUND = 24 << 20
"""Most the gateway's peak RSS may grow while it is sent HUGE bytes."""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Server]:
    server = start_bad_upstream()
    yield server
    server.proc.terminate()


@pytest.fixture(scope="module")
def gw(upstream: Server) -> Iterator[Server]:
    server = start_gateway(bad_upstream_env(upstream, CHATFLEET_API_KEYS=KEY))
    yield server
    server.proc.terminate()


def _chat(script: str, **extra: object) -> dict:
    return {"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"script={script}"}], **extra}


def _outcomes(gw: Server) -> dict[str, float]:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    return {o: value(text, "chatfleet_requests_total", outcome=o)
            for o in ("engine_error", "client_disconnected", "ok")}


def _counted_as_engine_error(gw: Server, before: dict[str, float], n: int = 1) -> None:
    after = _outcomes(gw)
    assert after["engine_error"] - before["engine_error"] == n, (before, after)
    assert after["client_disconnected"] == before["client_disconnected"], (before, after)


def _events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.splitlines()
            if line.startswith("data: ")]


@pytest.mark.parametrize("payload", sorted(BAD_PAYLOADS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_bad_data_before_the_first_token_is_a_502(gw: Server, payload: str, stream: bool) -> None:
    before = _outcomes(gw)
    response = httpx.post(gw.v1 + "/chat/completions", json=_chat(f"bad:{payload}", stream=stream),
                          headers=AUTH, timeout=10)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert BAD_DATA in error["message"] and error["code"] == 502
    _counted_as_engine_error(gw, before)


@pytest.mark.parametrize("payload", sorted(BAD_PAYLOADS))
def test_bad_data_after_the_first_token_is_an_error_event_then_done(gw: Server,
                                                                      payload: str) -> None:
    before = _outcomes(gw)
    response = httpx.post(gw.v1 + "/chat/completions",
                          json=_chat(f"bad_after:{payload}", stream=True), headers=AUTH, timeout=10)
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]", events
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "hello"
    error = json.loads(events[-2])["error"]
    assert BAD_DATA in error["message"] and error["code"] == 502
    _counted_as_engine_error(gw, before)


def test_the_openai_sdk_raises_on_bad_data_mid_stream_after_the_tokens(gw: Server) -> None:
    client = openai.OpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(**_chat("bad_after:usage_text", stream=True))
    text = []
    with pytest.raises(openai.APIError, match=BAD_DATA):
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) == "hello"
    with pytest.raises(openai.InternalServerError, match=BAD_DATA) as raised:
        client.completions.create(model=MODEL, prompt="script=bad:choices_string", max_tokens=4)
    assert raised.value.status_code == 502


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
def test_escaped_token_text_is_relayed_exactly(gw: Server, chat: bool) -> None:
    """Tokens after the first are read by their bytes (upstream_wire.ContentTemplate): their
    escapes (quotes, a tab, \\u00e9, \\/) decode to the same text a full parse gives."""
    if chat:
        response = httpx.post(gw.v1 + "/chat/completions", json=_chat("escaped", stream=True),
                              headers=AUTH, timeout=10)
        pieces = [json.loads(e)["choices"][0]["delta"].get("content") or ""
                  for e in _events(response)[:-1] if json.loads(e)["choices"]]
    else:
        response = httpx.post(gw.v1 + "/completions", headers=AUTH, timeout=10, json={
            "model": MODEL, "max_tokens": 8, "prompt": "script=escaped", "stream": True})
        pieces = [json.loads(e)["choices"][0]["text"] for e in _events(response)[:-1]
                  if json.loads(e)["choices"]]
    assert response.status_code == 200
    assert "".join(pieces) == "".join(ESCAPED)
    whole = httpx.post(gw.v1 + "/chat/completions", json=_chat("escaped"), headers=AUTH, timeout=10)
    assert whole.json()["choices"][0]["message"]["content"] == "".join(ESCAPED)


def test_a_bad_chunk_shaped_like_the_good_ones_is_still_bad_data(gw: Server) -> None:
    """A chunk with the same bytes as the stream's text chunks around a text that is no JSON
    string (a raw control character) is not relayed by its bytes: it is parsed, and refused."""
    before = _outcomes(gw)
    response = httpx.post(gw.v1 + "/chat/completions", json=_chat("bad_templated", stream=True),
                          headers=AUTH, timeout=10)
    events = _events(response)
    assert events[-1] == "[DONE]", events
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-2])
    assert text == "hello world"
    error = json.loads(events[-2])["error"]
    assert BAD_DATA in error["message"] and error["code"] == 502
    _counted_as_engine_error(gw, before)


def test_an_upstream_that_stalls_past_the_read_timeout_ends_the_stream(upstream: Server) -> None:
    """The read timeout holds without a timer per read (openai_compat._ReadWatchdog): a stall
    longer than it ends the answer with an error event; shorter stalls, and reads on a reused
    connection, are not cut."""
    gw = start_gateway(bad_upstream_env(upstream, CHATFLEET_ENGINE__READ_TIMEOUT_S="1"))
    try:
        for _ in range(2):  # the second on a reused connection
            ok = httpx.post(gw.v1 + "/chat/completions", json=_chat("stall:400", stream=True),
                            timeout=10)
            assert _events(ok)[-1] == "[DONE]" and "error" not in ok.text, ok.text
        before = _outcomes(gw)
        response = httpx.post(gw.v1 + "/chat/completions", json=_chat("stall:5000", stream=True),
                              timeout=10)
        assert response.elapsed.total_seconds() < 4, response.elapsed
        events = _events(response)
        assert events[-1] == "[DONE]", events
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "hello"
        error = json.loads(events[-2])["error"]
        assert "engine sent nothing for too long" in error["message"] and error["code"] == 503
        after = _outcomes(gw)
        assert after["engine_error"] - before["engine_error"] == 1, (before, after)
        # An engine that does not even answer with its head: the same bound, before the stream.
        headless = httpx.post(gw.v1 + "/chat/completions", json=_chat("head_stall:5000", stream=True),
                              timeout=10)
        assert headless.elapsed.total_seconds() < 4, headless.elapsed
        assert headless.status_code == 503, headless.text
        assert "engine sent nothing for too long" in headless.json()["error"]["message"]
        slow_head = httpx.post(gw.v1 + "/chat/completions", json=_chat("head_stall:400", stream=True),
                               timeout=10)
        assert _events(slow_head)[-1] == "[DONE]" and "error" not in slow_head.text, slow_head.text
    finally:
        gw.proc.terminate()


@pytest.fixture(scope="module")
def empty_kb(gw: Server) -> str:
    answer = httpx.post(gw.url + "/knowledge_base/create_knowledge_base", headers=AUTH,
                        json={"knowledge_base_name": "hostile_upstream"}, timeout=10).json()
    assert answer["code"] == 200, answer
    return "hostile_upstream"


@pytest.mark.parametrize("route", ["/chat/chat/completions", "/chat/kb_chat"])
def test_bad_data_on_chatchat_routes_is_a_502_or_an_error_event(gw: Server, empty_kb: str,
                                                                 route: str) -> None:
    def body(script: str, stream: bool) -> dict:
        if route == "/chat/kb_chat":
            return {"query": f"script={script}", "kb_name": empty_kb, "mode": "local_kb",
                    "stream": stream, "max_tokens": 8}
        return {**_chat(script), "stream": stream}

    before = _outcomes(gw)
    whole = httpx.post(gw.url + route, json=body("bad:null", False), headers=AUTH, timeout=10)
    assert whole.status_code == 502 and BAD_DATA in whole.json()["msg"], whole.text
    early = httpx.post(gw.url + route, json=body("bad:number", True), headers=AUTH, timeout=10)
    assert early.status_code == 502 and BAD_DATA in early.json()["msg"], early.text
    late = httpx.post(gw.url + route, json=body("bad_after:no_choices", True), headers=AUTH,
                      timeout=10)
    assert late.status_code == 200
    events = [json.loads(e) for e in _events(late) if e != "[DONE]"]
    assert "hello" in json.dumps(events[:-1], ensure_ascii=False)
    assert BAD_DATA in json.dumps(events[-1]), events[-1]
    _counted_as_engine_error(gw, before, 3)


@pytest.mark.parametrize(("reason", "sent"), [("stop", "stop"), ("length", "length"),
                                              ("content_filter", "content_filter"),
                                              ("eos", "stop"), ("stop_sequence", "stop")])
def test_finish_reasons_outside_openais_set_are_sent_as_stop(gw: Server, reason: str,
                                                              sent: str) -> None:
    whole = httpx.post(gw.v1 + "/chat/completions", json=_chat(f"finish:{reason}"), headers=AUTH,
                       timeout=10).json()
    assert whole["choices"][0]["finish_reason"] == sent
    streamed = httpx.post(gw.v1 + "/chat/completions", json=_chat(f"finish:{reason}", stream=True),
                          headers=AUTH, timeout=10)
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in _events(streamed)
                if e != "[DONE]" and json.loads(e)["choices"]]
    assert finishes[-1] == sent


def test_vllms_abort_is_an_engine_failure_not_an_answer(gw: Server) -> None:
    before = _outcomes(gw)
    whole = httpx.post(gw.v1 + "/chat/completions", json=_chat("finish:abort"), headers=AUTH,
                       timeout=10)
    assert whole.status_code == 503 and "abort" in whole.json()["error"]["message"]
    assert whole.headers["retry-after"]
    streamed = httpx.post(gw.v1 + "/chat/completions", json=_chat("finish:abort", stream=True),
                          headers=AUTH, timeout=10)
    events = _events(streamed)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
    _counted_as_engine_error(gw, before, 2)


def _rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize(("script", "status"), [(f"error_body:{HUGE}", 503),
                                                (f"long_line:{HUGE}", 502)])
def test_a_huge_upstream_body_is_not_held_whole(gw: Server, script: str, status: int) -> None:
    pid = gw.proc.pid
    httpx.post(gw.v1 + "/chat/completions", json=_chat(""), headers=AUTH, timeout=10)  # warm
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    rss = _rss(pid, "VmRSS")
    response = httpx.post(gw.v1 + "/chat/completions", json=_chat(script), headers=AUTH, timeout=60)
    growth = _rss(pid, "VmHWM") - rss
    assert response.status_code == status, response.text
    assert growth < RSS_BOUND, f"peak RSS grew {growth / 2**20:.0f} MB"
    if status == 502:
        assert "longer than" in response.json()["error"]["message"]


def test_engine_metrics_need_the_key_and_one_scrape_serves_concurrent_callers(
        gw: Server, upstream: Server) -> None:
    assert httpx.get(gw.url + "/metrics/engine", timeout=5).status_code == 401
    assert httpx.get(gw.url + "/metrics", timeout=5).status_code == 200  # Prometheus' own

    async def fifty() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
            return await asyncio.gather(*(client.get(gw.url + "/metrics/engine")
                                          for _ in range(50)))

    scrapes = httpx.get(upstream.url + "/stats", timeout=5).json()["scrapes"]
    responses = asyncio.run(fifty())
    assert all(r.status_code == 200 and "vllm:num_requests_running" in r.text for r in responses)
    scraped = httpx.get(upstream.url + "/stats", timeout=5).json()["scrapes"] - scrapes
    assert scraped <= 3, f"50 concurrent calls made {scraped} upstream scrapes"


@pytest.mark.parametrize("max_tokens", [True, "5", 5.0])
def test_an_integer_field_takes_only_an_integer(gw: Server, max_tokens: object) -> None:
    response = httpx.post(gw.v1 + "/chat/completions", json=_chat("", max_tokens=max_tokens),
                          headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_tokens"


def test_tens_of_thousands_of_content_parts_are_refused_before_they_are_validated(
        gw: Server) -> None:
    parts = [{"type": "text", "text": "x"}] * 25_000
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    response = httpx.post(gw.v1 + "/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text[:300]
    assert "content parts" in response.json()["error"]["message"]
    fine = {**body, "messages": [{"role": "user", "content": parts[:3]}]}
    assert httpx.post(gw.v1 + "/chat/completions", json=fine, headers=AUTH,
                      timeout=10).status_code == 200


@pytest.mark.parametrize(("values", "key"), [({}, None),
                                             ({"auth.existingSecret": "keys"}, "api-keys"),
                                             ({"auth.existingSecret": "keys",
                                               "auth.scrapeSecretKey": "scrape-key"}, "scrape-key")])
def test_the_charts_service_monitor_sends_a_key_to_the_engine_metrics_when_keys_are_set(
        values: dict[str, str], key: str | None) -> None:
    endpoints = one(render(values), "ServiceMonitor")["spec"]["endpoints"]
    auth = {e["path"]: e.get("authorization") for e in endpoints}
    assert auth["/metrics"] is None  # the gateway's own metrics stay open
    expected = None if key is None else {"type": "Bearer",
                                         "credentials": {"name": "keys", "key": key}}
    assert auth["/metrics/engine"] == expected
