"""Hostile uploads against a real gateway (issue 12, points 2, 3, 9 and 4's upload parts).

Files that unpack or split into far more than their size (a .docx zip bomb, a CSV of many rows,
chunk_size=1), a file that takes long to read, an ingest worker killed mid-file, SIGTERM during an
ingestion, and an upload that will be refused: each is refused with a reason that names the bound
and its setting, leaves the gateway's memory and the next upload alone, and nothing behind.

The slow file is text split with ``chunk_overlap = chunk_size - 1``: every character starts a
chunk, so 2 MB takes the worker ten seconds or more; the tests that need it busy stop it early.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.support.procs import wait_until

KB = "hostile"
FAST_STOP = {"CHATFLEET_SERVER__DRAIN_TIMEOUT_S": "1"}
"""A stopping gateway waits this long for its ingestions (the tests end some mid-file)."""
SLOW_FILE = ("slow.txt", ("word " * 400_000).encode())
SLOW_SPLIT = {"chunk_size": "50", "chunk_overlap": "49"}
SMALL_FILE = ("small.txt", b"A small file about queue depth and autoscaling.\n" * 200)  # 9.6 KB


def _create_kb(api: httpx.Client) -> None:
    answer = api.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": KB})
    assert answer.json()["code"] == 200


def _upload(api: httpx.Client, *files: tuple[str, bytes], **form: str) -> httpx.Response:
    return api.post("/knowledge_base/upload_docs", data={"knowledge_base_name": KB, **form},
                    files=[("files", file) for file in files])


def _failed(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200, body
    return body["data"]["failed_files"]


def _quietly(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    with contextlib.suppress(httpx.HTTPError, RuntimeError):  # RuntimeError: client closed
        call(*args, **kwargs)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _ingest_workers(pid: int) -> list[int]:
    """The gateway's spawned worker processes (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _workers_cpu_s(pid: int) -> float:
    ticks = 0
    for worker in _ingest_workers(pid):
        try:
            fields = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _start_slow(server: Server, upload: Callable[[], object]) -> threading.Thread:
    """Run ``upload`` (of the slow file) in a thread; return once the warm worker has spent
    0.5 s of CPU on it."""
    baseline = _workers_cpu_s(server.proc.pid)
    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    wait_until(lambda: _workers_cpu_s(server.proc.pid) >= baseline + 0.5, 30, 0.02,
               "the worker busy with the slow file")
    return thread


def _docx_bomb(xml_bytes: int) -> bytes:
    """A valid .docx whose word/document.xml unpacks to ``xml_bytes`` (compresses ~1000:1)."""
    paragraph = "<w:p><w:r><w:t>bomb bomb bomb bomb bomb bomb bomb bomb</w:t></w:r></w:p>"
    body = paragraph * (xml_bytes // len(paragraph))
    document = ('<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.'
                'openxmlformats.org/wordprocessingml/2006/main"><w:body>' + body +
                "</w:body></w:document>")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://'
                         'schemas.openxmlformats.org/package/2006/content-types"/>')
        archive.writestr("word/document.xml", document)
    return buffer.getvalue()


def _csv(rows: int) -> bytes:
    return b"id,text\n" + b"".join(b"%d,row number %d\n" % (i, i) for i in range(rows))


