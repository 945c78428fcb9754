"""The file name a multipart upload's part was sent with, before python-multipart shortened it.

python-multipart's ``parse_options_header`` (Starlette's multipart parser calls it) cuts a
``filename`` that starts like a Windows path (``C:\\x.txt``, ``\\\\srv\\share\\x.txt``) down to its
last segment, a work-around for old Internet Explorer, which sent the whole path. ChatFleet
refuses a path as a file name (``rag/names.py``): the client must learn that the name it sent is
not the one that would be stored. Starlette keeps each part's own headers on its ``UploadFile``,
so the name as sent is read back from the part's ``Content-Disposition`` here.
"""

from __future__ import annotations

from email.message import Message

from starlette.datastructures import UploadFile

__all__ = ["sent_file_name"]


def _filename_param(disposition: str) -> str | None:
    """The plain ``filename`` parameter of a Content-Disposition value, unquoted as
    python-multipart unquotes it (the standard library's header-parameter parser does the same:
    split on ``;`` outside quotes, ``\\\\`` and ``\\"`` unescaped)."""
    header = Message()
    header["content-disposition"] = disposition
    for key, value in header.get_params(header="content-disposition", failobj=[])[1:]:
        if key == "filename":
            return value if isinstance(value, str) else None
    return None


def sent_file_name(upload: UploadFile, charset: str = "utf-8") -> str:
    """``upload``'s file name as the client sent it: ``upload.filename``, unless the parser cut a
    Windows path down to its last segment, then the whole path (which a name check refuses)."""
    name = upload.filename or ""
    raw = _filename_param(upload.headers.get("content-disposition", ""))
    if raw is None or "\\" not in raw:
        return name
    try:
        sent = raw.encode("latin-1").decode(charset)  # headers are latin-1; the name, the form's
    except (UnicodeEncodeError, UnicodeDecodeError):
        sent = raw
    return sent if sent != name and sent.rsplit("\\", 1)[-1] == name else name
