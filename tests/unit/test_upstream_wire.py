"""The upstream stream's line splitter, stream reader and body reader: bounds, SSE's three line
ends, and the same text whatever the reads' boundaries."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from chatfleet.engines.base import EngineBadData
from chatfleet.engines.upstream_wire import (
    ContentTemplate,
    StreamLines,
    UpstreamStream,
    parse_chunk,
    read_at_most,
)


async def _pieces(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def _lines(*pieces: bytes, limit: int = 1 << 20) -> list[bytes]:
    lines = StreamLines(limit)
    return [line for piece in pieces for line in lines.feed(piece)]


async def test_lines_end_at_lf_crlf_or_cr_wherever_the_pieces_split() -> None:
    assert await _lines(b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n") == [
        b"data: a", b"", b"data: b", b"", b"data: c", b"", b"data: d"]
    split = await _lines(b"da", b"ta: a", b"\r", b"\ndata: b\n", b"tail without end")
    assert [line for line in split if line] == [b"data: a", b"data: b"]


async def test_a_line_over_the_bound_is_bad_data_even_sent_a_byte_at_a_time() -> None:
    assert await _lines(b"x" * 64 + b"\n", limit=64) == [b"x" * 64]
    with pytest.raises(EngineBadData, match="longer than 64 bytes"):
        await _lines(*([b"x"] * 65), limit=64)
    with pytest.raises(EngineBadData, match="longer than 64 bytes"):
        await _lines(b"ok\n" + b"x" * 65 + b"\nok\n", limit=64)


async def test_read_at_most_stops_at_the_limit() -> None:
    assert await read_at_most(_pieces(b"abc", b"def"), 10) == (b"abcdef", False)
    assert await read_at_most(_pieces(b"abc", b"def", b"never read"), 4) == (b"abcd", True)


def _event(text: str | None, *, end: bytes = b"\n\n", finish: str = "null") -> bytes:
    """A chat chunk's event as vLLM writes it (compact, UTF-8); ``text`` None: the finish's."""
    delta = "{}" if text is None else json.dumps({"content": text}, ensure_ascii=False,
                                                 separators=(",", ":"))
    return (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":' + delta.encode() + b',"finish_reason":'
            + finish.encode() + b"}]}" + end)


def _read(pieces: list[bytes]) -> tuple[list[tuple[str, int]], str | None]:
    stream = UpstreamStream(chat=True)
    deltas = [(d.text, d.tokens) for piece in pieces if (d := stream.feed(piece)) is not None]
    return deltas, stream.finish().finish_reason if stream.done else None


STREAM = [_event(""), _event("Hello"), _event(" wor"), _event('ld "quoted"\n'), _event("\u00e9\u2028"),
          _event('"\n\ndata: {}\n\n'), _event("tab\there"), _event(" x", end=b"\r\n\r\n"),
          _event(" y"), _event(None, finish='"stop"'), b"data: [DONE]\n\n"]
TEXT = 'Hello world "quoted"\n\u00e9\u2028"\n\ndata: {}\n\ntab\there x y'


def test_an_event_a_read_gives_the_text_and_tokens_that_any_split_of_the_bytes_gives() -> None:
    """One event per read takes the fast path (``ContentTemplate.event_text``); the same bytes
    split anywhere else are read line by line: same text, in order, same token count."""
    per_event, reason = _read(STREAM)
    assert [tokens for _, tokens in per_event] == [1] * 8 and reason == "stop"
    whole = b"".join(STREAM)
    for pieces in ([whole], [whole[i:i + 1] for i in range(len(whole))],
                   [whole[i:i + 7] for i in range(0, len(whole), 7)],
                   [STREAM[0] + STREAM[1][:5], STREAM[1][5:], *STREAM[2:]]):
        deltas, reason = _read(pieces)
        assert "".join(text for text, _ in deltas) == "".join(text for text, _ in per_event) == TEXT
        assert sum(tokens for _, tokens in deltas) == 8 and reason == "stop"


def _learnt(line: bytes, text: str, *, with_line: bool = True) -> ContentTemplate:
    """A template shown ``line``'s chunk as a stream's first and second text chunk."""
    template = ContentTemplate(chat=True)
    for _ in range(2):
        template.learn(line[6:], parse_chunk(line[6:]), text, line if with_line else b"")
    return template


def test_a_streams_first_text_chunk_teaches_nothing_and_its_second_does() -> None:
    """The first token goes by unlearnt (it is on the time to first token); the second teaches."""
    template = ContentTemplate(chat=True)
    line = _event("a").rstrip(b"\n")
    template.learn(line[6:], parse_chunk(line[6:]), "a", line)
    assert template.event_text(_event("b")) is None and template.text(line[6:]) is None
    template.learn(line[6:], parse_chunk(line[6:]), "a", line)
    assert template.event_text(_event("b")) == "b" and template.text(line[6:]) == "a"


def test_the_learnt_event_reads_only_one_whole_event_of_the_same_shape() -> None:
    line = _event("a").rstrip(b"\n")
    template = _learnt(line, "a")
    assert template.event_text(_event('b "\n')) == 'b "\n'
    for other in (_event("b") + _event("c"), _event("b", end=b"\r\n\r\n"), _event("b", end=b"\n"),
                  _event(""), _event(None, finish='"stop"'), b"x" + _event("b")):
        assert template.event_text(other) is None, other
    unlearnt = _learnt(line, "a", with_line=False)  # no line: the chunk only
    assert unlearnt.event_text(_event("b")) is None and unlearnt.text(line[6:]) == "a"


def test_two_events_in_one_read_are_two_tokens_in_one_delta() -> None:
    stream = UpstreamStream(chat=True)
    stream.feed(_event("") + _event("a"))
    delta = stream.feed(_event("b") + _event("c"))
    assert delta is not None and (delta.text, delta.tokens) == ("bc", 2)


def test_an_event_shaped_like_the_text_chunks_around_a_bad_string_is_parsed_and_refused() -> None:
    stream = UpstreamStream(chat=True)
    stream.feed(_event("") + _event("a") + _event("a"))
    good = _event("b")
    assert stream._template.event_text(good) == "b"  # the template reads this shape now
    bad = good.replace(b'"b"', b'"b\x01"')  # a raw control character: no JSON string
    with pytest.raises(EngineBadData):
        stream.feed(bad)
    too_long = UpstreamStream(chat=True, max_line_bytes=len(good) - 3)
    too_long.feed(_event("") + _event(""))  # learns nothing (empty texts), lines within the bound
    with pytest.raises(EngineBadData, match="longer than"):
        too_long.feed(good)