@pytest.fixture
def api_of() -> Iterator[Callable[[Server], httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(server: Server) -> httpx.Client:
        client = httpx.Client(base_url=server.url, timeout=60)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_files_past_the_per_file_and_per_kb_bounds_are_refused_and_memory_stays_flat(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client]) -> None:
    server = gateway({**FAST_STOP, "CHATFLEET_KB__MAX_FILE_TEXT_CHARS": "1000000",
                      "CHATFLEET_KB__MAX_FILE_CHUNKS": "5000",
                      "CHATFLEET_KB__MAX_KB_CHUNKS": "300"})
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the worker is up: RSS from here on
    rss_before = _rss_kb(server.proc.pid)

    bomb = _docx_bomb(40_000_000)
    assert len(bomb) < 200_000
    started = time.monotonic()
    failed = _failed(_upload(api, ("bomb.docx", bomb)))
    assert "kb.max_file_text_chars" in failed["bomb.docx"], failed
    assert time.monotonic() - started < 10

    rows = _csv(30_000)  # 600 KB: a chunk per row
    failed = _failed(_upload(api, ("rows.csv", rows)))
    assert "more than 5000 chunks" in failed["rows.csv"]
    assert "kb.max_file_chunks" in failed["rows.csv"]
    failed = _failed(_upload(api, ("long.txt", b"x" * 1_100_000)))
    assert "over 1000000 characters" in failed["long.txt"]
    assert "kb.max_file_text_chars" in failed["long.txt"]
    growth_mb = (_rss_kb(server.proc.pid) - rss_before) / 1024
    assert growth_mb < 60, f"gateway RSS grew {growth_mb:.0f} MB for refused files"

    tiny = _upload(api, SMALL_FILE, chunk_size="1", chunk_overlap="0")
    assert tiny.status_code == 200 and tiny.json()["code"] == 422
    assert "at least 50" in tiny.json()["msg"] and "kb.chunk_size" in tiny.json()["msg"]

    assert _failed(_upload(api, ("a.csv", _csv(200)))) == {}  # 200 of the KB's 300 chunks
    failed = _failed(_upload(api, ("b.csv", _csv(200))))
    assert "more than 300 chunks" in failed["b.csv"] and "kb.max_kb_chunks" in failed["b.csv"]
    assert _failed(_upload(api, ("a.csv", _csv(250)), override="true")) == {}  # replaces a.csv
    started = time.monotonic()
    assert _failed(_upload(api, ("next.txt", SMALL_FILE[1]))) == {}
    assert time.monotonic() - started < 5


def test_a_file_past_the_parse_time_is_refused_and_frees_the_worker_for_the_next(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client]) -> None:
    server = gateway({**FAST_STOP, "CHATFLEET_KB__MAX_PARSE_S": "2",
                      "CHATFLEET_KB__INGEST_WORKERS": "1"})
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the worker is up
    slow: list[httpx.Response] = []
    thread = _start_slow(server, lambda: slow.append(_upload(api, SLOW_FILE, **SLOW_SPLIT)))
    started = time.monotonic()
    assert _failed(_upload(api, ("second.txt", SMALL_FILE[1]))) == {}
    waited = time.monotonic() - started
    thread.join(30)
    failed = _failed(slow[0])
    assert "longer than 2 s" in failed["slow.txt"] and "kb.max_parse_s" in failed["slow.txt"]
    assert waited < 8, f"a 9.6 KB upload waited {waited:.1f} s behind a slow file"


def test_a_killed_worker_blames_its_own_file_the_next_upload_works_no_temp_left(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client],
        tmp_path: Path) -> None:
    server = gateway({**FAST_STOP, "TMPDIR": str(tmp_path), "CHATFLEET_KB__INGEST_WORKERS": "1"})
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the worker is up
    results: dict[str, httpx.Response] = {}

    def upload(name: str, *args: object, **form: str) -> None:
        results[name] = _upload(api, *args, **form)  # type: ignore[arg-type]

    slow = _start_slow(server, lambda: upload("slow", SLOW_FILE, **SLOW_SPLIT))
    queued = threading.Thread(target=upload, args=("next", ("next.txt", SMALL_FILE[1])))
    queued.start()
    time.sleep(0.3)  # the next upload waits for the worker (if it did not, it passes anyway)
    workers = _ingest_workers(server.proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
    slow.join(30)
    queued.join(30)
    failed = _failed(results["slow"])
    assert "died" in failed["slow.txt"], failed
    assert _failed(results["next"]) == {}
    assert _failed(_upload(api, ("after.txt", SMALL_FILE[1]))) == {}
    assert list(tmp_path.glob("chatfleet-load-*")) == []


def test_a_worker_killed_while_idle_costs_the_next_upload_nothing(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client]) -> None:
    server = gateway({**FAST_STOP, "CHATFLEET_KB__INGEST_WORKERS": "1"})
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the worker is up, and idle now
    for round_ in range(2):
        workers = _ingest_workers(server.proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would, between two uploads
        assert _failed(_upload(api, (f"after-{round_}.txt", SMALL_FILE[1]))) == {}


def test_sigterm_during_an_ingestion_stops_the_worker_answers_the_envelope_and_exits(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client]) -> None:
    server = gateway(FAST_STOP)
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the worker is up
    answers: list[httpx.Response] = []
    thread = _start_slow(server, lambda: answers.append(_upload(api, SLOW_FILE, **SLOW_SPLIT)))
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    wait_until(lambda: server.proc.returncode is not None, 9, 0.05, "the gateway exits")
    assert time.monotonic() - started < 9  # drain 1 s + uvicorn's shutdown
    assert server.proc.returncode == 0
    thread.join(10)
    answer = answers[0]
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["code"] == 503 and "shutting down" in answer.json()["msg"]


