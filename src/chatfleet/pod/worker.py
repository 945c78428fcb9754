"""One gateway process: ``serve_gateway`` (what ``chatfleet serve`` runs with one worker), and
``python -m chatfleet.pod.worker``, one of a pod's workers as the supervisor starts it.

A worker is a fresh interpreter (``supervisor.py`` spawns it; nothing is inherited from the
supervisor's memory). It finds in its environment the configuration (the supervisor's own,
command-line overrides included), the listening socket's descriptor, the heartbeat pipe's write
end, ``PROMETHEUS_MULTIPROC_DIR`` and the pod admission coordinator's socket.
"""

from __future__ import annotations

import os
import socket

from chatfleet.app import create_app, startup_fields
from chatfleet.http_limits import HttpLimits
from chatfleet.logs import configure_logging
from chatfleet.pod.heartbeat import HEARTBEAT_FD_ENV, LISTEN_FD_ENV, Heartbeat, heartbeat_interval_s
from chatfleet.server import serve_app
from chatfleet.serving.pod_admission import POD_ADMISSION_SOCKET_ENV
from chatfleet.settings import Settings

__all__ = ["main", "serve_gateway"]


def serve_gateway(settings: Settings, sock: socket.socket, *, heartbeat: Heartbeat | None = None,
                  pod_admission_socket: str | None = None) -> None:
    """Build the gateway app from ``settings`` and serve it on ``sock`` until it has drained."""
    gateway = create_app(settings, pod_admission_socket=pod_admission_socket)
    server = settings.server
    serve_app(gateway, sock, log_level=server.log_level, drain_timeout_s=server.drain_timeout_s,
              keep_alive_s=server.keep_alive_s, slow_callback_s=server.slow_callback_s,
              forwarded_allow_ips=server.forwarded_allow_ips,
              http_limits=HttpLimits(server.max_header_bytes, server.max_headers,
                                     server.header_timeout_s, server.body_timeout_s),
              describe={**startup_fields(gateway), "worker_pid": os.getpid()}
              if heartbeat is not None else startup_fields(gateway),
              heartbeat=heartbeat)


def main() -> None:
    listen_fd = int(os.environ.pop(LISTEN_FD_ENV))
    heartbeat_fd = int(os.environ.pop(HEARTBEAT_FD_ENV))
    settings = Settings()  # the supervisor checked it; a worker fails only as it would
    configure_logging(settings.server.log_level, settings.log.format)
    sock = socket.socket(fileno=listen_fd)
    serve_gateway(settings, sock,
                  heartbeat=Heartbeat(heartbeat_fd,
                                      heartbeat_interval_s(settings.server.worker_hang_timeout_s)),
                  pod_admission_socket=os.environ.get(POD_ADMISSION_SOCKET_ENV))


if __name__ == "__main__":
    main()
