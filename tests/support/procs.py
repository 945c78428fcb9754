"""Subprocesses for tests: started on 127.0.0.1 ports, logged to a file, always cleaned up.

Each process leads its own process group, so :meth:`ManagedProcess.terminate` reaches whatever
it spawned (vLLM runs its engine in child processes). Outside the test runner's group it would
outlive a runner that is killed, so a watchdog (``sh``, in a session of its own) holds the read
end of a pipe only the runner writes to: when the runner dies, however it dies, the pipe closes
and the watchdog sends the group SIGTERM, then SIGKILL. A server's own signal handling is not
enough: vLLM ignores a SIGTERM that arrives while its engine starts, and a SIGKILLed vLLM API
server leaves its engine processes running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

LOCALHOST = "127.0.0.1"
WATCHDOG_GRACE_S = 15
# $1: the process group (never below 2: "kill -1" would signal every process); $2: grace seconds.
# dash's kill takes no "--" before a negative (group) id.
_WATCHDOG = '[ "$1" -gt 1 ] || exit 2; read _; kill -TERM "-$1"; sleep "$2"; kill -KILL "-$1"'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, message: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout:.1f}s")
        time.sleep(interval)


class ManagedProcess:
    """A subprocess whose stdout and stderr go to ``log_path``; a context manager.

    ``env`` is added on top of the current environment.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
        name: str = "proc",
    ) -> None:
        self.args = [os.fspath(a) for a in args]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.name = name
        if log_path is None:
            fd, raw = tempfile.mkstemp(prefix=f"chatfleet-{name}-", suffix=".log")
            os.close(fd)
            log_path = Path(raw)
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Spawn the process (returns at once; see :meth:`wait_http` for readiness)."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._watchdog = subprocess.Popen(
            ["sh", "-c", _WATCHDOG, "watchdog", str(self._popen.pid), str(WATCHDOG_GRACE_S)],
            stdin=subprocess.PIPE,  # this process holds the only write end
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; else the exit status (negative: killed by that signal)."""
        return self.popen.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _failure(self, what: str) -> str:
        return f"{self.name} (pid {self.pid}) {what}; log {self.log_path}, last lines:\n{self.log_tail()}"

    def wait_http(
        self, url: str, timeout: float, predicate: Callable[[httpx.Response], bool] | None = None
    ) -> httpx.Response:
        """Poll ``url`` until it answers 200 (and ``predicate`` accepts the response).

        Fails fast, with the log tail, if the process exits meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                raise RuntimeError(self._failure(f"exited with {self.returncode} before {url} was ready"))
            try:
                response = httpx.get(url, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if response.status_code == 200 and (predicate is None or predicate(response)):
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(self._failure(f"did not make {url} ready within {timeout:.0f}s"))
            time.sleep(0.25)

    def send_signal(self, sig: int) -> None:
        """Signal the process itself (not its children), as an orchestrator would."""
        self.popen.send_signal(sig)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the whole process group.

        Returns the exit status (None if never started). Safe to call more than once.
        """
        if self._popen is None:
            return None
        if self._watchdog is not None:  # stood down first: closing its pipe would set it off
            self._watchdog.kill()
            self._watchdog.communicate()  # reaps it and closes the pipe
            self._watchdog = None
        if self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The group outlives its leader when children linger: kill whatever is left.
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._popen.wait()
        return self._popen.returncode

    def __enter__(self) -> Self:
        return self.start() if self._popen is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.terminate()
