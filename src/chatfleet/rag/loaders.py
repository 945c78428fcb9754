"""Turns an uploaded file's bytes into langchain Documents, with Chatchat's loader for each type.

The ingestion pipeline (``rag/ingest.py``) calls ``load_document`` in a worker process: it blocks on
disk and on the parsers. Routes call ``check_extension`` before reading a request body, to refuse a
file type early. Errors are ``ValueError`` subclasses whose messages name the file and are meant for
the user: the type is not supported, the parser could not read the file, or it holds no text.

Text encodings (txt, md, csv, html) are settled here rather than by the loaders'
``autodetect_encoding``: langchain-community's detector breaks on chardet 7's results (TypeError on
its ``mime_type`` key), leaves a TextLoader document silently empty when every guess fails, and
makes CSVLoader yield again every row it had read before the first undecodable byte. UTF-8 (with or
without a BOM) is taken as is; anything else goes to chardet, and the first guess that decodes the
whole file wins.
"""

from __future__ import annotations

import codecs
import io
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from langchain_community.document_loaders import (
    BSHTMLLoader,
    CSVLoader,
    Docx2txtLoader,
    PyPDFLoader,
    TextLoader,
)
from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "EmptyDocument",
    "FileTooLarge",
    "LoadedDocument",
    "UnreadableDocument",
    "UnsupportedFileType",
    "check_extension",
    "load_document",
]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".html", ".htm", ".pdf", ".docx", ".csv")
"""Lower-case; a file's extension is compared case-insensitively."""

_MAX_REASON_CHARS = 200
_DOCX_XML_PER_TEXT_CHAR = 4
"""A .docx's XML may unpack to this many bytes per character of the text limit: markup is most
of a document.xml, and a zip bomb (261 KB unpacking to gigabytes) is refused before parsing."""
_BLANK_LINES = re.compile(r"\n{3,}")


class UnsupportedFileType(ValueError):
    def __init__(self, file_name: str, extension: str) -> None:
        what = f"type {extension!r} is" if extension else "name has no extension, so its type is"
        super().__init__(f"cannot load '{file_name}': its {what} not supported; supported types: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}")
        self.file_name = file_name
        self.extension = extension

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised in the ingest worker process
        return type(self), (self.file_name, self.extension)


class UnreadableDocument(ValueError):
    """The parser failed: a corrupt PDF, a .docx that is not a zip, an undetectable encoding."""

    def __init__(self, file_name: str, reason: str) -> None:
        super().__init__(f"cannot read '{file_name}': {reason}; check that the file opens in its "
                         "usual program and upload it again")
        self.file_name = file_name
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.file_name, self.reason)


class EmptyDocument(ValueError):
    """The file parsed but holds no text, e.g. a scanned PDF (no OCR here) or a blank page."""

    def __init__(self, file_name: str) -> None:
        super().__init__(f"'{file_name}' contains no text to index (a scanned PDF or image-only "
                         "document has none here: export it with its text layer)")
        self.file_name = file_name

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.file_name,)


class FileTooLarge(ValueError):
    """The file passes a per-file bound (text, chunks, parse time): refused, nothing stored."""

    def __init__(self, file_name: str, what: str, setting: str) -> None:
        super().__init__(f"cannot index '{file_name}': {what} (the bound is {setting}); "
                         "nothing was stored: split the file into smaller ones, or have the "
                         "bound raised")
        self.file_name = file_name
        self.what = what
        self.setting = setting

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.file_name, self.what, self.setting)


@dataclass(frozen=True)
class LoadedDocument:
    documents: list[Document]
    """One per file (txt, md, html, docx), per page (pdf) or per row (csv); ``metadata["source"]``
    is the file name."""
    loader: str
    """The langchain loader class that read it, e.g. "PyPDFLoader"."""


def check_extension(file_name: str) -> str:
    """Return the file's lower-case extension, or raise ``UnsupportedFileType`` naming the list."""
    extension = os.path.splitext(file_name)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise UnsupportedFileType(file_name, extension)
    return extension


