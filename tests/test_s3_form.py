"""The streamed multipart body and S3's XML answers: bytes, order, names, chunks, errors."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cliniko_provider.sandbox.multipart import MultipartReader, boundary_of
from cliniko_provider.utils.idempotency import wire_filename
from cliniko_provider.utils.s3_form import (
    MultipartBody,
    SourceChangedError,
    content_disposition,
    parse_s3_xml,
    quote_parameter,
)
from tests.helpers import TRICKY_NAMES

FIELDS = [
    ("key", "1/patients/2/attachments/temp/abc/${filename}"),
    ("policy", "eyJleHBpcmF0aW9uIjoi"),
    ("x-amz-credential", "AKIA/20260101/ap-southeast-2/s3/aws4_request"),
    ("x-amz-signature", "5ig"),
    ("x-amz-algorithm", "AWS4-HMAC-SHA256"),
    ("x-amz-date", "20260101T000000Z"),
    ("success_action_status", "201"),
    ("acl", "private"),
]


class CountingOpener:
    """Opens an in-memory file, counting how often it was opened."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened = 0

    def __call__(self) -> io.BytesIO:
        self.opened += 1
        return io.BytesIO(self.data)


def make_body(data: bytes, filename: str = "report.pdf", **kwargs: Any) -> MultipartBody:
    return MultipartBody(FIELDS, CountingOpener(data), len(data), filename, boundary="BOUNDARY", **kwargs)


def split_parts(raw: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """A plain, independent parse: split on the boundary; headers by line; returns (params, body)."""
    delimiter = b"\r\n--" + boundary.encode()
    assert raw.startswith(b"--" + boundary.encode() + b"\r\n")
    assert raw.endswith(delimiter + b"--\r\n")
    chunks = (b"\r\n" + raw).split(delimiter)[1:-1]
    parts = []
    for chunk in chunks:
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        lines = head.decode("utf-8").split("\r\n")
        params = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', lines[0]))
        params["_headers"] = "\n".join(lines)
        parts.append((params, body))
    return parts


def test_length_is_exactly_the_bytes_produced() -> None:
    for size in (1, 1000, 3 * 1024 * 1024 + 17):
        body = make_body(b"x" * size, chunk_size=1024 * 1024)
        assert len(body) == len(b"".join(body))


def test_fields_unchanged_in_order_and_file_last() -> None:
    data = bytes(range(256)) * 10
    body = make_body(data)
    parts = split_parts(b"".join(body), "BOUNDARY")
    assert [(p["name"], value.decode()) for p, value in parts[:-1]] == FIELDS
    file_params, file_bytes = parts[-1]
    assert file_params["name"] == "file"
    assert file_params["filename"] == "report.pdf"
    assert file_bytes == data
    assert body.content_type == "multipart/form-data; boundary=BOUNDARY"


def test_file_is_read_in_chunks_and_reopened_per_iteration() -> None:
    opener = CountingOpener(b"a" * 2500)
    body = MultipartBody(FIELDS, opener, 2500, "f.bin", chunk_size=1000)
    chunks = list(body)
    assert [len(chunk) for chunk in chunks[1:-1]] == [1000, 1000, 500]
    assert opener.opened == 1
    assert b"".join(body) == b"".join(chunks)  # a retry sends the same bytes
    assert opener.opened == 2


def test_progress_reports_the_file_bytes_sent() -> None:
    seen: list[int] = []
    list(make_body(b"z" * 2500, chunk_size=1000, progress=seen.append))
    assert seen == [1000, 2000, 2500]


def test_sent_is_called_once_the_last_part_was_taken_and_more_is_asked() -> None:
    calls: list[str] = []
    parts = iter(make_body(b"z" * 2500, chunk_size=1000, sent=lambda: calls.append("sent")))
    *_, tail = (next(parts) for _ in range(5))  # head, three chunks, tail: all of it, none sent yet
    assert tail.endswith(b"--BOUNDARY--\r\n") and calls == []
    assert next(parts, None) is None and calls == ["sent"]


@pytest.mark.parametrize(("actual", "problem"), [(999, "shrank"), (1001, "grew")])
def test_a_file_that_changed_size_is_an_error(actual: int, problem: str) -> None:
    body = MultipartBody(FIELDS, CountingOpener(b"q" * actual), 1000, "f.bin")
    with pytest.raises(SourceChangedError, match=problem):
        b"".join(body)


def test_random_boundaries_differ() -> None:
    first = MultipartBody(FIELDS, CountingOpener(b"1"), 1, "a")
    second = MultipartBody(FIELDS, CountingOpener(b"1"), 1, "a")
    assert first.boundary != second.boundary


def test_quote_parameter_writes_quotes_as_browsers_and_curl_do() -> None:
    """WHATWG HTML (and curl 7.81+): '"' becomes %22; a backslash is no escape and stays as it is."""
    assert quote_parameter('it\'s "x" \\ y') == '"it\'s %22x%22 \\ y"'
    assert (
        content_disposition("file", "ü.pdf")
        == 'Content-Disposition: form-data; name="file"; filename="ü.pdf"'.encode()
    )


@pytest.mark.parametrize("bad", ["a\r\nContent-Type: evil", "a\nb", "nul\0"])
def test_names_with_line_breaks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        quote_parameter(bad)


def test_no_filename_star_parameter() -> None:
    """RFC 7578 section 4.2: ``filename*`` must not be used in form data; UTF-8 goes in ``filename``."""
    raw = b"".join(make_body(b"1", filename="ünï.txt"))
    assert b"filename*" not in raw
    assert 'filename="ünï.txt"'.encode() in raw


async def _read_parts(raw: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 7):  # awkward chunk size, as a network would
            yield raw[start : start + 7]

    boundary = boundary_of(content_type)
    assert boundary is not None
    reader = MultipartReader(chunks(), boundary)
    found = []
    while (part := await reader.next_part()) is not None:
        data = b"".join([chunk async for chunk in reader.read_data()])
        found.append((part.name, part.filename, data))
    return found


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_tricky_names_survive_the_sandbox_s3_parser(name: str) -> None:
    """The sandbox's reader takes the quoted string as S3 would: the name arrives as sent (``"`` as %22)."""
    body = make_body(b"data", filename=name)
    parts = asyncio.run(_read_parts(b"".join(body), body.content_type))
    assert parts[-1] == ("file", wire_filename(name), b"data")
    assert [(n, v.decode()) for n, _, v in parts[:-1]] == FIELDS


def test_parse_post_response() -> None:
    xml = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<PostResponse><Location>https://b.s3/1%2Fa%20b.pdf</Location>'
        b'<Bucket>b</Bucket><Key>1/a b &amp; c.pdf</Key><ETag>"e"</ETag></PostResponse>'
    )
    assert parse_s3_xml(xml) == {
        "_root": "PostResponse",
        "Location": "https://b.s3/1%2Fa%20b.pdf",
        "Bucket": "b",
        "Key": "1/a b & c.pdf",
        "ETag": '"e"',
    }


