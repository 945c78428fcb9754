"""Run the gateway on uvicorn with a graceful drain on SIGTERM.

Kubernetes sends SIGTERM when it scales a pod down. uvicorn's own handling closes the listening
socket and then waits for connections, so late arrivals get connection errors. ChatFleet instead:
turns /readyz false and answers new requests 503 + Retry-After at once (the endpoint controller
takes the pod out of the Service meanwhile), lets queued and running requests finish for up to
``server.drain_timeout_s``, then lets uvicorn shut down, and exits 0. A second SIGTERM, or SIGINT,
stops at once as uvicorn would.

Once the app has started and the socket listens, one INFO line says where and what: the address
as bound and the fields the caller describes the gateway with (``app.startup_fields``). uvicorn
gets no logging configuration of its own: its lines go through the process's (``logs.py``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from types import FrameType

import uvicorn
from fastapi import FastAPI

from chatfleet.api.sse import DirectBodySend
from chatfleet.http_limits import HttpLimits, bounded_protocol
from chatfleet.logs import FIELDS
from chatfleet.pod.heartbeat import Heartbeat

__all__ = ["DrainingServer", "listen_url", "listening_socket", "serve_app"]

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, app: FastAPI, drain_timeout_s: float,
                 describe: Mapping[str, object] | None = None,
                 heartbeat: Heartbeat | None = None) -> None:
        super().__init__(config)
        self._app = app
        self._heartbeat = heartbeat
        self._drain_timeout_s = drain_timeout_s
        self._describe = dict(describe or {})
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        if self._heartbeat is not None:
            self._heartbeat.start(self._loop)
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:  # not after a failed start-up
            address = listen_url(sockets[0])
            described = " ".join(f"{k}={v}" for k, v in self._describe.items() if v is not None)
            log.info("listening on %s; %s", address, described,
                     extra={FIELDS: {"listen": address, **self._describe}})

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="chatfleet-drain")

    async def _drain(self) -> None:
        lifecycle = getattr(self._app.state, "lifecycle", None)
        if lifecycle is not None:
            log.info("SIGTERM: draining (up to %g s)", self._drain_timeout_s)
            await lifecycle.drain(self._drain_timeout_s)
        self.should_exit = True


GIL_SWITCH_INTERVAL_S = 0.001
"""How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
Knowledge-base work runs in threads (the local store's tokenizing, BM25, FAISS, SQLite); with
several of them busy, the event loop's thread waited many 5 ms turns for the GIL, and a callback
that needed 1 ms took 166 ms (tests/integration/test_event_loop.py). 1 ms turns bound that wait
for a small cost in switches."""


GC_THRESHOLDS = (5000, 50, 10)
"""The cyclic collector's thresholds (CPython's default: 700, 10, 10). A streamed request keeps a
few hundred container objects alive (coroutines, frames, messages) while it streams, and almost
none of them ever become cyclic garbage (about 40 objects freed by the collector per thousand
requests in the relay benchmark). With the default, 256 concurrent streams pushed them through
both young generations and into full collections: about 0.10 ms of collector time per short
request, an eighth of the gateway's CPU for it. Young collections every 5,000 allocations and a
middle one every 50 of those: about 0.04 ms (measured with gc.callbacks, 2,048 one-token
streams, 256 at a time). A collection's pause is bounded by the objects alive, not by these
numbers (under 1 ms young, about 7 ms middle with 256 streams open, as the default's full
collections were); the little cyclic garbage there is waits longer to be freed."""


def listening_socket(host: str, port: int, send_buffer_bytes: int | None) -> socket.socket:
    """The listening socket; accepted connections inherit its ``SO_SNDBUF`` (Linux), so
    ``send_buffer_bytes`` bounds the kernel memory each client connection can fill."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    if send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    return sock


def listen_url(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket, as bound (``[host]`` for IPv6)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_app(app: FastAPI, sock: socket.socket, *, log_level: str, drain_timeout_s: float,
              keep_alive_s: float, http_limits: HttpLimits, slow_callback_s: float | None = None,
              forwarded_allow_ips: Sequence[str] = (),
              describe: Mapping[str, object] | None = None,
              heartbeat: Heartbeat | None = None) -> None:
    """Serve ``app`` on ``sock`` (from ``listening_socket``: the caller binds it first, so an
    address in use is its error to explain, before anything starts) until SIGTERM has drained it
    (or SIGINT). One worker, one event loop.

    ``slow_callback_s`` turns on asyncio's debug mode on the stdlib loop (uvloop does not report
    slow callbacks): every callback that holds the loop longer is logged, to find blocking calls.
    ``forwarded_allow_ips``: the proxies whose X-Forwarded-For/-Proto uvicorn believes; none
    (the default) turns its proxy headers off, where uvicorn would believe any on 127.0.0.1.
    ``describe``: what the start-up line says about the app besides its address (None values are
    left out of the text). ``http_limits``: what a connection may send, and how slowly
    (``http_limits.py``). ``heartbeat``: this process is a pod's worker, and tells its supervisor
    from the event loop that the loop turns (``pod/heartbeat.py``).
    """
    debug = slow_callback_s is not None
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(DirectBodySend(app), host=host, port=port, log_config=None, log_level=log_level,
                            access_log=False, timeout_graceful_shutdown=5, lifespan="on",
                            timeout_keep_alive=keep_alive_s, http=bounded_protocol(http_limits),
                            loop="asyncio" if debug else "auto",
                            proxy_headers=bool(forwarded_allow_ips),
                            forwarded_allow_ips=list(forwarded_allow_ips) or None)
    server = DrainingServer(config, app=app, drain_timeout_s=drain_timeout_s, describe=describe,
                            heartbeat=heartbeat)
    with asyncio.Runner(debug=debug, loop_factory=config.get_loop_factory()) as runner:
        if slow_callback_s is not None:
            runner.get_loop().slow_callback_duration = slow_callback_s
        runner.run(server.serve(sockets=[sock]))
