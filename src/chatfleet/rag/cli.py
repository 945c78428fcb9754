"""``chatfleet kb``: manage a running gateway's knowledge bases from a shell.

A thin client of the gateway's Chatchat routes (docs/api.md) over HTTP, so it works the same
against a local ``chatfleet serve``, a port-forwarded pod or an in-cluster Service, whatever the
store behind it. Results go to stdout; a failure is one message on stderr that says what happened
and what to type next, and the exit code of its class (docs/cli.md): 1 when the gateway refused or
failed the request or stored only some of the files, 2 for a usage error, 3 when it cannot be
reached (rag/cli_gateway.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from chatfleet.exits import ExitCode, fail
from chatfleet.rag.cli_gateway import DEFAULT_URL, Gateway, GatewayError

__all__ = ["kb_app"]

kb_app = typer.Typer(no_args_is_help=True, add_completion=False,
                     help="Manage a gateway's knowledge bases (over its Chatchat API).")
console = Console()
notes = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
"""Hints and refused files, beside the results on stdout."""


def _say(text: str) -> None:
    """A result line on stdout, as written (a command in it stays on one line)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise typer.BadParameter(f"give the gateway's base URL, like {DEFAULT_URL} (got {value!r})")
    return value.rstrip("/")


Url = Annotated[str, typer.Option("--url", envvar="CHATFLEET_URL", callback=_base_url,
                                  help="The gateway's base URL.")]
_api_key: str | None = None
"""The API key given to the group (``use_api_key``), if any: the option is the group's, so the
commands find it here."""


@kb_app.callback()
def use_api_key(api_key: Annotated[str | None, typer.Option(
        envvar="CHATFLEET_API_KEY", show_default=False,
        help="API key, when the gateway has keys turned on (sent as Authorization: Bearer).")] = None,
) -> None:
    global _api_key
    _api_key = api_key or None


def _gateway(url: str) -> Gateway:
    return Gateway(url, _api_key)


def _missing(name: str) -> str:
    return (f"knowledge base {name!r} does not exist: create it with `chatfleet kb create "
            f"{shlex.quote(name)}`, or see the ones there are with `chatfleet kb list`")


@contextmanager
def _failures(kb: str | None = None) -> Iterator[None]:
    """Exit with a failed call's message; with ``kb``, a 404 envelope (the route's answer to a
    knowledge base that does not exist) says so and how to create it."""
    try:
        yield
    except GatewayError as exc:
        fail(_missing(kb) if kb is not None and exc.code == 404 else exc.message, exc.exit_code)


def _kb_names(gateway: Gateway) -> set[str]:
    return {kb["kb_name"] for kb in gateway.call("GET", "/knowledge_base/list_knowledge_bases")["data"]}


@kb_app.command("list")
def list_kbs(url: Url = DEFAULT_URL) -> None:
    """List the knowledge bases."""
    with _failures():
        kbs = _gateway(url).call("GET", "/knowledge_base/list_knowledge_bases")["data"]
    if not kbs:
        notes.print("no knowledge bases yet: create one with `chatfleet kb create NAME`")
        return
    table = Table("name", "files", "store", "embed model", "info")
    for kb in kbs:
        table.add_row(kb["kb_name"], str(kb["file_count"]), kb["vs_type"],
                      kb["embed_model"] or "(none: BM25 only)", kb["kb_info"] or "")
    console.print(table)


@kb_app.command()
def create(name: str, info: Annotated[str, typer.Option(help="What the KB holds.")] = "",
           url: Url = DEFAULT_URL) -> None:
    """Create a knowledge base (exit 1 if one of that name exists: it was not created)."""
    gateway, quoted = _gateway(url), shlex.quote(name)
    with _failures():
        try:
            gateway.call("POST", "/knowledge_base/create_knowledge_base",
                         json={"knowledge_base_name": name, "kb_info": info})
        except GatewayError as exc:
            # Chatchat answers "exists" with code 404 and words only: ask what is there.
            if exc.code == 404 and name in _kb_names(gateway):
                fail(f"knowledge base {name!r} already exists: upload into it with `chatfleet kb "
                     f"upload {quoted} FILE...`, or delete it first with `chatfleet kb delete "
                     f"{quoted}`", ExitCode.REFUSED)
            raise
    _say(f"created knowledge base {name!r}: add files with `chatfleet kb upload {quoted} FILE...`")


@kb_app.command()
def delete(name: str, url: Url = DEFAULT_URL) -> None:
    """Delete a knowledge base with all its files."""
    with _failures(kb=name):
        _gateway(url).call("POST", "/knowledge_base/delete_knowledge_base", json=name)
    _say(f"deleted knowledge base {name!r} and its files")


