"""An embeddings endpoint that holds chosen requests: makes write races deterministic.

``GatedEmbeddings`` is an OpenAI-style ``/v1/embeddings`` on 127.0.0.1 (hashed 8-dimensional
vectors) in the test's process. While ``hold()`` is in effect it holds every request whose texts
contain ``MARKER`` until the block ends, so a test knows a gateway is inside that file's
ingestion, after reading it and before storing it, and can do its delete or rival write then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.procs import free_port

__all__ = ["DIM", "MARKER", "GatedEmbeddings"]

MARKER = "zymurgyheld"
"""A word only the held file's text has: its embedding request is the one held."""
DIM = 8


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 + 0.01 for b in digest[:DIM]]


class GatedEmbeddings(AbstractContextManager["GatedEmbeddings"]):
    def __init__(self) -> None:
        self._held = threading.Condition()
        self._held_count = 0
        self._armed = False
        self._release = threading.Event()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                if gate._armed and any(MARKER in text for text in texts):
                    with gate._held:
                        gate._held_count += 1
                        gate._held.notify_all()
                    gate._release.wait(30)
                data = [{"object": "embedding", "index": i, "embedding": _vector(text)}
                        for i, text in enumerate(texts)]
                payload = json.dumps({"object": "list", "data": data, "model": body["model"]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> GatedEmbeddings:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._held:
            self._held_count = 0
        self._release.clear()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
            self._release.set()

    async def wait_held(self, count: int = 1) -> None:
        """Return once ``count`` requests are held (within 30 s)."""
        def wait() -> bool:
            with self._held:
                return self._held.wait_for(lambda: self._held_count >= count, 30)
        assert await asyncio.to_thread(wait), f"fewer than {count} held files were embedded"
