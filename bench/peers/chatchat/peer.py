"""Langchain-Chatchat 0.3.1.3 as a baseline peer: install it in its own venv, point it at an
OpenAI-compatible upstream (engine-sim or vLLM), run its API server on 127.0.0.1, tear it down.

Steps and traps, from its code (shared/reference/chatchat-baseline.md):
- Python 3.11 venv under ~/.cache/chatfleet/peers/ (its pins: numpy 1.24, langchain 0.1.17,
  openai < 2); ``httpx<0.28``, because 0.28 removed the ``proxies=`` argument its client uses.
- One model platform of type ``oneapi`` (``openai`` would make it fetch a tiktoken tokenizer:
  no network here), with the upstream's /v1 URL and ``auto_detect_model: false``.
- ``NLTK_DATA`` set to the copy inside the package (``chatchat init`` creates an empty one and
  its loaders would try to download into it).
- Its API server alone (``chatchat.server.api_server.server_app``), bound to 127.0.0.1.

Usage (prints the peer's base URL, runs until Ctrl-C or SIGTERM, then stops it):
    python bench/peers/chatchat/peer.py --upstream http://127.0.0.1:8001/v1 \\
        --llm chatfleet-sim/tiny-cpu --embed chatfleet-sim/hashed-embedding --port 7861
``ChatchatPeer`` does the same from Python (the peer benchmark uses it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import yaml

VERSION = "0.3.1.3"
PINS = (f"langchain-chatchat=={VERSION}", "httpx<0.28")
VENV = Path.home() / ".cache" / "chatfleet" / "peers" / f"chatchat-{VERSION}"
HOST = "127.0.0.1"


def install(venv: Path = VENV) -> Path:
    """The venv's python, installing Chatchat first if missing (about 2 min, 1 GB)."""
    python = venv / "bin" / "python"
    marker = venv / ".chatfleet-installed"
    if marker.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *PINS], check=True)
    marker.write_text(" ".join(PINS) + "\n")
    return python


def _site_packages(python: Path) -> Path:
    code = "import chatchat, os; print(os.path.dirname(os.path.dirname(chatchat.__file__)))"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def configure(python: Path, root: Path, *, upstream: str, llm: str, embed: str, port: int,
              concurrency: int) -> None:
    """``chatchat init`` into ``root``, then one ``oneapi`` platform at ``upstream``."""
    env = {**os.environ, "CHATCHAT_ROOT": str(root)}
    subprocess.run([str(python.parent / "chatchat"), "init", "-l", llm, "-e", embed],
                   check=True, cwd=root, env=env, capture_output=True)
    models_path = root / "model_settings.yaml"
    models = yaml.safe_load(models_path.read_text())
    models["DEFAULT_LLM_MODEL"] = llm
    models["DEFAULT_EMBEDDING_MODEL"] = embed
    models["MODEL_PLATFORMS"] = [{
        "platform_name": "upstream", "platform_type": "oneapi", "api_base_url": upstream,
        "api_key": "EMPTY", "api_proxy": "", "api_concurrencies": concurrency,
        "auto_detect_model": False, "llm_models": [llm], "embed_models": [embed],
        "text2image_models": [], "image2text_models": [], "rerank_models": [],
        "speech2text_models": [], "text2speech_models": []}]
    models_path.write_text(yaml.safe_dump(models, allow_unicode=True, sort_keys=False))
    basic_path = root / "basic_settings.yaml"
    basic = yaml.safe_load(basic_path.read_text())
    basic["API_SERVER"] = {"host": HOST, "port": port, "public_host": HOST, "public_port": port}
    basic_path.write_text(yaml.safe_dump(basic, allow_unicode=True, sort_keys=False))


class ChatchatPeer:
    """A configured, started Chatchat API server; a context manager that always stops it."""

    def __init__(self, *, upstream: str, llm: str, embed: str, port: int,
                 concurrency: int = 5, root: Path | None = None) -> None:
        self.upstream, self.llm, self.embed, self.port = upstream, llm, embed, port
        self.concurrency = concurrency
        self._own_root = root is None
        self.root = root if root is not None else Path(tempfile.mkdtemp(prefix="chatchat-"))
        self.log_path = self.root / "api.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 180.0) -> Self:
        python = install()
        configure(python, self.root, upstream=self.upstream, llm=self.llm, embed=self.embed,
                  port=self.port, concurrency=self.concurrency)
        env = {**os.environ, "CHATCHAT_ROOT": str(self.root),
               "NLTK_DATA": str(_site_packages(python) / "chatchat" / "data" / "nltk_data")}
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(python), "-m", "uvicorn", "chatchat.server.api_server.server_app:app",
                 "--host", HOST, "--port", str(self.port), "--log-level", "warning"],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Chatchat exited with {self._proc.returncode}; see "
                                   f"{self.log_path}:\n{self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/knowledge_base/list_knowledge_bases",
                             timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Chatchat did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, with /v1")
    parser.add_argument("--llm", required=True, help="the chat model name the upstream serves")
    parser.add_argument("--embed", required=True, help="the embedding model name it serves")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--concurrency", type=int, default=5,
                        help="Chatchat's api_concurrencies for the platform (its default 5)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ChatchatPeer(upstream=args.upstream, llm=args.llm, embed=args.embed, port=args.port,
                      concurrency=args.concurrency) as peer:
        print(f"Chatchat {VERSION} at {peer.url} (log: {peer.log_path})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
