"""``chatfleet kb``: manage a running gateway's knowledge bases from a shell.

A thin client of the gateway's Chatchat routes (docs/api.md) over HTTP, so it works the same
against a local ``chatfleet serve``, a port-forwarded pod or an in-cluster Service, whatever the
store behind it. Every command exits 1 when the gateway answers an error (Chatchat's envelope
``code`` other than 200, or an HTTP error), printing its message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["kb_app"]

kb_app = typer.Typer(no_args_is_help=True, add_completion=False,
                     help="Manage a gateway's knowledge bases (over its Chatchat API).")
console = Console()
errors = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="CHATFLEET_URL",
                                  help="The gateway's base URL.")]
DEFAULT_URL = "http://127.0.0.1:8000"
_headers: dict[str, str] = {}
"""Sent with every call: the API key, when the gateway needs one (set by ``use_api_key``)."""


@kb_app.callback()
def use_api_key(api_key: Annotated[str | None, typer.Option(
        envvar="CHATFLEET_API_KEY", show_default=False,
        help="API key, when the gateway has keys turned on (sent as Authorization: Bearer).")] = None,
) -> None:
    _headers.pop("Authorization", None)
    if api_key:
        _headers["Authorization"] = f"Bearer {api_key}"


def _call(url: str, method: str, path: str, **kwargs: Any) -> Any:
    """The route's answer; exits 1 with the gateway's message on an error."""
    try:
        with httpx.Client(base_url=url, headers=_headers, timeout=httpx.Timeout(30, read=600)) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        errors.print(f"[red]cannot reach {url}: {exc}[/red]")
        raise typer.Exit(1) from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body and "msg" in body:
        if body["code"] != 200 or response.status_code >= 400:
            errors.print(f"[red]{body['code']}: {body['msg']}[/red]")
            raise typer.Exit(1)
        return body
    if response.status_code >= 400:
        errors.print(f"[red]HTTP {response.status_code}: {response.text[:500]}[/red]")
        raise typer.Exit(1)
    return body


@kb_app.command("list")
def list_kbs(url: Url = DEFAULT_URL) -> None:
    """List the knowledge bases."""
    table = Table("name", "files", "store", "embed model", "info")
    for kb in _call(url, "GET", "/knowledge_base/list_knowledge_bases")["data"]:
        table.add_row(kb["kb_name"], str(kb["file_count"]), kb["vs_type"],
                      kb["embed_model"] or "(none: BM25 only)", kb["kb_info"] or "")
    console.print(table)


@kb_app.command()
def create(name: str, info: Annotated[str, typer.Option(help="What the KB holds.")] = "",
           url: Url = DEFAULT_URL) -> None:
    """Create a knowledge base."""
    console.print(_call(url, "POST", "/knowledge_base/create_knowledge_base",
                        json={"knowledge_base_name": name, "kb_info": info})["msg"])


@kb_app.command()
def delete(name: str, url: Url = DEFAULT_URL) -> None:
    """Delete a knowledge base with all its files."""
    console.print(_call(url, "POST", "/knowledge_base/delete_knowledge_base", json=name)["msg"])


@kb_app.command()
def upload(
    name: str,
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
    override: Annotated[bool, typer.Option(help="Replace files of the same name.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Characters per chunk.")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Characters shared by chunks.")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Upload files (txt, md, html, pdf, docx, csv) into a knowledge base, one request per file."""
    form: dict[str, str] = {"knowledge_base_name": name, "override": str(override).lower()}
    if chunk_size is not None:
        form["chunk_size"] = str(chunk_size)
    if chunk_overlap is not None:
        form["chunk_overlap"] = str(chunk_overlap)
    refused = 0
    for path in files:
        with path.open("rb") as handle:
            body = _call(url, "POST", "/knowledge_base/upload_docs", data=form,
                         files=[("files", (path.name, handle))])
        failed = body["data"]["failed_files"]
        for file_name, reason in failed.items():
            errors.print(f"[red]{file_name}: {reason}[/red]")
        refused += len(failed)
        if not failed:
            console.print(f"{path.name}: stored")
    if refused:
        raise typer.Exit(1)


@kb_app.command("files")
def list_files(name: str, url: Url = DEFAULT_URL) -> None:
    """List a knowledge base's files."""
    table = Table("file", "chunks", "bytes", "version", "loader")
    for record in _call(url, "GET", "/knowledge_base/list_files",
                        params={"knowledge_base_name": name})["data"]:
        table.add_row(record["file_name"], str(record["docs_count"]), str(record["file_size"]),
                      str(record["file_version"]), record["document_loader"])
    console.print(table)


@kb_app.command()
def search(
    name: str,
    query: str,
    top_k: Annotated[int, typer.Option(help="Chunks to return.")] = 3,
    score_threshold: Annotated[float, typer.Option(
        help="Drop chunks farther than this (halved cosine distance, 0-1; 2 keeps all).")] = 2.0,
    url: Url = DEFAULT_URL,
) -> None:
    """Retrieve a question's chunks, as kb_chat would put them into its prompt."""
    docs = _call(url, "POST", "/knowledge_base/search_docs", json={
        "knowledge_base_name": name, "query": query, "top_k": top_k,
        "score_threshold": score_threshold})
    table = Table("#", "file", "score", "text", show_lines=True)
    for i, doc in enumerate(docs, start=1):
        score = "-" if doc["score"] is None else f"{doc['score']:.3f}"
        text = doc["page_content"]
        table.add_row(str(i), doc["metadata"].get("source", ""), score,
                      text if len(text) <= 300 else text[:300] + "...")
    console.print(table)
