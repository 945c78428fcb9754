"""The gateway's client for any OpenAI-compatible ``/v1/embeddings`` endpoint.

Ingestion calls ``embed_documents`` with a file's chunks and retrieval calls ``embed_query`` with
the question, on one ``Embedder`` built from ``kb.embeddings`` (``rag/knowledge.py``); the
gateway's own ``/v1/embeddings`` route can use it too. Vectors come back as float32 rows scaled to
unit length, which is what the stores compare by inner product.

A failure is an ``EmbeddingError`` whose message says which endpoint did what (unreachable, an
HTTP status with the start of its body, an answer of the wrong size). The API key goes only into
the Authorization header: never into messages, logs or ``repr``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from chatfleet.http_pools import ShardedTransport

__all__ = ["Embedder", "EmbeddingError"]

QUERY_CONNECTIONS = 64
"""Connections to the embeddings endpoint, at most (queries and ingestion batches together)."""

_BODY_EXCERPT = 256
"""Characters of an error answer's body kept in the EmbeddingError."""


class EmbeddingError(Exception):
    """The embeddings endpoint could not be reached, refused, or answered something unusable."""


class Embedder:
    """Embeds texts through ``{base_url}/embeddings`` (``base_url`` includes ``/v1``).

    ``embed_documents`` sends ``batch_size`` texts per request and keeps at most
    ``max_concurrency`` of its requests in flight; separate calls (an ingestion and a query) do not
    wait for each other's. ``dim`` is None until the first answer, then that answer's width; a
    later answer of another width is an error (the endpoint changed models).
    """

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None,
                 batch_size: int = 64, max_concurrency: int = 4, timeout_s: float = 60.0) -> None:
        if batch_size < 1 or max_concurrency < 1:
            raise ValueError("batch_size and max_concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/embeddings"
        self.model = model
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.dim: int | None = None
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return (f"Embedder(url={self.url!r}, model={self.model!r}, "
                f"api_key={'***' if self._api_key else None})")

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # Every knowledge-base question embeds its query: under load, dozens of requests are in
        # flight, and one httpcore pool's bookkeeping grows with the square of its size (a third
        # of the gateway's CPU per search in a profile), so connections are split into small
        # pools as for the engine. Built in a thread: the TLS context loads the CA bundle (~100 ms).
        transport = await asyncio.to_thread(ShardedTransport, connections=QUERY_CONNECTIONS,
                                            per_pool=8)
        self._client = httpx.AsyncClient(transport=transport, headers=headers,
                                         timeout=httpx.Timeout(self.timeout_s))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def embed_query(self, text: str) -> npt.NDArray[np.float32]:
        """One text's unit vector, shape ``(dim,)``."""
        return (await self._request([text]))[0]

    async def embed_documents(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit rows, shape ``(len(texts), dim)``, in the order of ``texts``."""
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        results: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(starts)
        # One iterator shared by the workers: each takes the next batch when its last one is done.
        jobs: Iterator[tuple[int, int]] = enumerate(starts)

        async def worker() -> None:
            for i, start in jobs:
                results[i] = await self._request(list(texts[start:start + self.batch_size]))

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.max_concurrency, len(starts)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return np.concatenate(results)

    async def relay(self, body: dict[str, Any]) -> httpx.Response:
        """Send a client's OpenAI embeddings request as it is and return the endpoint's answer
        (the gateway's own /v1/embeddings). Raises EmbeddingError when there is no answer."""
        return await self._post(body)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        if self._client is None:
            raise RuntimeError("Embedder.start() was not called")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._client.post(self.url, json=body)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise EmbeddingError(f"embeddings endpoint {self.url} did not answer within "
                                 f"{self.timeout_s:g} s") from exc
        except httpx.TransportError as exc:
            raise EmbeddingError(f"embeddings endpoint {self.url} is unreachable: "
                                 f"{type(exc).__name__}: {exc}") from exc

    async def _request(self, texts: list[str]) -> npt.NDArray[np.float32]:
        response = await self._post({"model": self.model, "input": texts, "encoding_format": "float"})
        if response.status_code != 200:
            excerpt = response.text[:_BODY_EXCERPT]
            raise EmbeddingError(f"embeddings endpoint {self.url} answered HTTP "
                                 f"{response.status_code}: {excerpt}")
        return self._vectors(response, len(texts))

    def _vectors(self, response: httpx.Response, count: int) -> npt.NDArray[np.float32]:
        """The answer's embeddings as unit rows in input order, after checking their number and
        width. A zero row (some servers answer one for an empty text) stays zero: it matches
        nothing."""
        try:
            data: list[dict[str, Any]] = response.json()["data"]
            by_index = {item.get("index", pos): item["embedding"] for pos, item in enumerate(data)}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EmbeddingError(f"embeddings endpoint {self.url} answered something that is not "
                                 f"an OpenAI embeddings list: {response.text[:_BODY_EXCERPT]}") from exc
        if len(data) != count:
            raise EmbeddingError(f"embeddings endpoint {self.url} answered {len(data)} embeddings "
                                 f"for {count} inputs")
        if by_index.keys() != set(range(count)):
            raise EmbeddingError(f"embeddings endpoint {self.url} answered indexes that are not "
                                 f"0..{count - 1}")
        vectors = [by_index[i] for i in range(count)]
        widths = {len(v) if isinstance(v, list) else -1 for v in vectors}
        if len(widths) != 1 or min(widths) < 1:
            raise EmbeddingError(f"embeddings endpoint {self.url} answered embeddings that are not "
                                 "lists of numbers of one length")
        width = widths.pop()
        if self.dim is not None and width != self.dim:
            raise EmbeddingError(f"embeddings endpoint {self.url} answered {width}-dimensional "
                                 f"embeddings, earlier answers had {self.dim}: is it serving "
                                 f"another model than '{self.model}' now?")
        try:
            rows = np.asarray(vectors, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise EmbeddingError(f"embeddings endpoint {self.url} answered embeddings that are "
                                 "not lists of numbers") from exc
        if not np.isfinite(rows).all():
            raise EmbeddingError(f"embeddings endpoint {self.url} answered NaN or infinite values")
        self.dim = width
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return (rows / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)
