"""Uploaded bytes to Documents (rag/loaders.py), on real files of each type built here."""

from __future__ import annotations

import io
import logging
import pickle
import tempfile
import zipfile
from pathlib import Path

import pytest

from chatfleet.rag.loaders import (
    SUPPORTED_EXTENSIONS,
    EmptyDocument,
    UnreadableDocument,
    UnsupportedFileType,
    check_extension,
    load_document,
)

CHINESE = "知识库问答系统。这是一个测试文件，用于检查编码自动识别。第二句：网关在队列变长时扩容。"


def _pdf(*lines: str) -> bytes:
    """A one-page PDF 1.4 with ``lines`` in Helvetica, with exact xref offsets."""
    text = b" ".join(b"(%s) Tj T*" % line.encode("latin-1") for line in lines)
    stream = b"BT /F1 12 Tf 14 TL 72 720 Td " + text + b" ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
         b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>"),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref_at)
    return bytes(out)


def _docx(*paragraphs: str) -> bytes:
    """The three parts Word needs at least: content types, package rels, the main document."""
    content_types = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/word/document.xml" ContentType="application/'
        'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>')
    rels = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        'relationships/officeDocument" Target="word/document.xml"/></Relationships>')
    body = "".join(f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>" for text in paragraphs)
    document = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        f"<w:body>{body}</w:body></w:document>")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", content_types)
        archive.writestr("_rels/.rels", rels)
        archive.writestr("word/document.xml", document)
    return buffer.getvalue()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "utf-16"])
def test_chinese_text_loads_whatever_its_encoding(encoding: str) -> None:
    loaded = load_document("说明.txt", CHINESE.encode(encoding))
    assert loaded.loader == "TextLoader"
    assert [doc.page_content for doc in loaded.documents] == [CHINESE]
    assert loaded.documents[0].metadata == {"source": "说明.txt"}


def test_a_longer_gbk_file_with_mixed_ascii_and_chinese_lines_decodes_exactly() -> None:
    text = "\n".join(f"line {i}: {CHINESE}" for i in range(500))
    assert load_document("log.txt", text.encode("gb18030")).documents[0].page_content == text


def test_markdown_loads_as_text_with_its_markup_for_the_markdown_splitter() -> None:
    markdown = "# Guide\n\nSome *text*.\n\n## Part two\n\n- item\n"
    loaded = load_document("guide.md", markdown.encode())
    assert loaded.loader == "TextLoader"
    assert loaded.documents[0].page_content == markdown


def test_html_keeps_the_visible_text_drops_tags_scripts_styles_and_comments() -> None:
    html = """<!DOCTYPE html>
    <html>
      <head>
        <meta charset="utf-8">
        <title>Gateway guide</title>
        <style>body { color: red; }</style>
        <script>var secret = "do not index";</script>
      </head>
      <body>
        <h1>Scaling the gateway</h1>
        <p>Replicas scale on <b>queue depth</b>, not CPU.</p>
        <!-- a comment -->
        <ul><li>one</li><li>two</li></ul>
        <noscript>Enable JavaScript</noscript>
      </body>
    </html>"""
    loaded = load_document("guide.html", html.encode())
    [document] = loaded.documents
    text = document.page_content
    assert loaded.loader == "BSHTMLLoader"
    assert "Scaling the gateway" in text and "queue depth" in text
    assert "<" not in text and "secret" not in text and "color" not in text
    assert "comment" not in text
    # What BSHTMLLoader keeps: the <title> text (also in metadata) and <noscript> content.
    assert text.startswith("Gateway guide")
    assert "Enable JavaScript" in text
    assert document.metadata == {"source": "guide.html", "title": "Gateway guide"}
    # Source indentation and blank-line runs are collapsed; minified blocks stay apart.
    assert "  " not in text and "\n\n\n" not in text
    assert "one two" in text


def test_minified_html_does_not_glue_the_words_of_neighbouring_blocks() -> None:
    loaded = load_document("min.htm", b"<h1>Title</h1><p>First paragraph.</p><p>Second.</p>")
    assert loaded.documents[0].page_content == "Title First paragraph. Second."


def test_gbk_html_is_decoded_by_detection() -> None:
    html = f"<html><head><title>标题</title></head><body><p>{CHINESE}</p></body></html>"
    assert CHINESE in load_document("页面.html", html.encode("gbk")).documents[0].page_content


def test_csv_rows_become_documents_with_the_header_names_in_their_text() -> None:
    csv = "question,answer\nWhat scales the gateway?,Queue depth\n怎么扩容？,\"按队列长度, 而不是 CPU\"\n"
    loaded = load_document("faq.csv", csv.encode())
    assert loaded.loader == "CSVLoader"
    assert [doc.page_content for doc in loaded.documents] == [
        "question: What scales the gateway?\nanswer: Queue depth",
        "question: 怎么扩容？\nanswer: 按队列长度, 而不是 CPU",
    ]
    assert [doc.metadata for doc in loaded.documents] == [
        {"source": "faq.csv", "row": 0}, {"source": "faq.csv", "row": 1}]


