"""Integrity: is what S3 and Cliniko hold byte for byte what was sent? Checks, no network I/O here.

Three levels, each costing what it says (the hook and the operators run them):

- ``"etag"`` (always, no request): the file's MD5 and SHA-256 are computed while it streams to S3; a
  single-part POST's ETag is the MD5 of the object S3 stored, so they must be equal. When the ETag is
  no MD5 (SSE-KMS buckets, multipart), the upload goes on unchecked at this level.
- ``"processed"`` (whenever the operators wait for processing, no request: the wait fetches the
  record anyway): Cliniko's processed record must show the size and file name that were sent.
- ``"content"`` (``verify="content"``: one request and the file's bytes): the SHA-256 of Cliniko's
  ``/content`` must be the source's.

An upload's :attr:`verification` is the highest level it passed (``"none"`` when none ran).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cliniko_provider.exceptions import ClinikoInputError, ClinikoIntegrityError, S3IntegrityError
from cliniko_provider.utils.upload import format_bytes

JsonDict = dict[str, Any]
Verification = Literal["none", "etag", "processed", "content"]
LEVELS: tuple[Verification, ...] = ("none", "etag", "processed", "content")
VERIFY_CHOICES = (None, "", "size", "content")  # "" (a template rendered empty) is None


@dataclass(frozen=True)
class S3Upload:
    """A file S3 stored: where, what was sent, and whether S3's ETag proved S3 holds those bytes.

    :param key: S3's ``Key``.
    :param size: bytes sent.
    :param sha256: hex SHA-256 of the bytes sent.
    :param md5: hex MD5 of the bytes sent.
    :param etag: S3's ETag, without quotes ("" when none).
    :param etag_verified: True when the ETag is an MD5 and equals ``md5``.
    :param upload_url: the presign ``url`` + ``key`` (what the attachment record is made from).
    """

    key: str
    size: int
    sha256: str
    md5: str
    etag: str
    etag_verified: bool
    upload_url: str = ""

    @property
    def verification(self) -> Verification:
        """``"etag"`` when S3's ETag proved the stored bytes, else ``"none"``."""
        return "etag" if self.etag_verified else "none"


def s3_mismatch(filename: str, size: int, md5: str, etag: str) -> S3IntegrityError:
    """Return the error for an object S3 holds with other bytes than were sent, twice.

    :param filename: the file's name as sent.
    :param size: bytes sent.
    :param md5: hex MD5 of the bytes sent.
    :param etag: S3's ETag (the MD5 of what it holds).
    """
    return S3IntegrityError(
        f"S3 holds other bytes than were sent for {filename!r}, twice (the second time with a fresh "
        f"presign): sent {size} bytes with MD5 {md5}, S3's ETag (the MD5 of what it stored) is {etag}. "
        "No attachment was created. Something between this worker and S3 alters uploads (a proxy or "
        "a faulty network device?); the task's retries send the file again."
    )


def expectation(size: int, filename: str) -> JsonDict:
    """Return what a processed record must show for a file sent: plain values, safe in trigger kwargs.

    :param size: bytes sent.
    :param filename: the file name as it travelled (see ``wire_filename``).
    """
    return {"size": int(size), "filename": str(filename)}


def check_processed_record(record: Mapping[str, Any], expect: Mapping[str, Any] | None) -> None:
    """Check a processed attachment record against what was sent; raise naming both if they differ.

    :param record: the processed record (untrusted).
    :param expect: :func:`expectation` of the file sent, or None to check nothing.
    :raises ClinikoIntegrityError: the size or the file name differs.
    """
    if not expect:
        return
    attachment_id = record.get("id")
    size = record.get("size")
    if "size" in expect and _as_int(size) != int(expect["size"]):
        shown = "no size" if size is None else f"{size!s:.40} bytes"
        raise ClinikoIntegrityError(
            f"Cliniko processed attachment {attachment_id} as {shown}, but {expect['size']} bytes "
            f"({format_bytes(int(expect['size']))}) were sent: the file Cliniko holds is not the one "
            f"uploaded. Check attachment {attachment_id} in Cliniko (archive it), then clear the task "
            "to upload again."
        )
    filename = record.get("filename")
    if "filename" in expect and filename != expect["filename"]:
        raise ClinikoIntegrityError(
            f"Cliniko processed attachment {attachment_id} under the file name {str(filename)[:300]!r}, "
            f"but it was sent as {expect['filename']!r}. Check attachment {attachment_id} in Cliniko "
            "(archive it), then clear the task to upload again."
        )


def content_mismatch(
    attachment_id: str, expected: str, actual: str, count: int, size: int
) -> ClinikoIntegrityError:
    """Return the error for processed bytes that are not the source's.

    :param attachment_id: the attachment id.
    :param expected: hex SHA-256 of the source.
    :param actual: hex SHA-256 of what ``/content`` gave (its first ``size`` bytes at most).
    :param count: bytes counted from ``/content`` (``size + 1`` when it held more).
    :param size: bytes sent.
    """
    read = f"more than {size} bytes" if count > size else f"{count} bytes"
    return ClinikoIntegrityError(
        f"The content of Cliniko attachment {attachment_id} ({read} read) has SHA-256 {actual}, but the "
        f"file sent ({size} bytes) has SHA-256 {expected}: Cliniko holds other bytes. Check attachment "
        f"{attachment_id} in Cliniko (archive it), then clear the task to upload again."
    )


def is_template(value: object) -> bool:
    """True when ``value`` is a Jinja template (``{{ ... }}``, ``{% ... %}``), rendered before ``execute``.

    :param value: an operator argument as given.
    """
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def check_verify(verify: object, wait_for_completion: bool, *, rendered: bool = False) -> str | None:
    """Check an operator's ``verify`` argument; return it (None for ``""``).

    Before rendering (in ``__init__``) a template is returned as is, to be checked once rendered.

    :param verify: None (default), ``"size"`` or ``"content"``; ``""`` counts as None.
    :param wait_for_completion: whether the operator waits for processing (both checks need it).
    :param rendered: True once Airflow has rendered the templates (in ``execute``): then a bad value raises
        :class:`~cliniko_provider.exceptions.ClinikoInputError` (fails the task without retries), not
        ``ValueError`` (fails the DAG's parsing).
    :raises ValueError: a bad value given directly.
    """
    if not rendered and is_template(verify):
        return str(verify)
    error = ClinikoInputError if rendered else ValueError
    if verify not in VERIFY_CHOICES:
        raise error(
            f"verify must be None, 'size' or 'content', got {verify!r}"
            + (" (as rendered)" if rendered else "")
            + ". 'size' checks the processed record's size and file name, at no request; 'content' also "
            "reads each processed file back from Cliniko (one request and the file's bytes) and compares "
            "its SHA-256 with the source's. Set verify (or the DAG param its template reads) to one of them."
        )
    if verify and not wait_for_completion:
        raise error(
            f"verify={verify!r} checks what Cliniko holds once it has processed the file: set "
            "wait_for_completion=True too."
        )
    return str(verify) if verify else None


def higher(level: str, other: Verification) -> Verification:
    """Return the higher of two verification levels (an unknown ``level`` counts as ``"none"``).

    :param level: a level, e.g. as an earlier step left it in XCom.
    :param other: another level.
    """
    known: Verification = next((item for item in LEVELS if item == level), "none")
    return max(known, other, key=LEVELS.index)


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(str(value))
    except ValueError:
        return None
