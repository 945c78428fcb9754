"""A real Prometheus server on 127.0.0.1 for scrape tests (Debian's prometheus package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import ManagedProcess, free_port
from tests.support.tools import tool_path


def start_prometheus(workdir: Path, config: dict[str, Any] | Path) -> tuple[ManagedProcess, str]:
    """Start Prometheus with ``config`` (a dict written to ``workdir``, or a file) and its TSDB in
    ``workdir``; return the process (the caller stops it) and its URL, once it is ready."""
    if isinstance(config, dict):
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
    else:
        config_path = config
    port = free_port()
    proc = ManagedProcess([tool_path("prometheus"), f"--config.file={config_path}",
                           f"--storage.tsdb.path={workdir / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                          log_path=workdir / "prometheus.log", name="prometheus").start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/-/ready", timeout=30)
    except BaseException:
        proc.terminate()
        raise
    return proc, url
