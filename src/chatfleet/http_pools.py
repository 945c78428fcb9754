"""An httpx transport whose connections are split over many small pools.

httpcore's pool (1.0.x) walks all of its connections, and for each idle one all of them again,
every time a request starts or ends. With hundreds of concurrent streams in one pool that
bookkeeping costs more CPU than relaying the streams (measured: about 370 µs per token at 512
streams in the load generator; docs/benchmarks.md). Here each request goes to the pool with the
fewest requests in flight, so every pool stays small and connections are still reused.

Its connections read without a cancel scope per read (``WatchedBackend``): httpcore's anyio
backend wraps every read in ``anyio.fail_after``, about a third of the CPU of reading a stream
(py-spy, docs/benchmarks.md); here one timer per connection enforces the read timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import typing
from collections.abc import AsyncIterator, Callable

import anyio
import httpcore
import httpx
from httpcore._backends.anyio import AnyIOBackend, AnyIOStream

__all__ = ["ShardedTransport", "WatchedBackend"]


class _WatchedStream(AnyIOStream):
    """A connection whose reads are bounded by one timer, not a cancel scope each.

    The timer fires at most once per ``timeout`` while the connection is in use and looks at the
    read in progress: one that has waited ``timeout`` closes the connection, and that read raises
    ``httpcore.ReadTimeout``, as a ``fail_after`` would have made it. Between reads (an idle
    connection in the pool) the timer lapses; the next read arms it again.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        self._loop = asyncio.get_running_loop()
        self._timeout = 0.0
        self._reading_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if timeout is not None:
            self._timeout = timeout
            self._reading_since = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_later(timeout, self._check)
        try:
            return await self._stream.receive(max_bytes)
        except anyio.EndOfStream:
            if self._closer is not None:
                raise httpcore.ReadTimeout(f"nothing read for {self._timeout:g} s") from None
            return b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if self._closer is not None:
                raise httpcore.ReadTimeout(f"nothing read for {self._timeout:g} s") from None
            raise httpcore.ReadError(repr(exc)) from exc
        finally:
            self._reading_since = None

    def _check(self) -> None:
        self._timer = None
        since = self._reading_since
        if since is None or self._closer is not None:
            return
        due = since + self._timeout
        if due > self._loop.time():
            self._timer = self._loop.call_at(due, self._check)
            return
        self._closer = self._loop.create_task(self._stream.aclose())

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closer is not None:
            await self._closer
            return
        await super().aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = await super().start_tls(ssl_context, server_hostname, timeout)
        return _WatchedStream(typing.cast(AnyIOStream, tls)._stream)


class WatchedBackend(AnyIOBackend):
    """httpcore's anyio backend, but its connections' reads are ``_WatchedStream``'s."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _WatchedStream(typing.cast(AnyIOStream, stream)._stream)


class _CountedStream(httpx.AsyncByteStream):
    """The response body, unchanged, that gives its pool's in-flight count back when closed.

    Iteration goes straight to the wrapped stream (no per-chunk cost); only ``aclose`` is extra.
    """

    __slots__ = ("_done", "_inner", "_on_close")

    def __init__(self, inner: httpx.AsyncByteStream, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close = on_close
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._done:
                self._done = True
                self._on_close()


class ShardedTransport(httpx.AsyncBaseTransport):
    """``connections`` in pools of ``per_pool``; each request uses the least busy pool."""

    def __init__(self, *, connections: int, per_pool: int = 16,
                 verify: ssl.SSLContext | bool = True) -> None:
        if connections < 1 or per_pool < 1:
            raise ValueError("connections and per_pool must be at least 1")
        per_pool = min(per_pool, connections)
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        # One TLS context for all pools: building one loads the CA bundle (tens of ms).
        tls = httpx.create_ssl_context(verify) if not isinstance(verify, ssl.SSLContext) else verify
        self._pools = [httpx.AsyncHTTPTransport(verify=tls, limits=limits)
                       for _ in range(-(-connections // per_pool))]
        backend = WatchedBackend()
        for pool in self._pools:  # the same pool as httpx builds, on the watched backend
            pool._pool = httpcore.AsyncConnectionPool(
                ssl_context=tls, max_connections=per_pool, max_keepalive_connections=per_pool,
                keepalive_expiry=limits.keepalive_expiry, network_backend=backend)
        self._busy = [0] * len(self._pools)

    @property
    def pools(self) -> int:
        return len(self._pools)

    def in_flight(self) -> int:
        return sum(self._busy)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        index = busy.index(min(busy))
        busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            busy[index] -= 1
            raise

        def release() -> None:
            busy[index] -= 1

        response.stream = _CountedStream(response.stream, release)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