@kb_app.command()
def upload(
    name: str,
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
    override: Annotated[bool, typer.Option(help="Replace files of the same name.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Characters per chunk.")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Characters shared by chunks.")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Upload files (txt, md, html, pdf, docx, csv) into a knowledge base, one request per file.

    Exit 1 unless every file was stored; each refused one is named with its reason."""
    form: dict[str, str] = {"knowledge_base_name": name, "override": str(override).lower()}
    if chunk_size is not None:
        form["chunk_size"] = str(chunk_size)
    if chunk_overlap is not None:
        form["chunk_overlap"] = str(chunk_overlap)
    gateway = _gateway(url)
    refused: dict[Path, str] = {}
    for index, path in enumerate(files):
        try:
            reason = _upload_one(gateway, form, path)
        except GatewayError as exc:
            if exc.code == 413:  # this file is over the gateway's size limit; the rest may not be
                refused[path] = exc.message
                continue
            _stop_upload(exc, name, files[index:], stored=index - len(refused), total=len(files),
                         override=override)
        if reason is None:
            _say(f"{path.name}: stored")
        else:
            refused[path] = reason
    if refused:
        _report_refused(gateway, name, refused, override=override, total=len(files))


def _upload_one(gateway: Gateway, form: dict[str, str], path: Path) -> str | None:
    """Why the gateway did not store ``path`` (its ``failed_files`` entry), or None: stored."""
    with path.open("rb") as handle:
        body = gateway.call("POST", "/knowledge_base/upload_docs", data=form,
                            files=[("files", (path.name, handle))])
    failed: dict[str, str] = body["data"]["failed_files"]
    return next(iter(failed.values()), None)


def _stop_upload(exc: GatewayError, name: str, rest: list[Path], *, stored: int, total: int,
                 override: bool) -> None:
    """Exit on a failed call mid-upload, saying which files are still to send and how."""
    message = _missing(name) if exc.code == 404 else exc.message
    if stored:
        command = shlex.join(["chatfleet", "kb", "upload", name, *(["--override"] if override else []),
                              *map(str, rest)])
        message += f"\n{stored} of {total} files were stored before; to upload the rest: `{command}`"
    fail(message, exc.exit_code)


def _report_refused(gateway: Gateway, name: str, refused: dict[Path, str], *, override: bool,
                    total: int) -> None:
    """Name each refused file with its reason, then exit 1. Without --override, a name the
    knowledge base already holds was refused for that (the gateway checks it first)."""
    existing: set[str] = set()
    if not override:
        with _failures(kb=name):
            existing = {record["file_name"] for record in gateway.call(
                "GET", "/knowledge_base/list_files", params={"knowledge_base_name": name})["data"]}
    replace = [path for path in refused if path.name in existing]
    for path, reason in refused.items():
        if path in replace:
            reason = f"{name!r} already has a file of that name: add --override to replace it"
        notes.print(f"{path.name}: not stored: {reason}", style="red")
    summary = f"{total - len(refused)} of {total} files stored in {name!r}"
    if replace:
        command = shlex.join(["chatfleet", "kb", "upload", name, "--override",
                              *(str(path) for path in replace)])
        summary += f"; to replace the existing ones: `{command}`"
    fail(summary, ExitCode.REFUSED)


@kb_app.command("files")
def list_files(name: str, url: Url = DEFAULT_URL) -> None:
    """List a knowledge base's files."""
    with _failures(kb=name):
        records = _gateway(url).call("GET", "/knowledge_base/list_files",
                                     params={"knowledge_base_name": name})["data"]
    if not records:
        notes.print(f"{name!r} has no files yet: add some with `chatfleet kb upload "
                    f"{shlex.quote(name)} FILE...`")
        return
    table = Table("file", "chunks", "bytes", "version", "loader")
    for record in records:
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
    gateway = _gateway(url)
    with _failures(kb=name):
        docs: list[dict[str, Any]] = gateway.call("POST", "/knowledge_base/search_docs", json={
            "knowledge_base_name": name, "query": query, "top_k": top_k,
            "score_threshold": score_threshold})
        # Chatchat answers a knowledge base that does not exist with no chunks, like an empty one.
        if not docs and name not in _kb_names(gateway):
            fail(_missing(name), ExitCode.REFUSED)
    if not docs:
        notes.print(f"no chunk of {name!r} matched: see its files with `chatfleet kb files "
                    f"{shlex.quote(name)}`")
        return
    table = Table("#", "file", "score", "text", show_lines=True)
    for i, doc in enumerate(docs, start=1):
        score = "-" if doc["score"] is None else f"{doc['score']:.3f}"
        text = doc["page_content"]
        table.add_row(str(i), doc["metadata"].get("source", ""), score,
                      text if len(text) <= 300 else text[:300] + "...")
    console.print(table)
