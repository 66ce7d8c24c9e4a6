"""S3's browser-style POST: the streamed ``multipart/form-data`` body, and S3's answers (XML, errors, Key).

``requests`` holds a ``files=`` body wholly in memory. :class:`MultipartBody` instead has ``__len__`` (the
exact total, so ``requests`` sends ``Content-Length``, never chunked) and ``__iter__`` (the form fields,
then the file in chunks read on demand, then the closing boundary), so memory stays flat whatever the
file size. Iterating again re-opens the source, so one body serves every attempt of a retried upload.

File names are written as browsers write them (WHATWG HTML's multipart/form-data encoding, also curl's
since 7.81): in the ``filename`` parameter as a quoted string, UTF-8 as is, with ``"`` written ``%22``
(a backslash is not an escape there). So S3 stores what a browser upload of the same file would store.
No ``filename*`` parameter: RFC 7578 forbids it in form data, and S3 substitutes ``${filename}`` from
``filename`` alone.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO
from xml.etree import ElementTree

from cliniko_provider.exceptions import ClinikoError, S3UploadError, S3UploadRejectedError
from cliniko_provider.utils.validation import one_line

CHUNK_SIZE = 1024 * 1024
CRLF = b"\r\n"
_MD5_HEX = re.compile(r"[0-9a-f]{32}")

Opener = Callable[[], IO[bytes]]
Progress = Callable[[int], None]


def quote_parameter(value: str) -> str:
    """Return a header parameter value as a quoted string the way browsers write it (``"`` as ``%22``).

    :param value: a field name or file name; it must not hold CR, LF or NUL.
    :raises ValueError: the value holds CR, LF or NUL, which no escaping carries safely.
    """
    if any(char in value for char in "\r\n\0"):
        raise ValueError("a multipart name may not contain line breaks or NUL characters")
    return '"' + value.replace('"', "%22") + '"'


def content_disposition(name: str, filename: str | None = None) -> bytes:
    """Return one part's ``Content-Disposition`` header line (without CRLF), UTF-8 encoded.

    :param name: the form field's name.
    :param filename: the file part's name, or None for an ordinary field.
    """
    header = f"Content-Disposition: form-data; name={quote_parameter(name)}"
    if filename is not None:
        header += f"; filename={quote_parameter(filename)}"
    return header.encode()


class SourceChangedError(ClinikoError):
    """The file's size changed between measuring it and sending it.

    Not an ``OSError``: urllib3 would take that for a broken connection and hide it.
    """


class MultipartBody:
    """A re-iterable multipart body: ``fields`` in order, then the file part last.

    :param fields: form fields, sent unchanged and in this order.
    :param opener: opens the file for binary reading (called once per iteration).
    :param size: the file's exact size in bytes; a source that yields more or fewer bytes is an error.
    :param filename: the file part's ``filename``.
    :param file_field: the file part's field name.
    :param content_type: the file part's ``Content-Type``.
    :param chunk_size: bytes read from the file at a time.
    :param progress: called with the file bytes produced so far, after each chunk.
    :param boundary: the multipart boundary (random unless given).
    :param sent: called when more is asked for after the last part, i.e. once the last part was sent.
    """

    def __init__(
        self,
        fields: Iterable[tuple[str, str]],
        opener: Opener,
        size: int,
        filename: str,
        *,
        file_field: str = "file",
        content_type: str = "application/octet-stream",
        chunk_size: int = CHUNK_SIZE,
        progress: Progress | None = None,
        boundary: str | None = None,
        sent: Callable[[], None] | None = None,
    ) -> None:
        if size < 0 or chunk_size < 1:
            raise ValueError("size must be >= 0 and chunk_size >= 1")
        self.boundary = boundary or f"----ClinikoProviderBoundary{secrets.token_hex(16)}"
        self.size = size
        self.chunk_size = chunk_size
        self._opener = opener
        self._progress = progress
        self._sent = sent
        delimiter = b"--" + self.boundary.encode("ascii") + CRLF
        head = bytearray()
        for name, value in fields:
            head += delimiter + content_disposition(name) + CRLF + CRLF + value.encode() + CRLF
        head += delimiter + content_disposition(file_field, filename) + CRLF
        head += b"Content-Type: " + content_type.encode("ascii") + CRLF + CRLF
        self._head = bytes(head)
        self._tail = CRLF + b"--" + self.boundary.encode("ascii") + b"--" + CRLF

    @property
    def content_type(self) -> str:
        """The request's ``Content-Type`` header value."""
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self._head) + self.size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        sent = 0
        with self._opener() as source:
            while True:
                chunk = source.read(self.chunk_size)
                if not chunk:
                    break
                sent += len(chunk)
                if sent > self.size:
                    raise SourceChangedError(
                        f"the file grew while it was being sent (beyond {self.size} bytes)"
                    )
                yield chunk
                if self._progress is not None:
                    self._progress(sent)
        if sent != self.size:
            raise SourceChangedError(f"the file shrank while it was being sent ({sent} of {self.size} bytes)")
        yield self._tail
        if self._sent is not None:
            self._sent()


