"""The upstream stream's line splitter and body reader: bounds, and SSE's three line ends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatfleet.engines.base import EngineBadData
from chatfleet.engines.upstream_wire import StreamLines, read_at_most


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
