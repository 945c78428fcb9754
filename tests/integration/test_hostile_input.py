"""Hostile input found by the red-team pass (issue 12): each answers a clear 4xx, never a 500.

The gateway relays to a real engine-sim upstream (engine.kind=openai), where a value that cannot
be sent on as JSON used to fail on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import SIM_MODEL, Server, gateway_before_engine_sim


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    yield from gateway_before_engine_sim()


@pytest.mark.parametrize(("field", "raw"), [
    ("repetition_penalty", "Infinity"),
    ("temperature", "NaN"),
    ("response_format", '{"type": "json_object", "weight": -Infinity}'),
    ("logit_bias", '{"42": NaN}'),
])
def test_a_number_json_has_not_is_a_400_naming_its_field(gw: Server, field: str, raw: str) -> None:
    body = ('{"model": "' + SIM_MODEL + '", "max_tokens": 2, "messages": [{"role": "user", '
            f'"content": "hi"}}], "{field}": {raw}}}')
    response = httpx.post(f"{gw.v1}/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("route", ["create_knowledge_base", "update_info"])
def test_a_kb_info_with_an_unpaired_surrogate_is_a_422(gw: Server, route: str) -> None:
    httpx.post(f"{gw.url}/knowledge_base/create_knowledge_base",
               json={"knowledge_base_name": "surrogates"}, timeout=10)
    body = ('{"knowledge_base_name": "surrogates", "kb_info": "half a pair: \\ud800"}')
    response = httpx.post(f"{gw.url}/knowledge_base/{route}", content=body,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 422, response.text
    assert "kb_info" in response.json()["msg"] and "UTF-8" in response.json()["msg"]
    listed = httpx.get(f"{gw.url}/knowledge_base/list_knowledge_bases", timeout=10).json()
    assert all("\ud800" not in kb["kb_info"] for kb in listed["data"])


def test_custom_docs_with_an_unpaired_surrogate_are_a_422(gw: Server) -> None:
    httpx.post(f"{gw.url}/knowledge_base/create_knowledge_base",
               json={"knowledge_base_name": "surrogate_docs"}, timeout=10)
    docs = '{"a.txt": [{"page_content": "half a pair: \\ud800"}]}'
    response = httpx.post(f"{gw.url}/knowledge_base/upload_docs", data={
        "knowledge_base_name": "surrogate_docs", "docs": docs},
        files=[("files", ("a.txt", b"hello"))], timeout=30)
    assert response.status_code == 200
    assert response.json()["code"] == 422 and "UTF-8" in response.json()["msg"]


def test_two_files_of_one_name_in_one_upload_store_the_first_and_refuse_the_second(
        gw: Server) -> None:
    httpx.post(f"{gw.url}/knowledge_base/create_knowledge_base",
               json={"knowledge_base_name": "twins"}, timeout=10)
    response = httpx.post(f"{gw.url}/knowledge_base/upload_docs", data={
        "knowledge_base_name": "twins"}, files=[("files", ("a.txt", b"the first one")),
                                               ("files", ("a.txt", b"the second one"))],
        timeout=30)
    failed = response.json()["data"]["failed_files"]
    assert "a.txt" in failed and "twice" in failed["a.txt"]
    content = httpx.get(f"{gw.url}/knowledge_base/download_doc", params={
        "knowledge_base_name": "twins", "file_name": "a.txt"}, timeout=10).content
    assert content == b"the first one"


_REFUSED_BODIES = [
    b"", b"{", b"[]", b'"x"', b"{}", b"\xff\xfe", b"\xef\xbb\xbf{}",
    b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4} trailing',
    b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5.0}',
    b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, '
    b'"max_tokens": "4"}',
    b'{"model": "M", "messages": [{"role": "bad", "content": "x"}], "stream": "yes", "n": 2}',
    b'{"model": "M", "messages": [{"role": "user", "content": "\\ud800"}], "temperature": NaN}',
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/chat/chat/completions"])
def test_a_refused_body_reads_the_same_whatever_json_content_type_announced_it(
        gw: Server, path: str) -> None:
    """A body sent as ``application/json`` is read by pydantic's JSON parser first
    (api/json_body_route.py), one sent as ``application/json; charset=utf-8`` by FastAPI alone:
    every refusal is the same (400, Chatchat's 422, or the 404 of a body Chatchat's schema takes)
    with the same words."""
    for raw in _REFUSED_BODIES:
        answers = [httpx.post(gw.url + path, content=raw, headers={"content-type": ctype}, timeout=10)
                   for ctype in ("application/json", "application/json; charset=utf-8")]
        assert 400 <= answers[0].status_code < 500, (raw, answers[0].text)
        assert answers[0].status_code == answers[1].status_code, raw
        assert answers[0].json() == answers[1].json(), raw
