"""What makes an upload the upload it is, and how a retry recognises its own earlier upload.

No network I/O here (:mod:`cliniko_provider.protocol.upload` asks Cliniko through the hook); this module
decides.

**Identity.** :class:`UploadIdentity` is the task instance (DAG, task, run, map index; or the user's
``idempotency_key`` instead), a per-item discriminator (a batch's item; empty for one upload), the patient,
the file name Cliniko will show, the description and the file's content identity (size and modification
time for local files; the object store's version id or ETag where it has one, else its size and time).
Its :attr:`~UploadIdentity.key` names the upload in the worker's journal and in the opt-in marker.

**Recognition without a marker.** Cliniko stores nothing of the identity, so a retry asks for the
patient's attachments with exactly this description created since the earliest moment an earlier try
could have run (:attr:`~UploadIdentity.since`), then keeps only those whose bytes are this file's:
processed records must show the same file name and size, and their content (``/content``) must hash to
the file's SHA-256 (:func:`screen_candidates`). Records still being processed are waited for. A first
try asks nothing: no earlier try exists.

**The journal.** :class:`UploadJournal` keeps, on the worker's disk, what each identity reached (the
file's SHA-256 once streamed, the attachment id once created), signed with an HMAC keyed by the API key.
A retry on the same machine reuses a recorded attachment after one ``GET`` instead of reading content
back; on another machine it falls back to the query above.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, cast

from cliniko_provider.exceptions import ClinikoInputError
from cliniko_provider.utils.private_state import FIX, PrivateDir
from cliniko_provider.utils.s3_form import CHUNK_SIZE, Opener
from cliniko_provider.utils.validation import DESCRIPTION_LIMIT

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]
JOURNAL_ENTRY_LIMIT = 64 * 1024  # bytes: an entry holds a few ids and hashes
CLOCK_SKEW = timedelta(minutes=10)  # between the worker's clock and Cliniko's created_at
MARKER_HEX = 12


@dataclass(frozen=True)
class UploadIdentity:
    """The identity of one upload (see the module docstring).

    :param task: the task instance (``dag/task/run/map index``) or the user's idempotency key.
    :param item: a discriminator of the item within the task (empty for a one-file task).
    :param patient_id: the Cliniko patient id.
    :param filename: the file name Cliniko will show.
    :param description: the description exactly as given ("" for none).
    :param content: the file's content identity (:func:`content_identity`).
    :param since: the earliest time an earlier attempt of this upload can have been created (None: any).
    """

    task: str
    item: str
    patient_id: str
    filename: str
    description: str
    content: str
    since: datetime | None = None

    @property
    def key(self) -> str:
        """The identity's SHA-256 (hex): equal for a retry of the same upload, different otherwise."""
        parts = (self.task, self.item, self.patient_id, self.filename, self.description, self.content)
        return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()

    @property
    def marker(self) -> str:
        """The visible marker of the opt-in ``description_marker`` mode: ``[ref:<12 hex>]``."""
        return f"[ref:{self.key[:MARKER_HEX]}]"

    def created_after(self) -> str | None:
        """The ``created_at:>=`` bound of the look-up (``since`` less the clock skew), or None."""
        if self.since is None:
            return None
        bound = self.since.astimezone(timezone.utc) - CLOCK_SKEW
        return bound.strftime("%Y-%m-%dT%H:%M:%SZ")


def task_identity(
    context: Mapping[str, Any], idempotency_key: str | None = None
) -> tuple[str, datetime | None]:
    """Return (task part of the identity, earliest time of an earlier attempt) for a task context.

    The earliest time is the run's ``run_after`` (or its start, if earlier): no try of this run ran before
    it, retries and clears included. With an ``idempotency_key`` the identity spans runs: no bound.

    :param context: the task context.
    :param idempotency_key: the user's key, replacing the task instance.
    """
    if idempotency_key:
        return f"key:{idempotency_key}", None
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    task = "/".join(
        str(part) for part in (ti.dag_id, ti.task_id, ti.run_id, -1 if map_index is None else map_index)
    )
    dag_run = context.get("dag_run")
    moments = [
        moment
        for moment in (getattr(dag_run, "run_after", None), getattr(dag_run, "start_date", None))
        if isinstance(moment, datetime)
    ]
    return task, min(moments, default=None)


def content_identity(size: int, info: Mapping[str, Any] | None = None, mtime_ns: int | None = None) -> str:
    """Return a file's content identity: its size plus what its storage says changes with the content.

    :param size: the size in bytes.
    :param info: an fsspec ``info()`` answer for object storage (version id, ETag, time...).
    :param mtime_ns: a local file's modification time in nanoseconds.
    """
    parts = [f"size={size}"]
    if mtime_ns is not None:
        parts.append(f"mtime_ns={mtime_ns}")
    for name in ("VersionId", "version_id", "ETag", "etag", "md5", "generation", "LastModified", "mtime"):
        value = (info or {}).get(name)
        if value not in (None, ""):
            parts.append(f"{name}={value}")
    return ";".join(parts)


