"""The process's log output: readable text lines, or one JSON object per line for a collector.

``configure_logging`` installs the one handler (stderr) on the root logger; every other logger,
uvicorn's included (``server.py`` gives uvicorn no logging configuration of its own), and Python's
warnings go through it, so with ``json`` every line the process logs is a JSON object.

A record may carry structured fields: ``log.info(msg, *args, extra={FIELDS: {...}})``. The JSON
formatter writes them as keys of the line beside time, level, logger and message; the text
formatter writes the message only, which says the same for a reader, with its control characters
escaped (``\\n``, ``\\x1b``): a newline inside a value a client sent (a field name, a path) cannot
start a forged line, nor an escape sequence rewrite a terminal. The standard library's
``logging`` and ``json`` suffice for this: python-json-logger (installed, as kopf's dependency)
would add a dependency for the same dozen lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal

__all__ = ["FIELDS", "JsonFormatter", "TextFormatter", "configure_logging", "escape_controls",
           "name_list"]

FIELDS = "fields"
"""The ``extra`` key whose mapping the JSON formatter writes as keys of the line."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_RESERVED = frozenset({"time", "level", "logger", "message", "exception", "stack"})
"""Keys of every JSON line; a structured field of the same name is written with a ``_`` after it."""


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 control characters, DEL, and the Unicode line and paragraph separators."""


def escape_controls(text: str) -> str:
    """``text`` with each control character written as its Python escape (``\\n``, ``\\x1b``,
    ``\\u2028``): one line, and nothing a terminal acts on."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def name_list(names: list[str], *, most: int = 10, chars: int = 64) -> str:
    """Client-chosen names (e.g. unknown JSON fields) for a log line: the first ``most``, each cut
    to ``chars`` characters and quoted, then "and N more": a line of bounded size, whatever the
    client sent."""
    shown = ", ".join(repr(n if len(n) <= chars else n[:chars] + "...") for n in names[:most])
    rest = len(names) - most
    return f"{shown} and {rest} more" if rest > 0 else shown


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` with the message's control characters escaped (:func:`escape_controls`);
    a traceback still follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
    ``message``, the record's structured fields, and ``exception`` / ``stack`` as text when the
    record has them. Never more than one line: newlines and non-ASCII characters inside values are
    escaped, so any collector (and any terminal encoding) reads it."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
                    + f".{int((record.created - seconds) * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if fields:
            for key, value in fields.items():
                line[f"{key}_" if key in _RESERVED else key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: Literal["text", "json"] = "text") -> None:
    """Log ``level`` and above to stderr in ``log_format``, replacing any handler already on the
    root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream request