def test_an_upload_that_will_be_refused_gets_429_before_its_body_is_read(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client]) -> None:
    server = gateway({**FAST_STOP, "CHATFLEET_KB__INGEST_WORKERS": "1",
                      "CHATFLEET_KB__MAX_QUEUED_UPLOADS": "0"})
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the worker is up
    # One upload in the worker, one waiting for it: both ingestion slots taken.
    # (They are cut off when the gateway stops at the end.)
    _start_slow(server, partial(_quietly, _upload, api, ("slow0.txt", SLOW_FILE[1]),
                                **SLOW_SPLIT))
    threading.Thread(target=partial(_quietly, _upload, api, ("slow1.txt", SLOW_FILE[1]),
                                    **SLOW_SPLIT), daemon=True).start()
    time.sleep(0.5)  # sent and waiting for the worker

    boundary = "hostileboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="knowledge_base_name"\r\n\r\n'
            f"{KB}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f'filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n').encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    piece, pieces = b"y" * (1 << 20), 60
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for part in [head, *([piece] * pieces), tail]:
            sent += len(part)
            yield part

    total = len(head) + len(piece) * pieces + len(tail)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/knowledge_base/upload_docs", content=body(), headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(total)})
    assert answer.status_code == 429, answer.text
    assert answer.headers["retry-after"] == "5"
    assert answer.json()["code"] == 429 and "kb.max_queued_uploads" in answer.json()["msg"]
    assert sent < total / 2, f"{sent} of {total} bytes were sent before the 429"
    listed = api.get("/knowledge_base/list_files", params={"knowledge_base_name": KB}).json()
    assert [f["file_name"] for f in listed["data"]] == ["small.txt"]


def test_listing_a_file_at_the_chunk_bound_keeps_the_event_loop_free(
        gateway: Callable[..., Server], api_of: Callable[[Server], httpx.Client]) -> None:
    """search_docs by file_name answers every chunk of the file (Chatchat's WebUI shows them):
    at kb.max_file_chunks (50,000 by default) that is megabytes of JSON, built off the loop.
    asyncio debug mode logs each callback over 100 ms (test_event_loop.py says why 100)."""
    server = gateway({**FAST_STOP, "CHATFLEET_SERVER__SLOW_CALLBACK_S": "0.1"})
    api = api_of(server)
    _create_kb(api)
    assert _failed(_upload(api, ("rows.csv", _csv(50_000)))) == {}
    assert _failed(_upload(api, SMALL_FILE)) == {}  # the next round trip waits for log lines
    warmed_up = len(server.proc.log_text())
    started = time.monotonic()
    listed = api.post("/knowledge_base/search_docs", json={
        "knowledge_base_name": KB, "file_name": "rows.csv"}).json()
    took = time.monotonic() - started
    assert len(listed) == 50_000 and listed[7]["metadata"]["row"] == 7
    assert listed[7]["page_content"] == "id: 7\ntext: row number 7"
    assert api.get("/livez").status_code == 200
    slow = re.findall(r"Executing .* took (\d+\.\d+) seconds",
                      server.proc.log_text()[warmed_up:])
    assert slow == [], f"callbacks over 100 ms while listing ({took:.1f} s): {slow}"