class DigestingOpener:
    """Wraps an opener so the bytes read through it are hashed (SHA-256 and MD5) on the way, at no extra read.

    Both hashes release the GIL on large buffers, so threads uploading at once hash in parallel.

    :param opener: opens the file for binary reading.
    :param size: the file's size; the digests are set only after exactly that many bytes were read.
    """

    def __init__(self, opener: Opener, size: int) -> None:
        self._opener = opener
        self.size = size
        self.sha256: str | None = None
        self.md5: str | None = None

    def __call__(self) -> IO[bytes]:
        self.sha256 = self.md5 = None
        return cast(IO[bytes], _DigestingReader(self._opener(), self))

    def _finish(self, sha256: hashlib._Hash, md5: hashlib._Hash, count: int) -> None:
        if count == self.size:
            self.sha256, self.md5 = sha256.hexdigest(), md5.hexdigest()


class _DigestingReader:
    """A read-only file object that feeds what it reads to SHA-256 and MD5 (what MultipartBody needs)."""

    def __init__(self, raw: IO[bytes], owner: DigestingOpener) -> None:
        self._raw = raw
        self._owner = owner
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._count = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._sha256.update(chunk)
        self._md5.update(chunk)
        self._count += len(chunk)
        if not chunk:
            self._owner._finish(self._sha256, self._md5, self._count)
        return chunk

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _DigestingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_of(opener: Opener) -> str:
    """Return the SHA-256 (hex) of a file, read in chunks.

    :param opener: opens the file for binary reading.
    """
    digest = hashlib.sha256()
    with opener() as source:
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def wire_filename(filename: str) -> str:
    """Return the file name as it travels in form data and as S3 and Cliniko then store it.

    Browsers (WHATWG HTML) and curl 7.81+ write ``"`` as ``%22`` in a form's ``filename``; S3 takes the
    name as it arrives, so ``a"b.pdf`` is shown as ``a%22b.pdf``.

    :param filename: the name given.
    """
    return filename.replace('"', "%22")


def screen_candidates(
    records: Iterable[JsonDict], identity: UploadIdentity, size: int
) -> tuple[list[JsonDict], list[JsonDict]]:
    """Split the records a look-up found into (processed ones that may hold this file, ones still processing).

    Kept: not archived, of this patient, with exactly this description; processed ones also with this
    file name (as stored) and size. Oldest first.

    :param records: attachment records (untrusted).
    :param identity: the upload's identity.
    :param size: the file's size in bytes.
    """
    ready: list[JsonDict] = []
    pending: list[JsonDict] = []
    for record in records:
        if not isinstance(record, dict) or record.get("archived_at"):
            continue
        if str(record.get("description") or "") != identity.description:
            continue
        patient = str(((record.get("patient") or {}).get("links") or {}).get("self") or "")
        if patient and patient.rpartition("/")[2] != identity.patient_id:
            continue
        if record.get("processing_completed") is not True:
            pending.append(record)
        elif record.get("filename") == wire_filename(identity.filename) and _int(record.get("size")) == size:
            ready.append(record)
    return _oldest_first(ready), _oldest_first(pending)


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _oldest_first(records: list[JsonDict]) -> list[JsonDict]:
    return sorted(records, key=lambda record: _int(record.get("id")) or 0)


