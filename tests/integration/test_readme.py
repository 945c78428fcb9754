"""The README's examples run as written, from the repository root (issue 11).

The marker. Each fenced shell block of README.md (```bash, sh, shell or console) has an HTML
comment on the line right before its opening fence, invisible once rendered:

- ``<!-- runnable -->``: this test runs the block with ``bash -euo pipefail -c``, so every command
  in it must exit 0, then checks its output where the block is one it knows (``CHECKS``);
- ``<!-- runnable: server -->``: the block starts a server that runs until stopped (``chatfleet
  serve``): it is started in the background, waited for until /readyz answers 200, left running
  for the blocks after it, and stopped with SIGTERM at the end;
- ``<!-- not runnable: <why> -->``: not run here (it needs vLLM and a GPU, a Kubernetes cluster,
  or it runs the whole test suite, this test included).

A shell block without one of these fails the first test: a new example says whether it runs.

How the blocks run: in README order, in the repository root (they name README.md, docs/*.md and
examples/; the install commands there, ``python3 -m pip install -e .``, reinstall this same
checkout, which a copy of the repository would not). The environment is this one without any
CHATFLEET_* variable (a fresh shell's), with this interpreter's bin directory first on PATH (the
``python3`` and ``chatfleet`` under test), plus:

- a free port instead of 8000: ``CHATFLEET_SERVER__PORT`` for the server, every ``127.0.0.1:8000``
  in the blocks rewritten to it, and ``CHATFLEET_URL`` for ``chatfleet kb`` (its default is
  127.0.0.1:8000), so a gateway already on 8000 is neither used nor disturbed;
- ``CHATFLEET_KB__DATA_DIR`` in a temporary directory: the reader's server keeps its knowledge
  bases in ./data, which .gitignore covers; this test's leave nothing behind;
- ``/tmp/chatfleet-sim`` rewritten to a temporary directory, where the simulate example writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from tests.support.procs import ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHELLS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"<!--\s*(?:(?P<run>runnable)(?::\s*(?P<server>server))?|not runnable:\s*\S.*?)\s*-->")
README_PORT = "127.0.0.1:8000"
README_SIM_DIR = "/tmp/chatfleet-sim"
BLOCK_TIMEOUT_S = 180
SERVER_READY_S = 180
"""Both include a ``pip install -e`` of the checkout (seconds when it is installed already)."""


@dataclass(frozen=True)
class Block:
    line: int
    """Of the opening fence, 1-based, for messages."""
    text: str
    marker: str
    """``runnable``, ``server``, ``not runnable``, or ``""`` when the line before has none."""


def readme_blocks() -> list[Block]:
    """README.md's fenced shell blocks with their markers, in order."""
    source = README.read_text()
    lines = source.splitlines()
    blocks = []
    for token in MarkdownIt("commonmark").parse(source):
        if token.type != "fence" or token.info.split(" ")[0] not in SHELLS or token.map is None:
            continue
        opening = token.map[0]
        match = MARKER.fullmatch(lines[opening - 1].strip()) if opening else None
        marker = ("" if match is None else "not runnable" if not match["run"]
                  else "server" if match["server"] else "runnable")
        blocks.append(Block(line=opening + 1, text=token.content, marker=marker))
    return blocks


def test_every_shell_block_in_the_readme_says_whether_it_runs() -> None:
    blocks = readme_blocks()
    unmarked = [block.line for block in blocks if not block.marker]
    assert not unmarked, (f"README.md lines {unmarked}: put <!-- runnable -->, <!-- runnable: "
                          "server --> or <!-- not runnable: why --> on the line before the fence")
    markers = [block.marker for block in blocks]
    assert markers.count("server") == 1 and markers.index("server") < markers.index("runnable"), (
        "the install-and-serve block comes first, and the blocks that talk to it after it")


# What a block's output must show, beyond its exit status 0: the first key found in its text picks.
def _chat_streams(stdout: str, _: Path) -> None:
    events = [line.removeprefix("data: ") for line in stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", stdout
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) >= 2 and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert any(choice["delta"].get("content") for chunk in chunks for choice in chunk["choices"])


