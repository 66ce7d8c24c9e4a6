"""Many uploads in one task: what one item of a batch is, its compact result, and the batch's summary.

No network I/O here: the hook uploads, the operator (``ClinikoBatchUploadOperator``) runs the items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow.providers.common.compat.sdk import AirflowFailException, AirflowSensorTimeout

from cliniko_provider.exceptions import ClinikoInputError
from cliniko_provider.utils.errors import redact
from cliniko_provider.utils.validation import one_line, validate_id

JsonDict = dict[str, Any]
Identity = tuple[str, str, str | None, str | None]

UPLOAD_FIELDS = ("patient_id", "file_path", "filename", "description", "idempotency_key")
MAX_CONCURRENCY = 10  # requests' connection pool keeps 10 connections per host
SUMMARY_LINES = 5  # failures named in the exception's message; XCom ``cliniko_error`` names them all
# What an item's result says it is: only "processed" is confirmed in Cliniko. "waiting": not (yet) known
# processed (not uploaded yet, or uploaded and Cliniko still processing it, or a wait that was abandoned).
WAITING, PROCESSED, ERROR = "waiting", "processed", "error"


@dataclass(frozen=True)
class BatchItem:
    """One upload of a batch, its arguments checked.

    :param index: its position in the batch (0-based).
    :param patient_id: the validated patient id.
    :param file_path: a local path or ObjectStoragePath URI.
    :param filename: the name Cliniko shows, or None for the file's base name.
    :param description: the attachment's description, or None.
    :param idempotency_key: overrides the item's default idempotency key, or None.
    """

    index: int
    patient_id: str
    file_path: str
    filename: str | None = None
    description: str | None = None
    idempotency_key: str | None = None

    @property
    def identity(self) -> Identity:
        """What makes two items the same upload (the patient, the file, its name and key)."""
        return (self.patient_id, self.file_path, self.filename, self.idempotency_key)


def parse_upload(index: int, upload: object) -> BatchItem:
    """Check one entry of ``uploads``; return it as a :class:`BatchItem` or raise a clear error.

    :param index: its position in the batch.
    :param upload: a mapping with ``patient_id`` and ``file_path``, and optionally ``filename``,
        ``description`` and ``idempotency_key``.
    """
    if not isinstance(upload, Mapping):
        raise ClinikoInputError(
            f"uploads[{index}] is a {type(upload).__name__}; each upload is a dict such as "
            "{'patient_id': '123', 'file_path': '/data/a.pdf'}."
        )
    unknown = sorted(str(name) for name in upload if name not in UPLOAD_FIELDS)
    if unknown:
        raise ClinikoInputError(
            f"uploads[{index}] has unknown key(s) {', '.join(unknown)}; an upload takes "
            f"{', '.join(UPLOAD_FIELDS)}. Check the spelling or drop the extra keys."
        )
    missing = [name for name in ("patient_id", "file_path") if upload.get(name) in (None, "")]
    if missing:
        raise ClinikoInputError(f"uploads[{index}] has no {' or '.join(missing)}: every upload needs both.")
    optional = {name: upload.get(name) for name in ("filename", "description", "idempotency_key")}
    return BatchItem(
        index=index,
        patient_id=validate_id("patient_id", upload["patient_id"]),
        file_path=str(upload["file_path"]),
        **{name: None if value is None else str(value) for name, value in optional.items()},
    )


def describe(index: int, upload: object) -> JsonDict:
    """Return the start of an item's result: the patient and file as given, ``"waiting"`` (for the summary).

    :param index: the item's position in the batch.
    :param upload: the item as given.
    """
    fields = upload if isinstance(upload, Mapping) else {}
    return {
        "index": index,
        "patient_id": None if fields.get("patient_id") is None else str(fields["patient_id"]),
        "file_path": None if fields.get("file_path") is None else str(fields["file_path"]),
        "attachment_id": None,
        "status": WAITING,
    }


def is_final(error: BaseException) -> bool:
    """True when retrying the task cannot fix this failure (bad input, 4xx answers, a gone attachment).

    :param error: what failed one item.
    """
    return isinstance(error, (AirflowFailException, AirflowSensorTimeout))


def failed(result: JsonDict, error: BaseException, redactor: Callable[[str], str] = redact) -> JsonDict:
    """Return an item's result marked failed with the reason (one line) and whether a retry may help.

    :param result: the item's result so far.
    :param error: what failed it.
    :param redactor: blanks secrets out of the reason (the hook's, which knows the connection's).
    """
    reason = redactor(one_line(str(error))) or type(error).__name__
    return {**result, "status": ERROR, "error": reason, "retryable": not is_final(error)}


def processed(result: JsonDict, processed_at: object) -> JsonDict:
    """Return an item's result marked processed by Cliniko (confirmed), at ``processed_at``.

    :param result: the item's result so far.
    :param processed_at: the record's ``processed_at``.
    """
    return {**result, "status": PROCESSED, "processed_at": processed_at}


def failure_summary(results: Iterable[JsonDict], limit: int | None = None) -> str:
    """Return the failures of a batch, one line each: ``"2 of 100 uploads failed:\\n  #3 ...: reason"``.

    :param results: every item's result.
    :param limit: name at most this many failures (then say how many more), or None for all.
    """
    results = list(results)
    failures = [result for result in results if result.get("error")]
    lines = [f"{len(failures)} of {len(results)} upload(s) failed:"]
    for result in failures[:limit]:
        lines.append(
            f"  #{result['index']} patient {result['patient_id']} {result['file_path']}: {result['error']}"
        )
    if limit is not None and len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more (every reason is in XCom 'cliniko_error')")
    return "\n".join(lines)
