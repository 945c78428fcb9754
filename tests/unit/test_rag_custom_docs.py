"""Chatchat's custom docs: what ``docs`` may be, and the chunks a file ends up with."""

from __future__ import annotations

import pytest

from chatfleet.rag.custom_docs import (
    CustomDoc,
    InvalidCustomDocs,
    chunks_with_custom_docs,
    parse_custom_docs,
)
from chatfleet.rag.stores.base import StoredChunk


def _chunk(chunk_id: str, text: str, seq: int) -> StoredChunk:
    return StoredChunk(id=chunk_id, kb="kb", file_name="a.md", seq=seq, text=text,
                       metadata={"chunk": seq})


STORED = [_chunk("11", "first", 0), _chunk("12", "second", 1), _chunk("13", "third", 2)]


def _doc(text: str, chunk_id: str | None = None, **metadata: object) -> CustomDoc:
    return CustomDoc(text=text, metadata=dict(metadata), chunk_id=chunk_id)


@pytest.mark.parametrize(("docs", "expected"), [
    pytest.param([_doc("SECOND", "12", chunk=1)],
                 [("first", {"chunk": 0}), ("SECOND", {"chunk": 1}), ("third", {"chunk": 2})],
                 id="the WebUI's save: one edited chunk replaces only that chunk, in place"),
    pytest.param([_doc("", "12"), _doc("THIRD", "13")],
                 [("first", {"chunk": 0}), ("THIRD", {})],
                 id="in an edit, empty text deletes the chunk it names"),
    pytest.param([_doc("new one"), _doc("new two", topic="x")],
                 [("new one", {}), ("new two", {"topic": "x"})],
                 id="documents without ids replace the file's chunks (Chatchat's custom docs)"),
    pytest.param([_doc("edited", "12"), _doc("brand new")],
                 [("edited", {}), ("brand new", {})],
                 id="a list mixing ids and new documents is a replacement"),
    pytest.param([_doc("other file's", "99")], [("other file's", {})],
                 id="an id that is not this file's chunk makes it a replacement"),
    pytest.param([_doc("  "), _doc("kept")], [("kept", {})],
                 id="blank documents of a replacement are dropped"),
])
def test_custom_docs_give_the_file_these_chunks(docs: list[CustomDoc],
                                                expected: list[tuple[str, dict]]) -> None:
    assert chunks_with_custom_docs(STORED, docs) == expected


@pytest.mark.parametrize("raw", ["", "  ", "{}", {}], ids=["empty", "blank", "the WebUI's {}",
                                                         "an empty object"])
def test_no_custom_docs(raw: object) -> None:
    assert parse_custom_docs(raw) == {}  # type: ignore[arg-type]


def test_a_documents_store_keys_are_dropped_and_its_id_kept_as_the_chunk_it_edits() -> None:
    parsed = parse_custom_docs('{"a.md": [{"page_content": "x", "type": "Document", '
                               '"metadata": {"id": 12, "source": "a.md", "page": 3}}]}')
    assert parsed == {"a.md": [CustomDoc(text="x", metadata={"page": 3}, chunk_id="12")]}


@pytest.mark.parametrize(("raw", "says"), [
    ("{not json", "docs is not valid JSON"),
    ('["a.md"]', "docs: Input should be a valid dictionary"),
    ('{"a.md": "text"}', "docs['a.md']: Input should be a valid list"),
    ('{"a.md": [{"text": "x"}]}', "docs['a.md'][0]['page_content']: Field required"),
    ('{"a.md": [{"page_content": "x", "type": "Image"}]}', "docs['a.md'][0]['type']"),
])
def test_malformed_custom_docs_say_where_and_what_to_send(raw: str, says: str) -> None:
    with pytest.raises(InvalidCustomDocs) as caught:
        parse_custom_docs(raw)
    assert says in str(caught.value)
    assert '{"file.md": [{"page_content"' in str(caught.value)
