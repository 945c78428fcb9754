"""Chatchat's custom docs: chunks a client writes itself, in place of the splitter's.

Chatchat's upload_docs and update_docs take ``docs``, a JSON object (sent as a JSON string) that
maps a file name to a list of langchain Documents ``{"page_content", "metadata", "type"}``; those
become the file's chunks and the file is marked ``custom_docs``. Its WebUI sends them when a user
edits chunks and presses "save": only the *edited* chunks, each with the metadata it was listed
with, which holds the chunk's ``id`` (ChatFleet's search_docs puts it there).

Chatchat replaces the file's chunks with whatever list it gets, so saving one edited chunk of
twenty deleted the other nineteen. ChatFleet keeps Chatchat's replace for a list of new chunks,
and treats a list whose every document names one of the file's chunks by ``metadata.id`` as an
edit of those chunks: each replaces the chunk it names, in place, and one with empty
``page_content`` deletes it (Chatchat's own rule in ``update_doc_by_ids``). docs/api.md says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from chatfleet.rag.stores.base import StoredChunk

__all__ = ["CustomDoc", "InvalidCustomDocs", "chunks_with_custom_docs", "parse_custom_docs"]

_SHAPE = ('{"file.md": [{"page_content": "the chunk\'s text", "metadata": {}}]} '
          "(a JSON object from file names to lists of documents)")
_STORE_KEYS = ("id", "source")
"""Metadata keys the answers add from the store (a chunk's id, its file): not kept as metadata."""


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


def parse_custom_docs(raw: str | Mapping[str, Any]) -> dict[str, list[CustomDoc]]:
    """The documents per file name. ``raw`` is the JSON string Chatchat's clients send (``""``
    and ``"{}"``, which its WebUI always sends, mean none) or the object itself. Raises
    ``InvalidCustomDocs``."""
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidCustomDocs(f"docs is not valid JSON ({exc.msg} at character "
                                    f"{exc.pos}): send {_SHAPE}") from None
    try:
        parsed = _DOCS.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "docs" + "".join(f"[{part!r}]" for part in first["loc"])
        raise InvalidCustomDocs(f"{where}: {first['msg']}; send {_SHAPE}") from None
    return {name: [_custom_doc(doc) for doc in docs] for name, docs in parsed.items()}


def _custom_doc(doc: _Document) -> CustomDoc:
    chunk_id = doc.metadata.get("id")
    return CustomDoc(text=doc.page_content,
                     metadata={k: v for k, v in doc.metadata.items() if k not in _STORE_KEYS},
                     chunk_id=None if chunk_id is None else str(chunk_id))


def chunks_with_custom_docs(existing: Sequence[StoredChunk],
                            docs: Sequence[CustomDoc]) -> list[tuple[str, dict[str, Any]]]:
    """The file's chunks (text, metadata) once ``docs`` are applied: an edit of the named chunks
    when every document names one of ``existing``, else ``docs`` in their place. Documents whose
    text is blank are dropped (in an edit, the chunk they name is deleted)."""
    by_id = {chunk.id: chunk for chunk in existing}
    if docs and all(doc.chunk_id in by_id for doc in docs):
        edits = {doc.chunk_id: doc for doc in docs}
        merged: list[tuple[str, dict[str, Any]]] = []
        for chunk in existing:
            edit = edits.get(chunk.id)
            if edit is None:
                merged.append((chunk.text, dict(chunk.metadata)))
            elif edit.text.strip():
                merged.append((edit.text, edit.metadata))
        return merged
    return [(doc.text, doc.metadata) for doc in docs if doc.text.strip()]