def test_parse_error_with_namespace_and_not_xml() -> None:
    xml = (
        '<Error xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Code>AccessDenied</Code>'
        "<Message>Invalid according to Policy: Policy expired.</Message></Error>"
    )
    parsed = parse_s3_xml(xml)
    assert (parsed["_root"], parsed["Code"], parsed["Message"]) == (
        "Error",
        "AccessDenied",
        "Invalid according to Policy: Policy expired.",
    )
    assert parse_s3_xml(b"<html>502 Bad Gateway") == {}
    assert parse_s3_xml(b"") == {}


# --- S3's answers: errors, the Key, the upload_url ------------------------------------------------------


def test_s3_error_takes_code_and_message_from_the_xml() -> None:
    from cliniko_provider.exceptions import S3UploadError, S3UploadRejectedError
    from cliniko_provider.utils.s3_form import s3_error

    error = s3_error(403, {"Code": "AccessDenied", "Message": "Policy expired."}, "<xml/>")
    assert type(error) is S3UploadRejectedError
    assert (error.status, error.code, error.message) == (403, "AccessDenied", "Policy expired.")
    for status in (429, 500, 503):
        assert type(s3_error(status, {"Code": "SlowDown"}, "")) is S3UploadError
    assert type(s3_error(499, {}, "")) is S3UploadRejectedError


def test_s3_error_without_xml_names_the_status_and_a_line_of_the_body() -> None:
    from cliniko_provider.utils.s3_form import s3_error

    error = s3_error(502, {}, "Bad\n  gateway " + "x" * 400)
    assert error.code == "HTTP502"
    assert error.message == ("Bad gateway " + "x" * 400)[:200]
    assert s3_error(400, {}, "   ").message == "no message"


def test_s3_entity_too_large_says_what_to_do() -> None:
    from cliniko_provider.utils.s3_form import s3_error

    error = s3_error(400, {"Code": "EntityTooLarge", "Message": "Too big"}, "")
    assert error.message == (
        "Too big (the presign caps the size at S3's 5 GiB, or at the storage the Cliniko account has left:"
        " free space in Cliniko or upgrade the account)"
    )


def test_expected_key_fills_in_the_file_name() -> None:
    from cliniko_provider.utils.s3_form import expected_key

    assert expected_key([("acl", "x"), ("Key", "1/temp/${filename}")], "a b.pdf") == "1/temp/a b.pdf"
    assert expected_key([("key", "fixed")], "a.pdf") == "fixed"
    assert expected_key([("policy", "p")], "a.pdf") == ""


