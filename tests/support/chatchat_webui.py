"""Langchain-Chatchat 0.3.1.3's own WebUI client, driven from a test.

``ensure_chatchat_client()`` installs the client in its own venv (scripts/install-chatchat-client.sh,
cached under ~/.cache/chatfleet like the vLLM venv); ``ChatchatWebUI`` runs
``chatchat_webui_driver.py`` in that venv against a gateway and sends it one op at a time (the
driver's docstring lists them). Nothing of Chatchat is imported into the test process: its pins
(httpx 0.27, openai 1.x, pydantic 2.7) differ from ChatFleet's.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-chatchat-client.sh"
DRIVER = Path(__file__).with_name("chatchat_webui_driver.py")
OP_TIMEOUT_S = 120.0


def ensure_chatchat_client() -> Path:
    """The client venv's python, installing it first when missing (about a minute, once)."""
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"installing Chatchat's client failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1]) / "bin" / "python"


class ChatchatWebUI:
    """The driver process; a context manager. Its stderr (Chatchat's logs) goes to ``log_path``."""

    def __init__(self, python: Path, base_url: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="chatchat-root-"))
        self.log_path = self.root / "driver.log"
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(python), str(DRIVER), base_url], cwd=self.root,
                env={**os.environ, "CHATCHAT_ROOT": str(self.root)},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def op(self, op: str, **kwargs: Any) -> Any:
        """Run one driver op; its result. Fails the test when the op raised in the driver."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], OP_TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"{op} gave no answer within {OP_TIMEOUT_S} s; {self._log_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver exited ({self._proc.wait()}); {self._log_tail()}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise AssertionError(f"{op} raised {answer['error']} in Chatchat's client: "
                                 f"{answer['message']}\n{answer['traceback']}")
        return answer["result"]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One ``ApiRequest`` method, as the WebUI calls it."""
        return self.op("call", method=method, args=list(args), kwargs=kwargs)

    def _log_tail(self) -> str:
        return "driver log:\n" + "\n".join(self.log_path.read_text(errors="replace")
                                           .splitlines()[-30:])

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
