"""Checks knowledge-base names and uploaded file names before anything touches a store or a disk.

The ingestion pipeline (``rag/ingest.py``) and the KB routes call these first; stores trust what
they return (``rag/stores/base.py``). Both become paths or keys, so a name that could climb out of
its folder (``..``, ``/``, ``\\``) is refused, never quietly cut down to its base name: the user has
to learn that the name they sent is not the one that would have been stored.

Names are normalized to Unicode NFC first: macOS clients send decomposed (NFD) names, and the same
name must not become two knowledge bases or two files.
"""

from __future__ import annotations

import unicodedata

__all__ = ["InvalidName", "validate_file_name", "validate_kb_name"]

MAX_KB_NAME_CHARS = 64
MAX_FILE_NAME_BYTES = 255
"""The common file-system limit on one path component (ext4, XFS, APFS), in UTF-8 bytes."""

_KB_PUNCTUATION = frozenset("_-.")


class InvalidName(ValueError):
    """A KB or file name that is refused; the message says what is wrong and how to fix it."""


def validate_kb_name(name: str) -> str:
    """Return ``name`` in NFC if it is a valid knowledge-base name, else raise ``InvalidName``.

    Valid: 1 to 64 letters of any script, decimal digits, ``_``, ``-`` and ``.``, not starting with
    a dot. Combining marks are allowed after the first character, since scripts such as Devanagari
    and Thai need them to spell words.
    """
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise InvalidName("knowledge base name is empty: give a name of 1 to 64 letters, digits, "
                          "'_', '-' or '.'")
    if "/" in name or "\\" in name:
        raise InvalidName(f"knowledge base name {name!r} contains a path separator ('/' or '\\'): "
                          "use letters, digits, '_', '-' or '.' only")
    if name.startswith("."):
        raise InvalidName(f"knowledge base name {name!r} starts with a dot: start it with a "
                          "letter, a digit, '_' or '-'")
    if len(name) > MAX_KB_NAME_CHARS:
        raise InvalidName(f"knowledge base name {name[:20]!r}... is {len(name)} characters long: "
                          f"the limit is {MAX_KB_NAME_CHARS}")
    for position, char in enumerate(name):
        if not _kb_name_char(char, first=position == 0):
            raise InvalidName(f"knowledge base name {name!r} contains {_describe(char)}: use "
                              "letters, digits, '_', '-' or '.' only")
    return name


def validate_file_name(name: str) -> str:
    """Return ``name`` in NFC if it is a plain base name for an uploaded file, else raise.

    Refused: empty, ``.`` and ``..``, any ``/`` or ``\\`` (a path, not a name), control characters
    (NUL truncates paths in C code; newlines forge log lines and headers), and names over 255 UTF-8
    bytes.
    """
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise InvalidName("file name is empty: send the file with its name, e.g. 'report.pdf'")
    if name in (".", ".."):
        raise InvalidName(f"file name {name!r} is not a file name: send the file's own name, "
                          "e.g. 'report.pdf'")
    if "/" in name or "\\" in name:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        hint = f", e.g. {base!r}" if base not in ("", ".", "..") else ""
        raise InvalidName(f"file name {name!r} is a path: folders ('/' or '\\') are not allowed, "
                          f"send the base name only{hint}")
    for char in name:
        if unicodedata.category(char) == "Cc":
            raise InvalidName(f"file name {name!r} contains {_describe(char)}: remove control "
                              "characters from the name")
    size = len(name.encode("utf-8"))
    if size > MAX_FILE_NAME_BYTES:
        raise InvalidName(f"file name {name[:20]!r}... is {size} bytes in UTF-8: the limit is "
                          f"{MAX_FILE_NAME_BYTES}, shorten it")
    return name


def _kb_name_char(char: str, *, first: bool) -> bool:
    if char.isalpha() or char in _KB_PUNCTUATION:
        return True
    category = unicodedata.category(char)
    return category == "Nd" or (not first and category in ("Mn", "Mc"))


def _describe(char: str) -> str:
    """``'#'`` for a printable character, ``U+0000 (NULL)`` for others: messages stay one line."""
    if char.isprintable():
        return repr(char)
    return f"U+{ord(char):04X} ({unicodedata.name(char, 'control character')})"
