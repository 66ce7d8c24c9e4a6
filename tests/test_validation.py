"""Checks of what users pass in: file names, descriptions, ids and the connection's extras, at their edges."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cliniko_provider.exceptions import ClinikoConfigError, ClinikoInputError
from cliniko_provider.utils.validation import (
    check_description,
    check_upload_filename,
    conn_id_extra,
    number_extra,
    one_line,
    validate_id,
)


def refusal(filename: str, problem: str) -> str:
    return re.escape(
        f"filename {filename!r} {problem}. Pass a plain file name such as 'report.pdf' as filename= "
        "(or rename the file)."
    )


@pytest.mark.parametrize(
    "name",
    [
        "report.pdf",
        "  spaces at both ends.pdf  ",
        "...dots.pdf",
        "X-ray 10X.pdf",
        "x",
        "é" * 127 + "a",  # 255 bytes in UTF-8
        "a" * 255,
        "ünïcödé 報告 😀.txt",
    ],
)
def test_a_legible_name_of_up_to_255_bytes_is_kept_as_it_is(name: str) -> None:
    assert check_upload_filename(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a" * 256, "is 256 bytes long in UTF-8 (at most 255)"),
        ("é" * 128, "is 256 bytes long in UTF-8 (at most 255)"),  # 128 characters, 256 bytes
        ("", "is empty"),
        ("   ", "is empty"),
        (".", "is a path step, not a file name"),
        ("..", "is a path step, not a file name"),
        ("a/b.pdf", "contains '/' or '\\', after which S3 would cut the name"),
        ("a\\b.pdf", "contains '/' or '\\', after which S3 would cut the name"),
    ],
)
def test_names_that_would_not_arrive_intact_are_refused_naming_the_fix(name: str, problem: str) -> None:
    with pytest.raises(ClinikoInputError, match=f"^{refusal(name, problem)}$"):
        check_upload_filename(name)


@pytest.mark.parametrize(
    ("char", "described"),
    [
        ("\t", "U+0009 (a control character)"),  # Cc
        ("\u0085", "U+0085 (a control character)"),  # Cc (C1)
        ("\u202e", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),  # Cf
        ("\ufeff", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),  # Cf
        ("\u2028", "U+2028 (LINE SEPARATOR)"),  # Zl
        ("\u2029", "U+2029 (PARAGRAPH SEPARATOR)"),  # Zp
        ("\ue000", "U+E000 (a control character)"),  # Co: private use
        ("\ud800", "U+D800 (a control character)"),  # Cs: a lone surrogate
        ("\u0378", "U+0378 (a control character)"),  # Cn: unassigned
    ],
)
def test_invisible_characters_are_refused_by_code_point(char: str, described: str) -> None:
    name = f"a{char}b.pdf"
    problem = (
        f"holds {described}, an invisible control or formatting character that would show the name other "
        "than it is"
    )
    with pytest.raises(ClinikoInputError, match=f"^{refusal(name, problem)}$"):
        check_upload_filename(name)


def test_a_description_is_measured_in_characters_up_to_255() -> None:
    assert check_description("é" * 255) == "é" * 255  # 510 bytes, 255 characters: Cliniko takes it
    assert check_description("") == ""
    with pytest.raises(
        ClinikoInputError,
        match="^"
        + re.escape("description is 256 characters long; Cliniko takes at most 255. Shorten it.")
        + "$",
    ):
        check_description("x" * 256)


def test_a_refused_id_names_the_argument_the_value_and_where_to_find_ids() -> None:
    with pytest.raises(ClinikoInputError) as error:
        validate_id("attachment_id", "12a")
    assert str(error.value) == (
        "attachment_id must be a Cliniko numeric id such as '1234567890', got '12a'. "
        "Look the record up first (e.g. ClinikoHook.find_patients) and pass its 'id'."
    )
    assert validate_id("patient_id", 1) == "1"
    assert validate_id("patient_id", "1") == "1"


def fix(default: str) -> str:
    return f"set it to a number such as {default}, or remove it to use that default."


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 65.0), ("", 65.0), ("0", 0.0), (0, 0.0), ("0.5", 0.5), (" 12 ", 12.0), (3600, 3600.0)],
)
def test_a_numeric_extra_is_its_default_when_unset_and_zero_is_a_value(value: Any, expected: float) -> None:
    extra = {} if value is None else {"wait": value}
    assert number_extra(extra, "wait", 65.0, 0, 3600) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "must be a number, got 'x': " + fix("65")),
        (10**400, "must be a number, got " + repr(10**400) + ": " + fix("65")),  # float() overflows
        ([], "must be a number, got []: " + fix("65")),
        (False, "must be a number, got False: " + fix("65")),
        ("nan", "must be a finite number, got 'nan': " + fix("65")),
        (-0.5, "must be from 0 to 3600, got -0.5: " + fix("65")),
        (3600.5, "must be from 0 to 3600, got 3600.5: " + fix("65")),
    ],
)
def test_a_bad_numeric_extra_is_named_with_its_range_and_the_fix(value: Any, message: str) -> None:
    with pytest.raises(ClinikoConfigError) as error:
        number_extra({"wait": value}, "wait", 65.0, 0, 3600)
    assert (
        str(error.value)
        == f"The Cliniko connection's extra field 'wait' must {message.removeprefix('must ')}"
    )


def test_a_fractional_range_and_default_are_written_as_they_are() -> None:
    with pytest.raises(ClinikoConfigError) as error:
        number_extra({"rate": 0.25}, "rate", 2.5, 0.5, 10.5)
    assert str(error.value) == (
        "The Cliniko connection's extra field 'rate' must be from 0.5 to 10.5, got 0.25: " + fix("2.5")
    )


def test_a_count_takes_whole_numbers_only() -> None:
    assert number_extra({"n": "4.0"}, "n", 5, 1, 20, whole=True) == 4.0
    assert number_extra({"n": 2.5}, "n", 5, 1, 20) == 2.5
    with pytest.raises(ClinikoConfigError) as error:
        number_extra({"n": "4.5"}, "n", 5, 1, 20, whole=True)
    assert str(
        error.value
    ) == "The Cliniko connection's extra field 'n' must be a whole number, got '4.5': " + fix("5")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("r", "r"), ("a" * 250, "a" * 250), ("Redis_1.b-2", "Redis_1.b-2")],
)
def test_a_connection_id_extra_of_up_to_250_characters_is_taken(value: Any, expected: str | None) -> None:
    extra = {} if value is None else {"redis_conn_id": value}
    assert conn_id_extra(extra, "redis_conn_id") == expected


@pytest.mark.parametrize("value", ["a" * 251, "a b", "a/b", "é", 1, ["r"], "   "])
def test_a_malformed_connection_id_extra_names_the_field_and_the_fix(value: Any) -> None:
    with pytest.raises(ClinikoConfigError) as error:
        conn_id_extra({"redis_conn_id": value}, "redis_conn_id")
    assert str(error.value) == (
        "The Cliniko connection's extra field 'redis_conn_id' must be the id of an Airflow connection "
        f"(letters, digits, '_', '-', '.'), got {value!r}: set it to e.g. 'redis_default', or leave it empty."
    )


def test_one_line_folds_every_kind_of_white_space() -> None:
    assert one_line("  a\r\n\tb   c\u2028d  ") == "a b c d"
    assert one_line("") == ""
