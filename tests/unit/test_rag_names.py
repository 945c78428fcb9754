"""KB and upload file names (rag/names.py): what is refused, why the message says so, NFC."""

from __future__ import annotations

import unicodedata

import pytest

from chatfleet.rag.names import InvalidName, validate_file_name, validate_kb_name


@pytest.mark.parametrize("name", ["samples", "kb_2024-v1.0", "知识库", "产品手册_v2", "Ärzte",
                                  "हिन्दी", "a", "x" * 64])
def test_kb_names_of_letters_of_any_script_digits_and_dash_underscore_dot_are_accepted(
        name: str) -> None:
    assert validate_kb_name(name) == name


@pytest.mark.parametrize(("name", "reason"), [
    ("", "empty"),
    (".", "starts with a dot"),
    ("..", "starts with a dot"),
    (".hidden", "starts with a dot"),
    ("../other", "path separator"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("x" * 65, "65 characters long"),
    ("my kb", "' '"),
    ("kb\x00", "U+0000"),
    ("kb#1", "'#'"),
])
def test_bad_kb_names_are_refused_with_the_reason_in_the_message(name: str, reason: str) -> None:
    with pytest.raises(InvalidName, match="knowledge base name") as caught:
        validate_kb_name(name)
    assert reason in str(caught.value)


def test_kb_name_errors_are_value_errors_so_callers_can_map_them_to_a_400() -> None:
    with pytest.raises(ValueError):
        validate_kb_name("a/b")


def test_kb_names_are_returned_in_nfc_so_one_name_is_one_kb() -> None:
    decomposed = unicodedata.normalize("NFD", "Café")
    assert decomposed != "Café"
    assert validate_kb_name(decomposed) == "Café"


@pytest.mark.parametrize("name", ["report.pdf", "产品手册.docx", "季度报告 2024 (final).txt",
                                  "no-extension", ".env", "a" * 251 + ".txt"])
def test_plain_base_names_including_chinese_ones_are_accepted_unchanged(name: str) -> None:
    assert validate_file_name(name) == name


@pytest.mark.parametrize(("name", "reason"), [
    ("", "empty"),
    (".", "not a file name"),
    ("..", "not a file name"),
    ("../x.txt", "is a path"),
    ("..\\x.txt", "is a path"),
    ("a/b.txt", "is a path"),
    ("/etc/passwd", "is a path"),
    ("../../etc/passwd", "is a path"),
    ("C:\\Users\\me\\notes.txt", "is a path"),
    ("x\x00.txt", "U+0000"),
    ("line\nbreak.txt", "U+000A"),
    ("bell\x07.txt", "U+0007"),
    ("a" * 296 + ".txt", "300 bytes"),
    ("文" * 86, "258 bytes"),
])
def test_paths_control_characters_and_long_names_are_refused_with_the_reason_in_the_message(
        name: str, reason: str) -> None:
    with pytest.raises(InvalidName, match="file name") as caught:
        validate_file_name(name)
    assert reason in str(caught.value)


def test_a_path_is_refused_not_cut_down_and_the_message_suggests_the_base_name() -> None:
    with pytest.raises(InvalidName) as caught:
        validate_file_name("../../etc/passwd")
    assert "send the base name only, e.g. 'passwd'" in str(caught.value)


def test_error_messages_stay_on_one_line_whatever_the_name_holds() -> None:
    with pytest.raises(InvalidName) as caught:
        validate_file_name("evil\r\nX-Injected: 1.txt")
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)


def test_file_names_are_returned_in_nfc_and_the_byte_limit_applies_to_the_nfc_form() -> None:
    decomposed = unicodedata.normalize("NFD", "résumé.pdf")
    assert validate_file_name(decomposed) == "résumé.pdf"
    # 100 "é" are 300 bytes decomposed (e + U+0301) but 200 bytes composed: accepted.
    long_decomposed = unicodedata.normalize("NFD", "é" * 100)
    assert len(long_decomposed.encode("utf-8")) == 300
    assert validate_file_name(long_decomposed) == "é" * 100
