"""/v1/embeddings of a real ``chatfleet engine-sim``, called by the openai SDK and by rag's Embedder.

The server answers with ``engines.hashed_embeddings``, so every vector it sends is known here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from chatfleet.engines.hashed_embeddings import hashed_embedding, hashed_embeddings
from chatfleet.rag.embeddings import Embedder, EmbeddingError
from tests.conftest import SIM_MODEL, Server, start_engine_sim
from tests.support.procs import ManagedProcess, free_port

EMBED_MODEL = "chatfleet-sim/hashed-embedding"
"""engine-sim's default --embedding-model."""

TEXTS = [f"chunk {i}: the gateway queues request number {i} before vLLM" for i in range(300)]


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    server = start_engine_sim()
    yield server
    server.proc.terminate()


@pytest.fixture
def client(sim: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.v1, api_key="unused", max_retries=0) as sdk:
        yield sdk


def vectors(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.asarray([item.embedding for item in response.data], dtype=np.float32)


def test_the_openai_sdk_asks_for_base64_by_default_and_gets_the_hashed_vectors(client) -> None:
    raw = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=TEXTS[:3])
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    response = raw.parse()
    assert np.array_equal(vectors(response), hashed_embeddings(TEXTS[:3]))
    assert response.model == EMBED_MODEL
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_float_encoding_gives_the_same_vectors_for_one_string_and_for_the_served_model(client) -> None:
    for model in (EMBED_MODEL, SIM_MODEL):
        response = client.embeddings.create(model=model, input="你好, knowledge base",
                                            encoding_format="float")
        assert np.array_equal(vectors(response)[0], hashed_embedding("你好, knowledge base"))
        assert response.model == model


def test_dimensions_hashes_into_fewer_dimensions(sim: Server) -> None:
    body = {"model": EMBED_MODEL, "input": TEXTS[:2], "dimensions": 64}
    floats = httpx.post(sim.v1 + "/embeddings", json=body, timeout=10).json()["data"]
    packed = httpx.post(sim.v1 + "/embeddings", json={**body, "encoding_format": "base64"},
                        timeout=10).json()["data"]
    expected = hashed_embeddings(TEXTS[:2], 64)
    assert np.array_equal(np.asarray([item["embedding"] for item in floats], np.float32), expected)
    assert np.array_equal(np.asarray([np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
                                      for item in packed]), expected)


def test_a_batch_of_300_inputs_comes_back_whole_and_in_order(client) -> None:
    response = client.embeddings.create(model=EMBED_MODEL, input=TEXTS)
    assert np.array_equal(vectors(response), hashed_embeddings(TEXTS))


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"input": [[1, 2, 3]]}, 400, "input", "only text input is supported"),
    ({"input": [101, 102]}, 400, "input", "only text input is supported"),
    ({"input": []}, 400, "input", "must not be an empty list"),
    ({"input": ["ok", None]}, 400, "input", "item 1 is NoneType"),
    ({"input": ["x"] * 2049}, 400, "input", "the limit is 2048"),
    ({"input": ["ok", "y" * 40_000]}, 400, "input", "input[1] has 40000 characters; the limit is 32768"),
    ({"input": "ok", "dimensions": 257}, 400, "dimensions", "at most 256"),
    ({"input": "ok", "encoding_format": "int8"}, 400, "encoding_format", "'float' or 'base64'"),
    ({"input": "ok", "model": "text-embedding-3-small"}, 404, "model", "does not exist here"),
])
def test_bad_requests_get_a_clear_answer_in_openais_error_envelope(
        sim: Server, body: dict, status: int, param: str, words: str) -> None:
    response = httpx.post(sim.v1 + "/embeddings", json={"model": EMBED_MODEL, **body}, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == status
    assert words in error["message"]


def test_the_openai_sdk_raises_bad_request_for_token_ids(client) -> None:
    with pytest.raises(openai.BadRequestError, match="only text input is supported"):
        client.embeddings.create(model=EMBED_MODEL, input=[[1, 2, 3]])


def test_the_embedding_model_name_and_width_are_command_line_options() -> None:
    port = free_port()
    args = [sys.executable, "-m", "chatfleet", "engine-sim", "--port", str(port), "--log-level",
            "warning", "--embedding-model", "bge-m3", "--embedding-dim", "48"]
    with ManagedProcess(args, name="engine-sim-embed") as proc:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        answer = httpx.post(url, json={"model": "bge-m3", "input": "text"}, timeout=10).json()
        assert answer["data"][0]["embedding"] == hashed_embedding("text", 48).tolist()
        assert httpx.post(url, json={"model": EMBED_MODEL, "input": "x"}, timeout=10).status_code == 404
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert [card["id"] for card in models["data"]] == [SIM_MODEL]


# -- rag.embeddings.Embedder ----------------------------------------------------------------------


async def test_the_embedder_keeps_order_across_concurrent_batches_and_learns_the_width(
        sim: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight = peak = posts = 0
    send = httpx.AsyncClient.send

    async def counting_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: object) -> httpx.Response:
        nonlocal in_flight, peak, posts
        in_flight += 1
        posts += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)  # hold the place, so that batches overlap
            return await send(self, request, **kwargs)  # type: ignore[arg-type]
        finally:
            in_flight -= 1

    monkeypatch.setattr(httpx.AsyncClient, "send", counting_send)
    embedder = Embedder(base_url=sim.v1, model=EMBED_MODEL, api_key=None, batch_size=7,
                        max_concurrency=3, timeout_s=10)
    await embedder.start()
    try:
        assert embedder.dim is None
        rows = await embedder.embed_documents(TEXTS[:50])
        assert rows.dtype == np.float32 and rows.shape == (50, 256)
        assert np.allclose(rows, hashed_embeddings(TEXTS[:50]), atol=1e-6)
        assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-6)
        assert (posts, peak) == (8, 3)  # ceil(50 / 7) requests, never more than 3 at once
        assert embedder.dim == 256
        query = await embedder.embed_query("who queues the requests?")
        assert query.shape == (256,)
        assert np.allclose(query, hashed_embedding("who queues the requests?"), atol=1e-6)
        assert (await embedder.embed_documents([])).shape == (0, 256)
    finally:
        await embedder.aclose()


