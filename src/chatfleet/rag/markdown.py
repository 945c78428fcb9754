"""What a Markdown document's structure says a chunk is about: its headings and lead-in labels.

A chunk cut from the middle of a section has lost its heading: the "What it does" of a README's
bullet list, the "Drain" of an operations page. The splitter (``rag/splitting.py``) records, in
each Markdown chunk's metadata under ``HEADINGS``, the headings in force where the chunk starts
(``["ChatFleet", "What it does"]``), found by a CommonMark parser over the whole file, so a ``#``
comment inside a code block is not taken for one. The lexical index (``rag/lexical.py``) then
indexes a chunk by those headings and by its lead-in labels, the bold text that opens a
paragraph or a list item (``- **Admission**: ...``), which names what the rest of the item is
about: docs/benchmarks.md measures what each adds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate

from markdown_it import MarkdownIt

__all__ = ["HEADINGS", "heading_paths", "lead_in_labels"]

HEADINGS = "headings"
"""The chunk metadata key of the headings in force where a Markdown chunk starts, outermost
first."""

_LEAD_IN = re.compile(r"^[ \t]*(?:(?:[-*+]|\d{1,9}[.)])[ \t]+)?(\*\*|__)(?=\S)(.+?)(?<=\S)\1", re.M)
"""Bold text at the start of a line, after a list marker if any (CommonMark's ``**`` or ``__``)."""


def heading_paths(text: str, offsets: Sequence[int]) -> list[list[str]]:
    """For each character offset into the Markdown ``text``, the titles of the headings in force
    there, outermost first: the last heading at or before it of each level above the nearest."""
    line_starts = [0, *accumulate(len(line) for line in text.splitlines(keepends=True))]
    tokens = MarkdownIt("commonmark").parse(text)
    headings = [(line_starts[token.map[0]], int(token.tag[1:]), tokens[i + 1].content)
                for i, token in enumerate(tokens) if token.type == "heading_open" and token.map]
    paths: list[list[str]] = [[] for _ in offsets]
    path: list[tuple[int, str]] = []
    passed = 0
    for index in sorted(range(len(offsets)), key=offsets.__getitem__):  # one sweep down the file
        while passed < len(headings) and headings[passed][0] <= offsets[index]:
            _, level, title = headings[passed]
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, title)]
            passed += 1
        paths[index] = [title for _, title in path]
    return paths


def lead_in_labels(text: str) -> list[str]:
    """The bold labels that open a line of ``text``, in order: ``**Admission**`` of
    ``- **Admission**: ...``, ``**Rotation.**`` of a paragraph that starts with it."""
    return [match.group(2) for match in _LEAD_IN.finditer(text)]
