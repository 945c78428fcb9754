"""Chatchat's custom docs: what ``docs`` may be, and what they do to a file's chunks."""

from __future__ import annotations

import json

import pytest

from chatfleet.rag.custom_docs import (
    MAX_CUSTOM_DOCS,
    ChunkEdits,
    ChunkReplacement,
    CustomDoc,
    InvalidCustomDocs,
    parse_custom_docs,
    plan_custom_docs,
)


def _doc(text: str, chunk_id: str | None = None, **metadata: object) -> CustomDoc:
    return CustomDoc(text=text, metadata=dict(metadata), chunk_id=chunk_id)


@pytest.mark.parametrize(("docs", "plan"), [
    pytest.param([_doc("SECOND", "12", chunk=1)],
                 ChunkEdits(edits={"12": ("SECOND", {"chunk": 1})}),
                 id="the WebUI's save: the edited chunk by its id, nothing else"),
    pytest.param([_doc("", "12"), _doc("THIRD", "13")],
                 ChunkEdits(edits={"12": None, "13": ("THIRD", {})}),
                 id="in an edit, empty text deletes the chunk it names"),
    pytest.param([_doc("once", "12"), _doc("twice", "12")],
                 ChunkEdits(edits={"12": ("twice", {})}),
                 id="the last document naming an id wins"),
    pytest.param([_doc("new one"), _doc("new two", topic="x")],
                 ChunkReplacement(chunks=[("new one", {}), ("new two", {"topic": "x"})]),
                 id="documents without ids replace the file's chunks (Chatchat's custom docs)"),
    pytest.param([_doc("  "), _doc("kept")], ChunkReplacement(chunks=[("kept", {})]),
                 id="blank documents of a replacement are dropped"),
    pytest.param([], ChunkReplacement(chunks=[]), id="no documents: nothing left to store"),
])
def test_custom_docs_plan(docs: list[CustomDoc], plan: ChunkEdits | ChunkReplacement) -> None:
    assert plan_custom_docs(docs) == plan


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
    ('{"a.md": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"a.md": [{"page_content": "x", "metadata": {"n": NaN}}]}', "NaN, which is not"),
    ('{"a.md": [{"page_content": "x", "metadata": {"v": "a\\u0000b"}}]}', "NUL character"),
    ('{"a.md": [{"page_content": "x", "metadata": {"id": "1"}}, {"page_content": "y"}]}',
     "either all do (an edit of those chunks) or none does"),
    (json.dumps({"a.md": [{"page_content": "x"}] * (MAX_CUSTOM_DOCS + 1)}),
     f"at most {MAX_CUSTOM_DOCS} in one request"),
])
def test_malformed_custom_docs_say_what_to_fix(raw: str, says: str) -> None:
    with pytest.raises(InvalidCustomDocs) as caught:
        parse_custom_docs(raw)
    assert says in str(caught.value)


def test_a_malformed_shape_is_shown_the_shape_to_send() -> None:
    with pytest.raises(InvalidCustomDocs, match='send {"file.md": \\[{"page_content"'):
        parse_custom_docs('{"a.md": [{"text": "x"}]}')


def test_metadata_that_is_not_finite_is_refused_when_sent_as_an_object() -> None:
    with pytest.raises(InvalidCustomDocs, match="not finite"):
        parse_custom_docs({"a.md": [{"page_content": "x", "metadata": {"n": float("inf")}}]})