async def test_the_embedder_says_when_the_endpoint_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    embedder = Embedder(base_url=url, model=EMBED_MODEL, api_key=None, batch_size=7,
                        max_concurrency=3, timeout_s=5)
    await embedder.start()
    try:
        with pytest.raises(EmbeddingError, match="unreachable") as caught:
            await embedder.embed_documents(TEXTS[:20])
        assert url + "/embeddings" in str(caught.value)
    finally:
        await embedder.aclose()


async def test_the_embedder_relays_a_refusal_with_its_status_and_never_shows_the_key(sim: Server) -> None:
    embedder = Embedder(base_url=sim.v1, model="no-such-model", api_key="sk-very-secret",
                        batch_size=7, max_concurrency=3, timeout_s=10)
    await embedder.start()
    try:
        with pytest.raises(EmbeddingError, match="answered HTTP 404") as caught:
            await embedder.embed_query("question")
        message = str(caught.value)
        assert "The model 'no-such-model' does not exist here" in message
        assert "sk-very-secret" not in message and "sk-very-secret" not in repr(embedder)
        assert embedder.dim is None
    finally:
        await embedder.aclose()


def two(first: list[float], second: list[float], *, second_index: int = 1) -> dict:
    return {"data": [{"index": 0, "embedding": first}, {"index": second_index, "embedding": second}]}


@pytest.mark.parametrize(("answers", "words"), [
    ([{"data": [{"index": 0, "embedding": [1.0, 0.0]}]}], "answered 1 embeddings for 2 inputs"),
    ([two([1.0, 0.0], [1.0])], "not lists of numbers of one length"),
    ([two([1.0], [1.0], second_index=0)], "indexes that are not 0..1"),
    ([two([1.0, 0.0], [0.0, 1.0]), two([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])],
     "answered 3-dimensional embeddings, earlier answers had 2"),
    ([{"error": "this is not an embeddings list"}], "not an OpenAI embeddings list"),
])
async def test_the_embedder_refuses_an_answer_whose_count_or_width_does_not_match(
        answers: list[dict], words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    replies = iter(answers)

    async def fake_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: object) -> httpx.Response:
        return httpx.Response(200, json=next(replies), request=request)

    monkeypatch.setattr(httpx.AsyncClient, "send", fake_send)
    embedder = Embedder(base_url="http://embeddings.invalid/v1", model="m", api_key=None,
                        batch_size=2, max_concurrency=1, timeout_s=5)
    await embedder.start()
    try:
        with pytest.raises(EmbeddingError, match=words):
            await embedder.embed_documents(["a", "b"] * len(answers))
    finally:
        await embedder.aclose()


def test_an_embeddings_endpoint_that_fails_is_a_502_naming_it(gateway) -> None:
    """A 5xx from the embeddings endpoint (here Python's http.server, which answers POST with 501)
    reaches the client as a 502 that names the endpoint's answer, never as the endpoint's own 5xx."""
    port = free_port()
    endpoint = ManagedProcess([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                              name="http.server").start()
    try:
        endpoint.wait_http(f"http://127.0.0.1:{port}/", timeout=10)
        gw: Server = gateway({"CHATFLEET_KB__EMBEDDINGS__URL": f"http://127.0.0.1:{port}/v1",
                              "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED_MODEL})
        r = httpx.post(gw.v1 + "/embeddings", json={"model": EMBED_MODEL, "input": ["a"]}, timeout=10)
    finally:
        endpoint.terminate()
    assert r.status_code == 502, r.text
    assert "answered HTTP 501" in r.json()["error"]["message"]
