"""``chatfleet serve`` with more than one worker: prepare the pod's private directory, then run the
supervisor.

prometheus-client picks its multiprocess mode once, when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``. So this module imports nothing that imports it: ``run_pod`` makes a
fresh directory (under ``$TMPDIR`` or ``/tmp``, the chart's writable emptyDir under a read-only
root), sets the variable, and only then imports the supervisor (and with it the metrics). The
workers inherit the variable. The directory also holds the admission coordinator's socket; it is
mode 0700 (``mkdtemp``), so only the pod's own user reaches either, and it is removed at exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile

from chatfleet.settings import Settings

__all__ = ["MULTIPROC_ENV", "run_pod"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run_pod(settings: Settings, sock: socket.socket, workers: int) -> int:
    """Run the supervisor of ``workers`` processes serving ``sock``; its exit status."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the pod's metrics directory was "
                           "set: its multiprocess mode would be off in the supervisor")
    run_dir = tempfile.mkdtemp(prefix="chatfleet-pod-")
    metrics_dir = os.path.join(run_dir, "metrics")
    os.mkdir(metrics_dir, 0o700)
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        from chatfleet.pod.supervisor import Supervisor

        return Supervisor(settings, sock, workers=workers, run_dir=run_dir).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
