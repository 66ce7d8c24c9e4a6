"""Upload helpers: the file to send (local or object storage) and progress.
No network I/O here: the hook sends (``ClinikoHook.upload_file``)."""

from __future__ import annotations

import mimetypes
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from airflow.sdk import ObjectStoragePath

from cliniko_provider.exceptions import ClinikoInputError
from cliniko_provider.utils.idempotency import content_identity
from cliniko_provider.utils.s3_form import Opener

MAX_UPLOAD_BYTES = 5 * 1024**3  # S3's limit for one POST
PROGRESS_MIN_BYTES = 16 * 1024 * 1024  # smaller files log one line when done, no progress lines


@dataclass(frozen=True)
class UploadSource:
    """One file to upload: where it is (for messages), its name and size, and how to open it.

    :param uri: the path or URI, as given.
    :param name: the file's base name.
    :param size: its size in bytes.
    :param opener: opens it for binary reading.
    :param content: its content identity (see :func:`~cliniko_provider.utils.idempotency.content_identity`).
    """

    uri: str
    name: str
    size: int
    opener: Opener
    content: str = ""


def resolve_source(file_path: str | os.PathLike[str]) -> UploadSource:
    """Check a local path or ObjectStoragePath URI and describe the file; raise a clear error if unusable.

    Refused, before anything is sent: a missing file, a directory, an empty file (Cliniko has nothing to
    process in it) and a file over S3's 5 GiB limit for one upload.

    :param file_path: a local path, or a URI such as ``file:///data/a.pdf`` or ``s3://bucket/a.pdf``.
    """
    text = os.fspath(file_path)  # exactly as given: a name may begin or end with spaces
    if not text.strip():
        raise ClinikoInputError("file_path is empty: give the path or URI of the file to upload.")
    path: Path | ObjectStoragePath
    if "://" in text and not text.split("://", 1)[0]:
        raise ClinikoInputError(
            f"file_path {text!r} is not a valid URI: nothing names the storage before '://'. Give a local "
            "path or a URI with its scheme, such as file:///data/a.pdf or s3://bucket/a.pdf."
        )
    if "://" in text:
        try:
            path = ObjectStoragePath(text)
            exists, is_dir = path.exists(), path.is_dir()
            if not exists and path.protocol in ("file", "local") and unquote(text) != text:
                # RFC 8089 file URIs are percent-encoded (Path.as_uri() writes 'a%20b.pdf'), but
                # ObjectStoragePath takes them literally: fall back to the decoded name.
                path = ObjectStoragePath(unquote(text))
                exists, is_dir = path.exists(), path.is_dir()
        except (ValueError, ImportError) as error:
            raise ClinikoInputError(
                f"file_path {text!r} cannot be read: {error}. Install the Airflow provider for that "
                "storage (e.g. apache-airflow-providers-amazon for s3://) or use a local path."
            ) from None
    else:
        path = Path(text).expanduser()
        exists, is_dir = path.exists(), path.is_dir()
    if not exists:
        raise ClinikoInputError(
            f"file_path {text!r}: no such file. Check the path (and that the step writing it ran first); "
            f"a relative path is taken from the worker's working directory {os.getcwd()!r}."
        )
    if is_dir:
        raise ClinikoInputError(
            f"file_path {text!r} is a directory: give one file (use .expand(file_path=[...]) for many)."
        )
    status = path.stat()
    # Not isinstance(path, Path): with universal-pathlib 0.2 (Airflow 3.1) ObjectStoragePath is a Path.
    if not isinstance(path, ObjectStoragePath) and not stat.S_ISREG(status.st_mode):
        raise ClinikoInputError(
            f"file_path {text!r} is not a regular file (a FIFO, socket or device has no size to upload "
            "from): write the report to a regular file and give its path."
        )
    size = int(status.st_size)
    if size == 0:
        raise ClinikoInputError(
            f"file_path {text!r} is empty (0 bytes): Cliniko has nothing to process in an empty file, so it "
            "is not uploaded. Check the step that wrote it."
        )
    if size > MAX_UPLOAD_BYTES:
        raise ClinikoInputError(
            f"file_path {text!r} is {size} bytes ({format_bytes(size)}); S3 takes at most 5 GiB "
            f"({MAX_UPLOAD_BYTES} bytes) in one upload. Split or compress the file."
        )
    try:
        _open_binary(path).close()
    except OSError as error:
        raise ClinikoInputError(
            f"file_path {text!r} cannot be opened for reading ({type(error).__name__}: "
            f"{error.strerror or error}). Give the worker's user read access to it (e.g. chmod a+r) or "
            "check the storage's credentials."
        ) from None
    if isinstance(path, ObjectStoragePath):
        content = content_identity(size, _storage_info(path))
    else:
        content = content_identity(size, mtime_ns=os.stat(path).st_mtime_ns)
    return UploadSource(
        uri=text, name=path.name, size=size, opener=partial(_open_binary, path), content=content
    )


def _storage_info(path: ObjectStoragePath) -> dict[str, object]:
    """What object storage says of a file (version id, ETag, times); {} if it says nothing."""
    try:
        info = path.fs.info(path.path)
    except (OSError, ValueError, AttributeError, NotImplementedError):
        return {}
    return dict(info) if isinstance(info, dict) else {}


def _open_binary(path: Path | ObjectStoragePath) -> IO[bytes]:
    opened: IO[bytes] = path.open("rb")
    return opened


def guess_content_type(filename: str) -> str:
    """Return the file part's ``Content-Type``, guessed from the name as ``curl -F`` does.

    :param filename: the file name.
    """
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def format_bytes(count: float) -> str:
    """Return a byte count for people: ``12.0 MiB``.

    :param count: bytes.
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover - the loop always returns


class UploadProgress:
    """Logs upload progress of a large file: a line per 10% or per 30 s, whichever comes first.

    :param total: the file's size in bytes; below ``PROGRESS_MIN_BYTES`` nothing is logged.
    :param emit: a logging method such as ``log.info``.
    :param clock: the current time in seconds.
    :param step: the fraction of the file between lines.
    :param interval: the longest time between lines, in seconds.
    """

    def __init__(
        self,
        total: int,
        emit: Callable[..., None],
        clock: Callable[[], float] = time.monotonic,
        *,
        step: float = 0.1,
        interval: float = 30.0,
    ) -> None:
        self.total = total
        self._emit = emit
        self._clock = clock
        self._step = max(1, int(total * step))
        self._interval = interval
        self._start = self._last_time = clock()
        self._next = self._step
        self.enabled = total >= PROGRESS_MIN_BYTES

    def __call__(self, sent: int) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if sent < self._next and now - self._last_time < self._interval:
            return
        self._last_time = now
        self._next = (sent // self._step + 1) * self._step
        rate = sent / max(now - self._start, 1e-6)
        self._emit(
            "Upload progress: %s of %s (%d%%) at %s/s",
            format_bytes(sent),
            format_bytes(self.total),
            sent * 100 // self.total,
            format_bytes(rate),
        )