def test_an_excel_utf8_csv_with_a_bom_keeps_a_clean_first_header() -> None:
    loaded = load_document("excel.csv", "name,city\nAlice,北京\n".encode("utf-8-sig"))
    assert loaded.documents[0].page_content == "name: Alice\ncity: 北京"


def test_a_gbk_csv_longer_than_the_read_buffer_yields_each_row_once() -> None:
    # langchain's own autodetect would re-yield the ASCII rows read before the first GBK byte.
    rows = [f"r{i},ascii row {i}" for i in range(2000)] + ["中文,描述行"]
    content = ("id,text\n" + "\n".join(rows) + "\n").encode("gbk")
    documents = load_document("rows.csv", content).documents
    assert len(documents) == len(rows)
    assert documents[-1].page_content == "id: 中文\ntext: 描述行"


def test_docx_paragraphs_come_out_as_text() -> None:
    loaded = load_document("手册.docx", _docx("First paragraph about pods.", "第二段：知识库。"))
    assert loaded.loader == "Docx2txtLoader"
    [document] = loaded.documents
    assert "First paragraph about pods." in document.page_content
    assert "第二段：知识库。" in document.page_content
    assert document.metadata == {"source": "手册.docx"}


def test_a_hand_built_pdf_is_valid_and_its_text_is_extracted(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = load_document("report.pdf", _pdf("Hello from page one", "Queue depth scales pods"))
    assert not caplog.records  # pypdf warns about a bad xref or header: none here
    assert loaded.loader == "PyPDFLoader"
    [page] = loaded.documents
    assert page.page_content == "Hello from page one\nQueue depth scales pods"
    assert page.metadata["source"] == "report.pdf"
    assert page.metadata["page"] == 0 and page.metadata["total_pages"] == 1


@pytest.mark.parametrize("content", [b"this is not a pdf", b"%PDF-1.4\ngarbage without objects",
                                     _pdf("cut in half")[:200]])
def test_a_corrupt_pdf_is_unreadable_with_the_file_name_and_a_reason(content: bytes) -> None:
    with pytest.raises(UnreadableDocument) as caught:
        load_document("broken.pdf", content)
    message = str(caught.value)
    assert "'broken.pdf'" in message and caught.value.reason
    assert tempfile.gettempdir() not in message  # the temporary copy's path never leaks


@pytest.mark.parametrize("content", [b"PK but not a zip", _docx("x")[:100]])
def test_a_docx_that_is_not_a_zip_is_unreadable(content: bytes) -> None:
    with pytest.raises(UnreadableDocument, match="'notes.docx'.*BadZipFile"):
        load_document("notes.docx", content)


def test_a_zip_without_a_word_document_is_unreadable() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(UnreadableDocument, match="'fake.docx'"):
        load_document("fake.docx", buffer.getvalue())


def test_binary_bytes_named_txt_are_unreadable_not_loaded_as_garbage() -> None:
    binary = bytes(range(256)) * 8
    with pytest.raises(UnreadableDocument, match="encoding could not be detected"):
        load_document("blob.txt", binary)


@pytest.mark.parametrize(("name", "content"), [
    ("blank.txt", b" \n\t\r\n  "),
    ("empty.txt", b""),
    ("blank.md", b"\n\n"),
    ("blank.html", b"<html><body>  <script>x()</script></body></html>"),
    ("blank.docx", _docx("", "   ")),
    ("blank.pdf", _pdf()),
])
def test_a_file_with_only_whitespace_text_is_an_empty_document(name: str, content: bytes) -> None:
    with pytest.raises(EmptyDocument, match=f"'{name}' contains no text"):
        load_document(name, content)


@pytest.mark.parametrize(("name", "shown"), [("setup.exe", "'.exe'"), ("README", "no extension"),
                                             ("archive.tar.gz", "'.gz'")])
def test_unsupported_types_are_refused_with_the_supported_list(name: str, shown: str) -> None:
    with pytest.raises(UnsupportedFileType) as caught:
        check_extension(name)
    message = str(caught.value)
    assert shown in message
    assert ".txt, .md, .html, .htm, .pdf, .docx, .csv" in message
    with pytest.raises(UnsupportedFileType):
        load_document(name, b"MZ\x90\x00")


def test_extensions_are_matched_without_regard_to_case() -> None:
    assert check_extension("REPORT.PDF") == ".pdf"
    assert load_document("NOTES.TXT", b"hello").loader == "TextLoader"
    assert set(SUPPORTED_EXTENSIONS) == {".txt", ".md", ".html", ".htm", ".pdf", ".docx", ".csv"}


def test_the_temporary_copy_is_removed_after_success_and_after_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load_document("ok.txt", b"hello")
    with pytest.raises(UnreadableDocument):
        load_document("bad.pdf", b"not a pdf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [
    UnsupportedFileType("a.exe", ".exe"),
    UnreadableDocument("a.pdf", "not a PDF"),
    EmptyDocument("a.txt"),
])
def test_loader_errors_survive_the_trip_back_from_the_ingest_worker_process(error) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
