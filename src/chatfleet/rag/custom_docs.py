"""Chatchat's custom docs: chunks a client writes itself, in place of the splitter's.

Chatchat's upload_docs and update_docs take ``docs``, a JSON object (sent as a JSON string) that
maps a file name to a list of langchain Documents ``{"page_content", "metadata", "type"}``; those
become the file's chunks and the file is marked ``custom_docs``. Its WebUI sends them when a user
edits chunks and presses "save": only the *edited* chunks, each with the metadata it was listed
with, which holds the chunk's ``id`` (ChatFleet's search_docs puts it there).

Chatchat replaces the file's chunks with whatever list it gets, so saving one edited chunk of
twenty deleted the other nineteen. ChatFleet keeps Chatchat's replacement for a list of new
documents (``ChunkReplacement``), and reads a list whose documents name the file's chunks by
``metadata.id`` as an edit of those chunks (``ChunkEdits``): each replaces the chunk it names, in
place, keeping its id, and one with empty ``page_content`` deletes it (Chatchat's own rule in
``update_doc_by_ids``); an id the file no longer has refuses the edit (the store's
``StaleChunks``), never falls back to a replacement. docs/api.md says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

__all__ = ["MAX_CUSTOM_DOCS", "ChunkEdits", "ChunkReplacement", "CustomDoc", "InvalidCustomDocs",
           "parse_custom_docs", "plan_custom_docs"]

MAX_CUSTOM_DOCS = 10_000
"""Documents one request may carry, over all its files: each is embedded and stored, and a
request's body is bounded anyway (1 MiB of JSON on update_docs, Starlette's 1 MiB per form field
on upload_docs), so this caps the work of many tiny ones."""

_SHAPE = ('{"file.md": [{"page_content": "the chunk\'s text", "metadata": {}}]} '
          "(a JSON object from file names to lists of documents)")
_STORE_KEYS = ("id", "source")
"""Metadata keys the answers add from the store (a chunk's id, its file): not kept as metadata."""

Chunk = tuple[str, dict[str, Any]]
"""A chunk's text and metadata."""


class InvalidCustomDocs(ValueError):
    """``docs`` is not what Chatchat's API takes; the message says what is wrong and the shape."""


class _Document(BaseModel):
    """One langchain Document as Chatchat's clients send it."""

    model_config = ConfigDict(extra="ignore")
    page_content: str
    metadata: dict[str, Any] = {}
    type: Literal["Document"] = "Document"


_DOCS = TypeAdapter(dict[str, list[_Document]])


@dataclass(frozen=True, kw_only=True, slots=True)
class CustomDoc:
    text: str
    """Empty: delete the chunk ``chunk_id`` names (an edit), else skipped."""
    metadata: dict[str, Any]
    """Without the keys the store adds on the way out (``id``, ``source``)."""
    chunk_id: str | None
    """The stored chunk this document edits, from its ``metadata.id``; None for a new chunk."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkEdits:
    """Change these chunks of the stored file, by id: new text and metadata, or None: delete."""

    edits: dict[str, Chunk | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkReplacement:
    """These chunks, in order, instead of the file's (blank documents dropped)."""

    chunks: list[Chunk]


def _no_constant(name: str) -> float:
    raise InvalidCustomDocs(f"docs holds {name}, which is not a JSON number: send finite numbers")


def parse_custom_docs(raw: str | Mapping[str, Any]) -> dict[str, list[CustomDoc]]:
    """The documents per file name. ``raw`` is the JSON string Chatchat's clients send (``""``
    and ``"{}"``, which its WebUI always sends, mean none) or the object itself. Raises
    ``InvalidCustomDocs``: not JSON, not that shape, more than ``MAX_CUSTOM_DOCS`` documents, a
    file that mixes edits and new documents, or metadata PostgreSQL cannot store (NUL, NaN)."""
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise InvalidCustomDocs(f"docs is not valid JSON ({exc.msg} at character "
                                    f"{exc.pos}): send {_SHAPE}") from None
        except RecursionError:
            raise InvalidCustomDocs(f"docs is nested too deeply: send {_SHAPE}") from None
    if isinstance(raw, Mapping):
        count = sum(len(docs) for docs in raw.values() if isinstance(docs, list))
        if count > MAX_CUSTOM_DOCS:
            raise InvalidCustomDocs(f"docs holds {count} documents; at most {MAX_CUSTOM_DOCS} "
                                    "in one request: send them in several")
    try:
        parsed = _DOCS.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "docs" + "".join(f"[{part!r}]" for part in first["loc"])
        raise InvalidCustomDocs(f"{where}: {first['msg']}; send {_SHAPE}") from None
    out: dict[str, list[CustomDoc]] = {}
    for name, docs in parsed.items():
        out[name] = [_custom_doc(name, i, doc) for i, doc in enumerate(docs)]
        with_ids = sum(doc.chunk_id is not None for doc in out[name])
        if 0 < with_ids < len(out[name]):
            raise InvalidCustomDocs(
                f"docs[{name!r}]: {with_ids} of {len(out[name])} documents name a chunk by "
                "metadata.id: either all do (an edit of those chunks) or none does (the file's "
                "new chunks)")
    return out


def _custom_doc(name: str, index: int, doc: _Document) -> CustomDoc:
    try:
        stored = json.dumps(doc.metadata, allow_nan=False)
    except ValueError:
        raise InvalidCustomDocs(f"docs[{name!r}][{index}]['metadata'] holds a number that is not "
                                "finite (NaN or infinity): send finite numbers") from None
    if "\\u0000" in stored or "\x00" in doc.page_content:
        raise InvalidCustomDocs(f"docs[{name!r}][{index}] holds a NUL character: remove it")
    try:
        (doc.page_content + json.dumps(doc.metadata, ensure_ascii=False)).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCustomDocs(f"docs[{name!r}][{index}] is not UTF-8 text (an unpaired "
                                "surrogate, as a lone \\ud800 escape decodes to): send "
                                "UTF-8") from None
    chunk_id = doc.metadata.get("id")
    return CustomDoc(text=doc.page_content,
                     metadata={k: v for k, v in doc.metadata.items() if k not in _STORE_KEYS},
                     chunk_id=None if chunk_id is None or isinstance(chunk_id, bool)
                     else str(chunk_id))


def plan_custom_docs(docs: Sequence[CustomDoc]) -> ChunkEdits | ChunkReplacement:
    """What ``docs`` do to their file: an edit when they name chunks by id (the last document
    naming an id wins; blank text deletes it), else a replacement (blank documents dropped)."""
    if docs and all(doc.chunk_id is not None for doc in docs):
        return ChunkEdits(edits={doc.chunk_id: (doc.text, doc.metadata) if doc.text.strip()
                                 else None for doc in docs if doc.chunk_id is not None})
    return ChunkReplacement(chunks=[(doc.text, doc.metadata) for doc in docs if doc.text.strip()])