@pytest.mark.parametrize(
    ("url", "key", "joined"),
    [
        ("https://b.s3.amazonaws.com/", "1/a.pdf", "https://b.s3.amazonaws.com/1/a.pdf"),
        ("https://b.s3.amazonaws.com", "1/a.pdf", "https://b.s3.amazonaws.com/1/a.pdf"),
        ("https://b.s3.amazonaws.com//", "//1/a.pdf", "https://b.s3.amazonaws.com/1/a.pdf"),
    ],
)
def test_join_upload_url_puts_exactly_one_slash_between(url: str, key: str, joined: str) -> None:
    from cliniko_provider.utils.s3_form import join_upload_url

    assert join_upload_url(url, key) == joined


def test_each_part_is_written_byte_for_byte_as_a_browser_writes_it() -> None:
    raw = b"".join(MultipartBody([("acl", "private")], CountingOpener(b"DATA"), 4, "X-ray.pdf", boundary="B"))
    assert raw == (
        b"--B\r\n"
        b'Content-Disposition: form-data; name="acl"\r\n\r\n'
        b"private\r\n"
        b"--B\r\n"
        b'Content-Disposition: form-data; name="file"; filename="X-ray.pdf"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        b"DATA\r\n"
        b"--B--\r\n"
    )


def test_the_file_part_carries_the_content_type_given() -> None:
    raw = b"".join(make_body(b"%PDF", content_type="application/pdf"))
    assert b'filename="report.pdf"\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n' in raw


def test_an_empty_file_and_one_byte_chunks_are_sent_exactly() -> None:
    empty = make_body(b"")
    assert len(empty) == len(b"".join(empty))
    assert split_parts(b"".join(empty), "BOUNDARY")[-1][1] == b""
    seen: list[int] = []
    body = make_body(b"abc", chunk_size=1, progress=seen.append)
    assert list(body)[1:-1] == [b"a", b"b", b"c"]
    assert seen == [1, 2, 3]


@pytest.mark.parametrize(("size", "chunk_size"), [(-1, 1024), (10, 0), (-1, 0)])
def test_a_negative_size_or_empty_chunk_is_refused(size: int, chunk_size: int) -> None:
    with pytest.raises(ValueError, match=r"^size must be >= 0 and chunk_size >= 1$"):
        MultipartBody(FIELDS, CountingOpener(b""), size, "f.bin", chunk_size=chunk_size)


def test_a_file_that_grew_is_refused_before_any_byte_past_its_size_is_sent() -> None:
    body = MultipartBody(FIELDS, CountingOpener(b"q" * 2600), 2500, "f.bin", chunk_size=1000)
    sent: list[bytes] = []
    with pytest.raises(
        SourceChangedError, match=r"^the file grew while it was being sent \(beyond 2500 bytes\)$"
    ):
        sent.extend(body)
    assert [len(chunk) for chunk in sent[1:]] == [1000, 1000]
    with pytest.raises(
        SourceChangedError, match=r"^the file shrank while it was being sent \(3 of 4 bytes\)$"
    ):
        b"".join(MultipartBody(FIELDS, CountingOpener(b"abc"), 4, "f.bin"))


def test_a_name_with_a_line_break_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"^a multipart name may not contain line breaks or NUL characters$"):
        quote_parameter("a\nb")
    assert quote_parameter("X-ray 10X.pdf") == '"X-ray 10X.pdf"'


def test_s3_answers_keep_the_key_exactly_and_trim_the_rest() -> None:
    xml = (
        "<PostResponse>\n  <Location>\n  https://b/1/k  \n</Location>\n  <Bucket> b </Bucket>\n"
        "  <Key>  1/  spaced name.pdf  </Key>\n  <ETag/>\n</PostResponse>"
    )
    assert parse_s3_xml(xml) == {
        "_root": "PostResponse",
        "Location": "https://b/1/k",
        "Bucket": "b",
        "Key": "  1/  spaced name.pdf  ",
        "ETag": "",
    }


def test_an_s3_error_with_an_empty_message_falls_back_to_the_body() -> None:
    from cliniko_provider.utils.s3_form import s3_error

    body = "<Error><Code>AccessDenied</Code><Message/></Error>"
    answer = parse_s3_xml(body)
    assert answer["Message"] == ""
    assert s3_error(403, answer, body).message == body


def test_upload_url_keeps_x_and_slashes_inside_the_url_and_key() -> None:
    from cliniko_provider.utils.s3_form import join_upload_url

    assert join_upload_url("https://s3.example/BOX/", "X-ray.pdf") == "https://s3.example/BOX/X-ray.pdf"
    assert join_upload_url("https://s3.example/BOX", "/a/X.pdf") == "https://s3.example/BOX/a/X.pdf"
