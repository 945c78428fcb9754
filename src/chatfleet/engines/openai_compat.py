"""An Engine that streams from an OpenAI-compatible upstream: vLLM's server in production.

Every request goes upstream as a stream (``stream: true`` with ``include_usage``), also when the
client asked for a single answer: the gateway then measures time to first token the same way for
both, and a client that goes away aborts the upstream request at once. Closing the iterator closes
the HTTP response; an unfinished response cannot go back to the pool, so its connection is closed,
and vLLM aborts the request when its client connection drops.

Generations stream through one ``aiohttp.ClientSession``: its C HTTP parser and asyncio-native
reads cost a fraction of httpx's pure-Python h11 and its layers of async generators per chunk (the
largest part of the gateway's CPU per relayed token, docs/benchmarks.md), its read timeout is one
timer per response that checks how long the read in progress has waited (``_ReadWatchdog``), and
a read returns everything that has arrived, so the events that arrived together are relayed as
one when the gateway is behind. The other calls (/models, the engine's /metrics) are rare and use
one shared ``httpx.AsyncClient`` whose connections are split over small pools
(``http_pools.ShardedTransport``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson
from yarl import URL

from chatfleet.engines.base import (
    EngineError,
    EngineRequestRejected,
    EngineUnavailable,
    GenerationDelta,
    GenerationRequest,
)
from chatfleet.engines.eager_body import EagerBodyRequest
from chatfleet.engines.upstream_wire import MAX_ERROR_BODY_BYTES, UpstreamStream, read_at_most
from chatfleet.http_pools import ShardedTransport

__all__ = ["OpenAICompatEngine"]

log = logging.getLogger(__name__)

_ERROR_TEXT_MAX = 512
"""Characters of an upstream error body kept in the message to the client."""
_MAX_MODELS_BYTES = 1 << 20
"""Largest /models answer read (1 MiB: thousands of model cards)."""
_MAX_METRICS_BYTES = 16 << 20
"""Largest metrics exposition relayed (16 MiB; vLLM's is tens of KiB)."""


def _upstream_message(status: int, raw: bytes) -> str:
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("message")
        if message:
            return str(message)[:_ERROR_TEXT_MAX]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    text = raw.decode("utf-8", "replace").strip()[:_ERROR_TEXT_MAX]
    return f"engine answered HTTP {status}" + (f": {text}" if text else "")


def _encoded(body: dict[str, Any]) -> bytes:
    """The engine request's body: compact UTF-8 JSON, as httpx encodes ``json=``.

    orjson writes it in a tenth of the stdlib's time (3 µs less a request). What orjson refuses
    (an integer over 64 bits, say in ``seed`` or ``response_format``; a lone surrogate) goes
    through the stdlib as it always did, so no body changes meaning and none is refused anew. The
    schemas refuse NaN and Infinity before this (the stdlib refuses them, orjson writes null).
    """
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class OpenAICompatEngine:
    """Streams generations from ``base_url`` (which includes ``/v1``)."""

    kind = "openai"

    def __init__(self, *, base_url: str, api_key: str | None = None, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 120.0, max_connections: int = 2048) -> None:
        self.base_url = base_url.rstrip("/")
        self.metrics_url = self.base_url.removesuffix("/v1") + "/metrics"
        """vLLM (and engine-sim) serve /metrics at the root, beside /v1."""
        self._api_key = api_key
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s,
                                      write=connect_timeout_s, pool=read_timeout_s)
        # aiohttp's ``connect`` bounds the wait for a free connection (httpx's pool timeout) and
        # the connection's setup. The gap allowed between two reads is ``read_timeout_s``, kept
        # by ``generate`` (the response's head) and ``_ReadWatchdog`` (its body), not by aiohttp's
        # ``sock_read``, which cancels and re-arms a timer on every read: one per token.
        self._read_timeout_s = read_timeout_s
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=read_timeout_s,
                                                     sock_connect=connect_timeout_s)
        self._max_connections = max_connections
        self._client: httpx.AsyncClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._urls = {True: URL(self.base_url + "/chat/completions"),
                      False: URL(self.base_url + "/completions")}

    def __repr__(self) -> str:
        return f"OpenAICompatEngine(base_url={self.base_url!r}, api_key={'***' if self._api_key else None})"

    async def start(self) -> None:
        # identity: what is read is what arrives, so the bounds on it (upstream_wire) are bounds
        # on memory too; a compressed answer could inflate past them inside the decoder.
        headers = {"Accept-Encoding": "identity"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # Building the transport loads the CA bundle into an SSL context (tens of ms): off the loop.
        transport = await asyncio.to_thread(ShardedTransport, connections=self._max_connections)
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout,
                                         transport=transport, headers=headers)
        tls = await asyncio.to_thread(httpx.create_ssl_context)  # the same CA bundle as httpx's
        # keepalive_timeout: httpx's default keep-alive expiry; no env proxies (trust_env off), as
        # the httpx pools; no decompression (identity above).
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ssl=tls,
                                         keepalive_timeout=5.0)
        # EagerBodyRequest: the request leaves in this step, not one loop pass later (eager_body.py).
        self._session = aiohttp.ClientSession(connector=connector, headers=headers,
                                              timeout=self._stream_timeout, auto_decompress=False,
                                              request_class=EagerBodyRequest)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("OpenAICompatEngine.start() was not called")
        return self._client

    async def _get(self, url: str, limit: int) -> tuple[int, bytes, bool, str | None]:
        """GET ``url``: status, at most ``limit`` bytes of the body (of an error body, at most
        MAX_ERROR_BODY_BYTES), whether there was more, and the content type."""
        async with self.client.stream("GET", url, timeout=5.0) as response:
            bound = limit if response.status_code == 200 else MAX_ERROR_BODY_BYTES
            body, truncated = await read_at_most(response.aiter_raw(), bound)
            return response.status_code, body, truncated, response.headers.get("content-type")

    async def list_models(self) -> list[str]:
        try:
            status, body, truncated, _ = await self._get("/models", _MAX_MODELS_BYTES)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} is not reachable: {exc!r}") from exc
        if status != 200:
            raise EngineUnavailable(_upstream_message(status, body))
        if truncated:
            raise EngineUnavailable(f"engine at {self.base_url} answered /models with more than "
                                    f"{_MAX_MODELS_BYTES} bytes")
        try:
            return [str(card["id"]) for card in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable(f"engine at {self.base_url} answered /models with an unexpected "
                                    "body") from exc

    async def metrics_exposition(self) -> tuple[bytes, str] | None:
        try:
            status, body, truncated, content_type = await self._get(self.metrics_url,
                                                                    _MAX_METRICS_BYTES)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"engine metrics at {self.metrics_url} are not reachable: {exc!r}") from exc
        if status != 200:
            raise EngineUnavailable(f"engine metrics at {self.metrics_url}: HTTP {status}")
        if truncated:
            raise EngineUnavailable(f"engine metrics at {self.metrics_url} are larger than "
                                    f"{_MAX_METRICS_BYTES} bytes")
        return body, content_type or "text/plain; version=0.0.4"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenAICompatEngine.start() was not called")
        return self._session

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = dict(request.sampling)
        body["model"] = request.model
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        data = _encoded(self._body(request))
        watchdog: _ReadWatchdog | None = None
        try:
            async with asyncio.timeout(self._read_timeout_s):  # until the response's head
                response = await self.session.post(self._urls[request.is_chat], data=data,
                                                   headers={"Content-Type": "application/json"})
            async with response:
                watchdog = _ReadWatchdog(response, self._read_timeout_s)
                if response.status != 200:
                    watchdog.waiting()  # the whole error body, within the read timeout
                    raw, _ = await read_at_most(response.content.iter_any(), MAX_ERROR_BODY_BYTES)
                    message = _upstream_message(response.status, raw)
                    if 400 <= response.status < 500 and response.status != 429:
                        raise EngineRequestRejected(message, status=response.status)
                    raise EngineUnavailable(message)
                # One loop over the reads, no generator per layer: this is the relay's hot path.
                content = response.content
                stream = UpstreamStream(chat=request.is_chat)
                clock = watchdog.clock
                while not stream.done:
                    watchdog.waiting_since = clock()  # ``waiting()``, without its call per token
                    piece = await content.readany()
                    watchdog.waiting_since = None
                    if not piece:
                        raise EngineUnavailable("engine closed the stream before it finished")
                    delta = stream.feed(piece)
                    if delta is not None:
                        yield delta
                    if stream.failure is not None:
                        raise stream.failure
                yield stream.finish()
        except EngineError as exc:
            if watchdog is not None and watchdog.expired:
                raise watchdog.timeout() from exc
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise EngineUnavailable(f"engine at {self.base_url} is not reachable: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            if watchdog is not None and watchdog.expired:
                raise watchdog.timeout() from exc
            raise EngineUnavailable(f"engine connection failed mid-request: {exc!r}") from exc
        except TimeoutError as exc:  # after aiohttp's own, which are TimeoutErrors too
            raise EngineUnavailable("engine sent nothing for too long: no answer within "
                                    f"{self._read_timeout_s:g} s (engine.read_timeout_s)") from exc
        finally:
            if watchdog is not None:
                watchdog.stop()


class _ReadWatchdog:
    """Closes a response whose engine has sent nothing for ``timeout_s`` while it was waited for:
    one timer per response that looks at when the wait in progress began (``waiting_since``, set
    by ``waiting`` or, on the relay's hot path, directly), where aiohttp's ``sock_read`` would
    cancel and re-arm a timer on every read. Time spent relaying (the client slow to take a
    token) is not the engine's: it does not count. The read then in progress fails, and
    ``generate`` answers ``timeout()`` for it."""

    __slots__ = ("_loop", "_response", "_timer", "clock", "expired", "timeout_s", "waiting_since")

    def __init__(self, response: aiohttp.ClientResponse, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.clock = self._loop.time
        self._response = response
        self.timeout_s = timeout_s
        self.waiting_since: float | None = None
        """When the read in progress began (``clock()``); None between reads."""
        self.expired = False
        self._timer = self._loop.call_later(timeout_s, self._check)

    def waiting(self) -> None:
        self.waiting_since = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        since = self.waiting_since
        if since is not None and now - since >= self.timeout_s:
            self.expired = True
            self._response.close()
            return
        self._timer = self._loop.call_at((since if since is not None else now) + self.timeout_s,
                                         self._check)

    def timeout(self) -> EngineUnavailable:
        return EngineUnavailable(f"engine sent nothing for too long: {self.timeout_s:g} s "
                                 "without a byte (engine.read_timeout_s)")

    def stop(self) -> None:
        self._timer.cancel()
