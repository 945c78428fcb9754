"""The official clients work against `chatfleet serve` as the README starts it (embedded engine)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.conftest import Server, start_gateway

MODEL = "chatfleet-sim/tiny-cpu"


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    server = start_gateway()
    yield server
    server.proc.terminate()


@pytest.fixture
def client(served: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0)


def test_models_lists_the_simulated_engine_by_its_honest_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_sdk_retrieves_the_served_model_and_is_told_which_one_for_another(
        client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "chatfleet")
    assert model.created == client.models.list().data[0].created
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.status_code == 404
    assert "'gpt-4o'" in info.value.message and f"'{MODEL}'" in info.value.message


def test_openai_sdk_gets_a_whole_chat_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=12,
        extra_body={"ignore_eos": True})
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert len(answer.choices[0].message.content.split()) == 12
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12
    assert answer.usage.prompt_tokens > 0


def test_openai_sdk_streams_a_chat_answer_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=9,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 9
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1


def test_openai_sdk_text_completion_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5,
                                      extra_body={"ignore_eos": True})
    assert len(whole.choices[0].text.split()) == 5 and whole.object == "text_completion"
    parts = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5,
                                           stream=True, extra_body={"ignore_eos": True}))
    assert len("".join(p.choices[0].text for p in parts).split()) == 5


def test_same_seed_gives_the_same_text(client: openai.OpenAI) -> None:
    def ask() -> str:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8, seed=7,
            extra_body={"ignore_eos": True}).choices[0].message.content
    assert ask() == ask()


def test_langchain_chat_openai_invokes_and_streams(served: Server) -> None:
    llm = ChatOpenAI(base_url=served.v1, api_key="unused", model=MODEL, max_tokens=6,
                     max_retries=0, extra_body={"ignore_eos": True})
    reply = llm.invoke("Hello there")
    assert len(reply.content.split()) == 6
    pieces = [chunk.content for chunk in llm.stream("Hello there")]
    assert len("".join(pieces).split()) == 6 and len(pieces) >= 6


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "limits.max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n=3"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only 'text'"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, MODEL),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "priority": "urgent"}, 400, "priority"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 513}, 400, "limits.max_messages"),
    ],
    ids=["no-messages", "bad-role", "zero-max-tokens", "max-tokens-over-limit", "n-above-one",
         "temperature-out-of-range", "tools", "image-part", "unknown-model", "bad-priority",
         "missing-model", "messages-over-limit"],
)
def test_bad_chat_requests_get_a_clear_openai_error(served: Server, body: dict, status: int,
                                                    needle: str) -> None:
    response = httpx.post(served.v1 + "/chat/completions", json=body, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"], error
    assert error["code"] == status and error["type"]


def test_malformed_json_and_oversized_bodies_are_refused_with_400_and_413(served: Server) -> None:
    bad = httpx.post(served.v1 + "/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"}, timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    huge = "x" * (2 << 20)
    big = httpx.post(served.v1 + "/chat/completions", timeout=10,
                     json={"model": MODEL, "messages": [{"role": "user", "content": huge}]})
    assert big.status_code == 413 and "limits.max_body_bytes" in big.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"x" * 65536
    streamed = httpx.post(served.v1 + "/chat/completions", content=chunked(), timeout=10,
                          headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_a_prompt_longer_than_the_context_is_refused_by_the_engine_with_400(served: Server) -> None:
    response = httpx.post(served.v1 + "/chat/completions", timeout=10, json={
        "model": MODEL, "stream": True, "max_tokens": 4000,
        "messages": [{"role": "user", "content": "word " * 800}]})
    assert response.status_code == 400
    assert "maximum context length" in response.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_error_envelope(served: Server) -> None:
    missing = httpx.get(served.url + "/v1/nothing", timeout=5)
    assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
    wrong = httpx.get(served.v1 + "/chat/completions", timeout=5)
    assert wrong.status_code == 405


@pytest.mark.parametrize("aliases", ["glm4-chat,qwen:7b", "*"], ids=["named", "any name"])
def test_a_model_alias_is_served_by_the_served_model_and_answers_say_so(
        gateway, aliases: str) -> None:
    server = gateway({"CHATFLEET_ENGINE__MODEL_ALIASES": aliases})
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0) as aliased:
        listed = [m.id for m in aliased.models.list()]
        assert listed == ([MODEL, "glm4-chat", "qwen:7b"] if aliases != "*" else [MODEL])
        assert aliased.models.retrieve("qwen:7b").id == "qwen:7b"
        answer = aliased.chat.completions.create(
            model="qwen:7b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.model == MODEL and answer.choices[0].message.content
        streamed = list(aliased.chat.completions.create(
            model="glm4-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            stream=True))
        assert {chunk.model for chunk in streamed} == {MODEL}
        if aliases != "*":
            with pytest.raises(openai.NotFoundError) as info:
                aliased.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert f"'{MODEL}'" in info.value.message