def parse_s3_xml(body: bytes | str) -> dict[str, str]:
    """Return the text of each child of S3's XML answer (``PostResponse`` or ``Error``), by tag.

    The root's tag is under ``"_root"``. Namespaces are dropped. A body that is not XML gives ``{}``.

    :param body: the answer's body.
    """
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return {}
    parsed = {"_root": _local_name(root.tag)}
    for child in root:
        tag, text = _local_name(child.tag), child.text or ""
        # A Key is taken exactly: a file name may begin or end with spaces.
        parsed.setdefault(tag, text if tag == "Key" else text.strip())
    return parsed


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def s3_error(status: int, answer: Mapping[str, str], text: str) -> S3UploadError:
    """Build the error for a failed S3 answer: retryable for 5xx, final otherwise.

    :param status: the HTTP status.
    :param answer: the parsed XML (see :func:`parse_s3_xml`).
    :param text: the raw body, used when it is not S3's XML.
    """
    code = answer.get("Code") or f"HTTP{status}"
    message = answer.get("Message") or one_line(text)[:200] or "no message"
    if code == "EntityTooLarge":
        message += (
            " (the presign caps the size at S3's 5 GiB, or at the storage the Cliniko account has left:"
            " free space in Cliniko or upgrade the account)"
        )
    error_type = S3UploadError if status >= 500 or status == 429 else S3UploadRejectedError
    return error_type(status, code, message)


def expected_key(fields: Iterable[tuple[str, str]], filename: str) -> str:
    """Return the key S3 stores the file under: the ``key`` field with ``${filename}`` replaced.

    Used only when S3 answers success without a body (``success_action_status`` other than 201).

    :param fields: the presign fields.
    :param filename: the file part's name.
    """
    key = next((value for name, value in fields if name.lower() == "key"), "")
    return key.replace("${filename}", filename)


def join_upload_url(url: str, key: str) -> str:
    """Return presign ``url`` + S3 ``Key``, with exactly one ``/`` between them.

    :param url: the presign's ``url`` (normally ending in ``/``).
    :param key: the ``Key`` from S3's answer.
    """
    return url.rstrip("/") + "/" + key.lstrip("/")


def answered_etag(answer: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """Return the ETag of S3's answer to a POST (the XML's ``ETag``, else the header), quotes removed.

    :param answer: the parsed XML (see :func:`parse_s3_xml`); empty for a 204 answer.
    :param headers: the answer's headers.
    """
    etag = answer.get("ETag") or headers.get("ETag") or ""
    return etag.strip().removeprefix("W/").strip('"')


def etag_md5(etag: str, headers: Mapping[str, str]) -> tuple[str | None, str]:
    """Return (the MD5 an S3 ETag stands for, or None; why it stands for none).

    A single-part upload's ETag is the hex MD5 of the object, except with SSE-KMS or customer keys
    (S3 then says so in ``x-amz-server-side-encryption`` or ``...-customer-algorithm``) and for
    multipart uploads (``<hex>-<parts>``).

    :param etag: the ETag without quotes (see :func:`answered_etag`).
    :param headers: the answer's headers.
    """
    encryption = headers.get("x-amz-server-side-encryption", "").lower()
    if encryption.startswith("aws:kms") or headers.get("x-amz-server-side-encryption-customer-algorithm"):
        return None, f"the bucket encrypts with {encryption or 'a customer key'}, so its ETag is no MD5"
    if not etag:
        return None, "S3 answered no ETag"
    if not _MD5_HEX.fullmatch(etag.lower()):
        return None, f"S3's ETag {one_line(etag)[:80]!r} is not an MD5"
    return etag.lower(), ""
