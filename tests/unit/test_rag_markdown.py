"""Markdown structure for the lexical index (rag/markdown.py): heading paths and lead-in labels."""

from __future__ import annotations

from chatfleet.rag.markdown import heading_paths, lead_in_labels

DOC = """# Guide

Intro.

## Install

```bash
# not a heading: a comment in a code block
pip install chatfleet
```

### On a laptop

Steps.

## Operate

Setext heading below
--------------------

Text.
"""


def test_each_offset_gets_the_headings_in_force_there_outermost_first() -> None:
    offsets = [DOC.index(marker) for marker in
               ("Intro", "# not a heading", "Steps", "## Operate", "Text.")]
    offsets.insert(0, 0)
    assert heading_paths(DOC, offsets) == [
        ["Guide"],
        ["Guide"],
        ["Guide", "Install"],
        ["Guide", "Install", "On a laptop"],
        ["Guide", "Operate"],
        ["Guide", "Setext heading below"],  # an h2 too: it follows "Operate"
    ]


def test_offsets_in_any_order_and_before_the_first_heading() -> None:
    text = "Preface.\n\n# Title\n\nBody.\n"
    assert heading_paths(text, [text.index("Body"), 0, 3]) == [["Title"], [], []]


def test_a_heading_of_the_same_level_replaces_its_sibling_and_ends_its_subsections() -> None:
    text = "# A\n## B\n### C\n## D\nx\n"
    assert heading_paths(text, [text.index("x")]) == [["A", "D"]]


def test_lead_in_labels_are_bold_text_opening_a_line_or_a_list_item() -> None:
    text = ("- **Admission**: slots and a queue.\n"
            "  continued, with **bold** inside a line: not a label\n"
            "* __Probes__ `/livez`\n"
            "3. **Drain.** Finish, then exit.\n"
            "**Rotation.** Every listed key is valid.\n"
            "-**not a list item**\n"
            "** spaced ** is not bold\n")
    assert lead_in_labels(text) == ["Admission", "Probes", "Drain.", "Rotation."]
