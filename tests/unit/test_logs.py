"""The JSON log formatter: one parseable object per record, fields as keys, never two lines."""

from __future__ import annotations

import json
import logging
import sys

from chatfleet.logs import FIELDS, JsonFormatter


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("chatfleet.test", logging.WARNING, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_json_object_with_its_fields_as_keys() -> None:
    line = JsonFormatter().format(record("GET %s", "/x\nforged", **{FIELDS: {
        "status": 200, "level": "field named like a key", "latency_s": 0.5}}))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "WARNING" and parsed["logger"] == "chatfleet.test"
    assert parsed["message"] == "GET /x\nforged"
    assert parsed["time"].endswith("Z") and len(parsed["time"]) == len("2026-01-05T10:00:00.118Z")
    assert (parsed["status"], parsed["latency_s"], parsed["level_"]) == (
        200, 0.5, "field named like a key")


def test_an_exception_is_one_key_holding_the_traceback() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: bad value" in json.loads(line)["exception"]
