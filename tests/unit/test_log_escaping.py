"""What a text log line makes of client-chosen text (logs.py): control characters escaped, lists
of names bounded."""

from __future__ import annotations

import logging
import sys

from chatfleet.logs import TEXT_FORMAT, TextFormatter, escape_controls, name_list


def test_control_characters_are_escaped_and_nothing_else_changes() -> None:
    assert escape_controls("a\nb\r\x1b[2J\x00\x9b\u2028 C:\\x 报告 ok") == (
        "a\\nb\\r\\x1b[2J\\x00\\x9b\\u2028 C:\\x 报告 ok")


def test_a_text_line_stays_one_line_but_a_traceback_follows_it() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("chatfleet.t", logging.INFO, __file__, 1, "field %s", ("x\nFORGED",),
                               info)
    first, *rest = TextFormatter(TEXT_FORMAT).format(record).split("\n")
    assert first.endswith("chatfleet.t: field x\\nFORGED")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_a_list_of_names_is_bounded_in_count_and_length() -> None:
    assert name_list(["a", "b\nc"]) == "'a', 'b\\nc'"
    names = [f"n{i}" for i in range(25)]
    assert name_list(names) == ", ".join(f"'n{i}'" for i in range(10)) + " and 15 more"
    assert name_list(["x" * 1000]) == repr("x" * 64 + "...")
    assert len(name_list(["y" * 10_000] * 10_000)) < 1000