def _kb_created_filled_and_asked(stdout: str, _: Path) -> None:
    decoder = json.JSONDecoder()
    created, end = decoder.raw_decode(stdout)
    uploaded, end = decoder.raw_decode(stdout, end)
    assert created["code"] == 200, created
    assert uploaded["code"] == 200 and uploaded["data"]["failed_files"] == {}, uploaded
    events = [json.loads(line.removeprefix("data: "))
              for line in stdout[end:].splitlines() if line.startswith("data: ")]
    assert events and events[0]["docs"], "kb_chat's first event lists the chunks it found"
    assert any(choice["delta"].get("content") for event in events[1:] for choice in event["choices"])


def _kb_cli_created_filled_and_searched(stdout: str, _: Path) -> None:
    assert "created knowledge base 'handbook'" in stdout
    assert "README.md: stored" in stdout
    search = stdout.rsplit(": stored", 1)[1]
    assert ".md" in search, "the search lists chunks with the files they come from"


def _simulated_every_policy(stdout: str, out_dir: Path) -> None:
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["policies"]) == {"static", "hpa", "keda", "operator", "oracle"}
    assert report["policies"]["hpa"]["peak_replicas"] > 1
    assert (out_dir / "replicas-queue-ttft.png").stat().st_size > 10_000
    assert "oracle" in stdout


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "/v1/chat/completions": _chat_streams,
    "/knowledge_base/create_knowledge_base": _kb_created_filled_and_asked,
    "chatfleet kb search": _kb_cli_created_filled_and_searched,
    "chatfleet simulate": _simulated_every_policy,
}


def _as_run_here(text: str, port: int, out_dir: Path) -> str:
    return text.replace(README_PORT, f"127.0.0.1:{port}").replace(README_SIM_DIR, str(out_dir))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], int]:
    """The blocks' environment (see the module's docstring) on top of os.environ, and the
    server's port."""
    for name in [name for name in os.environ if name.startswith("CHATFLEET_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    port = free_port()
    return {"CHATFLEET_SERVER__PORT": str(port), "CHATFLEET_URL": f"http://127.0.0.1:{port}",
            "CHATFLEET_KB__DATA_DIR": str(tmp_path / "kb")}, port


def _stop(server: ManagedProcess, port: int) -> None:
    """SIGTERM to the group, bash and the `chatfleet serve` it started, which drains and exits."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        wait_until(lambda: not _listening(port), timeout=30, message="the README's server stopped")
    finally:
        server.terminate()


def test_the_readmes_runnable_blocks_run_as_written(environment: tuple[dict[str, str], int],
                                                    tmp_path: Path) -> None:
    env, port = environment
    out_dir = tmp_path / "sim"
    servers: list[ManagedProcess] = []
    checked: set[str] = set()
    try:
        for block in readme_blocks():
            script = _as_run_here(block.text, port, out_dir)
            where = f"README.md line {block.line}"
            if block.marker == "server":
                server = ManagedProcess(["bash", "-c", script], env=env, cwd=ROOT, name="readme-server",
                                        log_path=tmp_path / f"server-{block.line}.log").start()
                servers.append(server)
                server.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=SERVER_READY_S)
                assert f"listening on http://127.0.0.1:{port}" in server.log_text(), where
            elif block.marker == "runnable":
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                                     env={**os.environ, **env}, capture_output=True, text=True,
                                     timeout=BLOCK_TIMEOUT_S, check=False)
                assert run.returncode == 0, (f"{where} exited {run.returncode}:\n{script}\n--- stdout\n"
                                             f"{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}")
                key = next((key for key in CHECKS if key in block.text), None)
                if key is not None:
                    CHECKS[key](run.stdout, out_dir)
                    checked.add(key)
    finally:
        for server in servers:
            _stop(server, port)
    assert checked == set(CHECKS), f"no runnable block runs {set(CHECKS) - checked}: update CHECKS"
