"""A Kubernetes API server for tests of programs that watch it: kmock's emulator, run on an event
loop of its own (a thread), so that a synchronous test can block while the emulator keeps
streaming watch events, reached through a TCP relay the test can cut to take the API server
away (every open connection reset, new ones refused) and restore on the same address.

Objects are changed through the API (``request``, straight to kmock, relay or not), so every
change reaches the watches as an event, as a kubelet's or a controller's change does.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import attrs
import httpx
import kmock
import trustme
from aiohttp import web

from tests.support.procs import LOCALHOST, free_port


class _Relay:
    """Forwards every TCP connection on ``port`` to ``target`` (TLS ends here when ``tls`` is
    given); ``cut`` resets them all."""

    def __init__(self, target: int, tls: ssl.SSLContext | None) -> None:
        self.port = free_port()
        self._target = target
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, LOCALHOST, self.port, ssl=self._tls)

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        self._server = None
        for writer in list(self._open):
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCALHOST, self._target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


@attrs.define(kw_only=True)
class _Emulator(kmock.KubernetesEmulator):
    """kmock, whose next watch of a resource named in ``expire`` ends at once with the ERROR event
    an API server sends for a resourceVersion it no longer keeps (410 Expired)."""

    expire: set[str] = attrs.field(factory=set)

    async def _handle(self, request: kmock.Request) -> web.StreamResponse:
        plural = request.resource.plural if request.resource is not None else None
        if request.action == kmock.action.WATCH and plural in self.expire:
            self.expire.discard(plural)
            event = {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                                 "reason": "Expired", "code": 410,
                                                 "message": "too old resource version"}}
            return web.Response(body=json.dumps(event).encode() + b"\n", content_type="application/json")
        return await super()._handle(request)


class KubeApiServer:
    """kmock's emulator on its own loop, behind a relay; ``url`` is the relay's: HTTPS with a
    certificate for 127.0.0.1 from ``ca`` when one is given, as an API server's."""

    def __init__(self, resources: dict[str, kmock.ResourceInfo], ca: trustme.CA | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmock", daemon=True)
        self._thread.start()
        self._done = asyncio.Event()
        self._started: Future[tuple[_Emulator, int]] = Future()
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(resources), self._loop)
        self.emulator: _Emulator
        self.emulator, kmock_port = self._started.result(15)
        self.direct_url = f"http://{LOCALHOST}:{kmock_port}"
        tls = None
        if ca is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert(LOCALHOST).configure_cert(tls)
        self._relay = _Relay(kmock_port, tls)
        self._run(self._relay.start())
        self.url = f"{'http' if tls is None else 'https'}://{LOCALHOST}:{self._relay.port}"
        self.client = httpx.Client(base_url=self.direct_url, timeout=5, trust_env=False)

    async def _serve(self, resources: dict[str, kmock.ResourceInfo]) -> None:
        async with _Emulator() as emulator, kmock.Server(emulator) as server:
            for name, info in resources.items():
                emulator.resources[name] = info
            self._started.set_result((emulator, server.port))
            await self._done.wait()

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(15)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A call straight to kmock (past the relay); a merge patch for PATCH."""
        headers = {"content-type": "application/merge-patch+json"} if method == "PATCH" else {}
        response = self.client.request(method, path, json=body, headers=headers)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def cut(self) -> None:
        """The API server is gone: open connections reset, new ones refused."""
        self._run(self._relay.cut())

    def restore(self) -> None:
        self._run(self._relay.start())

    def expire_next_watch(self, plural: str) -> None:
        """The next watch of ``plural`` gets 410 Expired, as after a long disconnection."""
        self._loop.call_soon_threadsafe(self.emulator.expire.add, plural)

    def requests(self) -> list[kmock.Request]:
        """Every request kmock has had, the test's own included."""
        return list(self.emulator)

    def close(self) -> None:
        """Stops kmock, resetting what is still connected (kmock waits for open watches)."""
        self.client.close()
        if self._relay.serving:
            self.cut()
        self._loop.call_soon_threadsafe(self._done.set)
        self._serving.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
