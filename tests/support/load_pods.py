"""Pods as the endpoint picker sees them: HTTP servers whose ``GET /load`` answers what a test sets."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.procs import LOCALHOST


def load(running: int = 0, *, queued_i: int = 0, queued_b: int = 0, running_batch: int = 0,
         draining: bool = False, retry_after_s: int = 2, arrivals: int | None = None) -> dict[str, object]:
    """A gateway's ``/load`` answer (routing/pool_load.py's fields) with 4 slots, 3 of them for batch;
    without ``arrivals``, as a gateway older than that count answers."""
    answer: dict[str, object] = {
        "slots": 4, "batch_slots": 3, "running": running, "running_batch": running_batch,
        "queued_interactive": queued_i, "queued_batch": queued_b, "max_queue": 8,
        "draining": draining, "retry_after_s": retry_after_s}
    if arrivals is not None:
        answer["arrivals"] = arrivals
    return answer


class LoadPod:
    """A pod as the picker sees it: ``GET /load`` answers ``self.load`` (None: 503).

    ``host`` may be another loopback address (127.0.0.2, ...): pods of one InferencePool share
    its target port and differ by address, as pods in a cluster do."""

    def __init__(self, host: str = LOCALHOST, port: int = 0) -> None:
        self.load: dict[str, object] | None = load()
        pod = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                answer = pod.load
                body = json.dumps(answer if answer is not None else {"detail": "draining"}).encode()
                self.send_response(200 if self.path == "/load" and answer is not None else 503)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.endpoint = f"{host}:{self.server.server_address[1]}"
        # serve_forever checks for shutdown every poll_interval: 0.5 s by default, per pod closed.
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