class UploadJournal:
    """What each upload identity reached, kept privately on this worker's disk (a fast path only).

    One small JSON file per identity in the ``uploads`` directory of the private state directory
    (``$CLINIKO_STATE_DIR``, see :mod:`~cliniko_provider.utils.private_state`), each written at once
    (a new file renamed over the old) and signed with an HMAC keyed by ``secret`` (the API key): an
    entry that was altered, or written for another key, is ignored. The journal only saves requests:
    when it cannot be used it logs one warning and every read finds nothing, every write is dropped.

    :param secret: the HMAC key material (the connection's API key).
    :param directory: where entries live (default ``uploads`` in the state directory).
    """

    def __init__(self, secret: str, directory: Path | None = None) -> None:
        self._key = hashlib.sha256(b"cliniko-upload-journal\0" + secret.encode("utf-8")).digest()
        self._dir = PrivateDir("Cliniko upload journal", "uploads", directory)
        self._warned = False

    @property
    def directory(self) -> Path:
        """The directory holding the entries."""
        return self._dir.path

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode("utf-8"), hashlib.sha256).hexdigest()

    def read(self, identity_key: str) -> JsonDict:
        """Return the facts recorded for an identity ({} when none, or when the entry fails its check).

        :param identity_key: :attr:`UploadIdentity.key`.
        """
        try:
            raw = self._dir.read(f"{identity_key}.json", JOURNAL_ENTRY_LIMIT)
        except (OSError, ValueError) as error:
            self._warn(error)
            return {}
        if raw is None:
            return {}
        try:
            if len(raw) > JOURNAL_ENTRY_LIMIT:
                raise ValueError("too long")
            entry = json.loads(raw)
            payload, signature = entry["payload"], entry["hmac"]
            if not isinstance(payload, str) or not hmac.compare_digest(str(signature), self._sign(payload)):
                return {}
            facts = json.loads(payload)
        except (ValueError, KeyError, TypeError):
            self._warn("an entry is damaged; it is ignored and rewritten by the next try")
            return {}
        return facts if isinstance(facts, dict) and facts.get("identity") == identity_key else {}

    def write(self, identity_key: str, **facts: object) -> None:
        """Record facts for an identity (merged with what it already holds).

        :param identity_key: :attr:`UploadIdentity.key`.
        :param facts: e.g. ``sha256=...``, ``attachment_id=...``.
        """
        merged = {**self.read(identity_key), **facts, "identity": identity_key}
        payload = json.dumps(merged, sort_keys=True)
        entry = json.dumps({"payload": payload, "hmac": self._sign(payload)}).encode("utf-8")
        try:
            self._dir.write(f"{identity_key}.json", entry)
        except (OSError, ValueError) as error:
            self._warn(error)

    def _warn(self, problem: object) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "Cliniko upload journal: cannot use %s (%s); a retry on this worker asks Cliniko instead. "
                "Fix: %s.",
                self.directory,
                problem,
                FIX,
            )


def marker_token(marker: str) -> str:
    """Return the hex part of a marker: what the description filter searches for.

    :param marker: :attr:`UploadIdentity.marker`.
    """
    return marker.removeprefix("[ref:").removesuffix("]")


def describe_with_marker(description: str, marker: str) -> str:
    """Return the description of the opt-in marker mode: the user's text, a space, the marker.

    :param description: the user's description, exactly as given (may be empty).
    :param marker: :attr:`UploadIdentity.marker`.
    """
    full = f"{description} {marker}" if description else marker
    if len(full) > DESCRIPTION_LIMIT:
        room = DESCRIPTION_LIMIT - len(marker) - 1
        raise ClinikoInputError(
            f"description is {len(description)} characters long; Cliniko takes at most {DESCRIPTION_LIMIT}, "
            f"and description_marker=True adds {len(marker) + 1} characters (' {marker}'), which leaves "
            f"{room}. Shorten the description to {room} characters or fewer."
        )
    return full


@dataclass(frozen=True)
class UploadOutcome:
    """What an idempotent upload ended with.

    :param record: the attachment record.
    :param reused: True when an earlier upload of the same identity was returned instead of uploading.
    :param reason: why it was reused (which evidence), or how it was made.
    :param sha256: hex SHA-256 of the file (computed while it streamed; for a reuse, as recorded or
        compared), None when unknown.
    :param md5: hex MD5 of the bytes sent (None for a reuse: nothing was sent).
    :param verification: the highest integrity check passed so far (see
        :mod:`cliniko_provider.utils.integrity`): ``"none"``, ``"etag"``, ``"processed"``, ``"content"``.
    """

    record: JsonDict
    reused: bool
    reason: str
    sha256: str | None = None
    md5: str | None = None
    verification: str = "none"

    def summary(self, identity: UploadIdentity | None) -> JsonDict:
        """Return the plain summary the operator leaves in XCom ``cliniko_upload``.

        :param identity: the upload's identity (None when the upload was not idempotent).
        """
        return {
            "attachment_id": str(self.record.get("id")),
            "reused": self.reused,
            "reason": self.reason,
            "identity": identity.key if identity else None,
            "sha256": self.sha256,
            "md5": self.md5,
            "verification": self.verification,
        }


def upload_identity(
    context: Mapping[str, Any],
    patient_id: str,
    filename: str,
    description: str | None,
    content: str,
    *,
    idempotency_key: str | None = None,
    item: str = "",
) -> UploadIdentity:
    """Return the identity of one upload made by a task (one per file for a task uploading many).

    :param context: the task context (task instance and run).
    :param patient_id: the validated patient id.
    :param filename: the checked file name Cliniko will show.
    :param description: the description exactly as given.
    :param content: the file's content identity (``UploadSource.content``).
    :param idempotency_key: the user's key, replacing the task instance (spans runs).
    :param item: the item's discriminator within the task (e.g. its index in a batch).
    """
    task, since = task_identity(context, idempotency_key)
    return UploadIdentity(task, item, patient_id, filename, description or "", content, since)