def load_document(file_name: str, content: bytes, *, folder: str | None = None,
                  max_text_chars: int | None = None) -> LoadedDocument:
    """Parse ``content``, the bytes of the upload called ``file_name`` (already validated).

    Blocking. The loaders take paths, so the bytes go to a file in ``folder``, a private
    temporary folder the caller makes and removes (the ingest worker's parent, which can also
    when the worker was killed), or else in one made and removed here. Documents are read one
    at a time (a page, a row) and ``FileTooLarge`` is raised as soon as their text passes
    ``max_text_chars`` (kb.max_file_text_chars).
    """
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="chatfleet-load-") as temporary:
            return load_document(file_name, content, folder=temporary,
                                 max_text_chars=max_text_chars)
    max_text_chars = max_text_chars or sys.maxsize
    extension = check_extension(file_name)
    if extension == ".docx":
        _check_docx_size(file_name, content, max_text_chars)
    path = os.path.join(folder, "upload" + extension)
    with open(path, "wb") as file:
        file.write(content)
    loader = _loader_for(extension, path, content, file_name)
    documents: list[Document] = []
    chars = 0
    try:
        for document in loader.lazy_load():
            chars += len(document.page_content)
            if chars > max_text_chars:
                raise FileTooLarge(file_name, f"its text is over {max_text_chars} characters, "
                                   "the most one file may have",
                                   "kb.max_file_text_chars")
            documents.append(document)
    except (ImportError, FileTooLarge):
        raise  # a missing parser package is the deployment's fault, not the file's
    except Exception as exc:
        raise UnreadableDocument(file_name, _reason(exc, path)) from exc
    finally:
        os.remove(path)
    if not any(document.page_content.strip() for document in documents):
        raise EmptyDocument(file_name)
    for document in documents:
        document.metadata["source"] = file_name
        if isinstance(loader, BSHTMLLoader):
            document.page_content = _tidy_whitespace(document.page_content)
    return LoadedDocument(documents=documents, loader=type(loader).__name__)


def _check_docx_size(file_name: str, content: bytes, max_text_chars: int) -> None:
    """Refuse a .docx whose XML parts unpack to more than the text limit allows, before
    docx2txt unpacks them into memory (it reads each part whole)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist()
                           if info.filename.endswith(".xml"))
    except zipfile.BadZipFile as exc:
        raise UnreadableDocument(file_name, f"BadZipFile: {exc}") from None
    limit = _DOCX_XML_PER_TEXT_CHAR * max_text_chars
    if unpacked > limit:
        raise FileTooLarge(file_name, f"its XML unpacks to {unpacked} bytes, over {limit} "
                           f"({_DOCX_XML_PER_TEXT_CHAR} bytes per character of the text one file may "
                           "have)",
                           "kb.max_file_text_chars")


def _loader_for(extension: str, path: str, content: bytes, file_name: str) -> BaseLoader:
    if extension == ".pdf":
        return PyPDFLoader(path)
    if extension == ".docx":
        return Docx2txtLoader(path)
    encoding = _text_encoding(content, file_name)
    if extension == ".csv":
        return CSVLoader(path, encoding=encoding)
    if extension in (".html", ".htm"):
        # html.parser: BSHTMLLoader's default, lxml, is not installed. The " " separator keeps
        # minified blocks apart: the default "" glues "<h1>Title</h1><p>Text" into "TitleText".
        return BSHTMLLoader(path, open_encoding=encoding, bs_kwargs={"features": "html.parser"},
                            get_text_separator=" ")
    return TextLoader(path, encoding=encoding)


def _tidy_whitespace(text: str) -> str:
    """HTML text keeps its source's indentation and blank lines (often a third of its characters,
    which would count against chunk sizes): collapse spaces within lines and blank lines between."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _text_encoding(content: bytes, file_name: str) -> str:
    """The encoding to read a text file with: UTF-8 when it decodes, else chardet's first guess
    that decodes all of it (GBK and GB18030 from Chinese Windows, Big5, Shift_JIS, UTF-16)."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return "utf-8-sig"  # also strips a BOM (Excel's UTF-8 CSVs), which "utf-8" would keep
    import chardet  # only non-UTF-8 files need it

    for guess in chardet.detect_all(_detection_sample(content)):
        encoding = guess["encoding"]
        if encoding is None:
            continue
        try:
            content.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
        return encoding
    raise UnreadableDocument(file_name, "it is not UTF-8 text and its encoding could not be "
                             "detected (save it as UTF-8)")


def _detection_sample(content: bytes) -> bytes:
    """The lines that hold non-ASCII bytes: chardet weighs every byte, and a mostly ASCII file with
    a few GBK lines reads as Polish. UTF-16 and UTF-32 (BOM or NUL bytes) go whole: their byte
    0x0A can sit inside a character, and chardet recognises them by the BOM and the NULs."""
    if b"\x00" in content or content.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return content
    return b"\n".join(line for line in content.split(b"\n") if not line.isascii())


def _reason(exc: BaseException, path: str) -> str:
    """The innermost cause, one line, without the temporary path.

    TextLoader and CSVLoader wrap the real error in ``RuntimeError("Error loading <path>")``.
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).replace(path, "the file").split())
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[:_MAX_REASON_CHARS - 3] + "..."
    return reason
