"""The audit manifest: one JSON Lines file per task, a line per file uploaded (or not), and its reading.

A line says which file went to which patient as which attachment, with its size and digests, when it was
created and processed, whether an earlier upload was reused (and why), how it was verified, and the error
if it failed. Never a file's contents, an API key or a presigned field.

No network I/O to Cliniko here: the operators gather the facts and write; :func:`reconcile` compares a
manifest with the records Cliniko holds now (the operator fetches them).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import ObjectStoragePath

from cliniko_provider.exceptions import ClinikoInputError

JsonDict = dict[str, Any]
AnyPath = Path | ObjectStoragePath

MANIFEST_SUFFIX = ".jsonl"
AUDIT_FACTS_KEY = "cliniko_audit_facts"  # XCom: what the manifest needs, kept through a deferral
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+=-]")


@dataclass(frozen=True)
class AuditRecord:
    """One line of a manifest: what happened to one file of one task.

    :param run_id: the DAG run.
    :param dag_id: the DAG.
    :param task_id: the task.
    :param map_index: the mapped task's index, or None when not mapped.
    :param index: the file's position in a batch's ``uploads``, or None for a single-file task.
    :param status: ``"processed"`` (Cliniko confirmed it), ``"waiting"`` (attached, not waited for or the
        wait did not end) or ``"error"``.
    :param patient_id: the Cliniko patient.
    :param source: the file's path or URI as given (any user:password in a URI left out).
    :param filename: the name Cliniko shows.
    :param size: the file's size in bytes.
    :param sha256: the SHA-256 (hex) of the bytes sent, when known.
    :param md5: the MD5 (hex) of the bytes sent, when known.
    :param attachment_id: the attachment, once created (or found).
    :param created_at: when Cliniko created the attachment record.
    :param processed_at: when Cliniko finished processing it.
    :param reused: True when an earlier upload of the same file was found and no bytes were sent.
    :param reused_reason: which evidence the earlier upload was found by.
    :param verification: the highest integrity check the file passed (``"none"``, ``"etag"``: S3's ETag is
        the MD5 sent; ``"processed"``: Cliniko's processed size matches; ``"content"``: its bytes hash to
        the SHA-256 sent; see :mod:`cliniko_provider.utils.integrity`), None when unknown.
    :param verification_outcome: ``"passed"`` (the level above was reached), ``"failed"`` (a check found
        other bytes or another size: ``error`` says which), or None when nothing was checked.
    :param error: why the file failed (one line), or None.
    :param retryable: for a failed file: whether the task's retry may fix it.
    :param recorded_at: when the line was written (UTC).
    """

    run_id: str
    dag_id: str
    task_id: str
    map_index: int | None
    index: int | None
    status: str | None
    patient_id: str | None
    source: str | None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    attachment_id: str | None = None
    created_at: str | None = None
    processed_at: str | None = None
    reused: bool = False
    reused_reason: str | None = None
    verification: str | None = None
    verification_outcome: str | None = None
    error: str | None = None
    retryable: bool | None = None
    recorded_at: str | None = None

    @property
    def failed(self) -> bool:
        """True when this file did not end attached (and processed, when waited for)."""
        return self.error is not None

    def to_json(self) -> str:
        """Return the record as one line of JSON (no newline)."""
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        """Parse one manifest line (keys a newer writer added are ignored; missing ones are None).

        :param line: one line of a manifest.
        """
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        values: dict[str, Any] = {name: data.get(name) for name in known}
        for name in ("run_id", "dag_id", "task_id"):
            if not isinstance(values[name], str):
                raise ValueError(f"{name} is missing or not a string")
        values["reused"] = bool(values["reused"])
        return cls(**values)


def redact_uri(uri: str) -> str:
    """Return a path or URI without any ``user:password@`` it holds (a manifest never holds a secret).

    :param uri: a local path or URI.
    """
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def utc_now() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat()


def as_path(location: str | os.PathLike[str]) -> AnyPath:
    """Return a local path (plain path or ``file://`` URI) as a ``Path``, anything else as ObjectStoragePath.

    :param location: a local path or any ObjectStoragePath URI.
    """
    if isinstance(location, ObjectStoragePath):
        return location if location.protocol not in ("file", "local") else Path(location.path)
    text = os.fspath(location)
    if not text.strip():
        raise ClinikoInputError(
            "audit_path is empty: give a local directory or a URI such as s3://bucket/audit"
        )
    if "://" not in text:
        return Path(text).expanduser()
    scheme = text.split("://", 1)[0]
    if scheme in ("file", "local"):
        return Path(urlsplit(text).path)
    try:
        return ObjectStoragePath(text)
    except (ValueError, ImportError) as error:
        raise ClinikoInputError(
            f"audit_path {text!r} cannot be used: {error}. Install the Airflow provider for that storage "
            "(e.g. apache-airflow-providers-amazon for s3://) or use a local directory."
        ) from None


def path_segment(text: str) -> str:
    """Return text as one safe path segment (any ``/``, space or unusual character becomes ``_``).

    :param text: a DAG, run or task id.
    """
    safe = _UNSAFE.sub("_", text)
    return "_" if safe in ("", ".", "..") else safe


def run_directory(audit_path: str | os.PathLike[str], dag_id: str, run_id: str) -> AnyPath:
    """Return where a run's task manifests go: ``<audit_path>/<dag_id>/<run_id>/``.

    :param audit_path: the audit location (local directory or ObjectStoragePath URI).
    :param dag_id: the DAG.
    :param run_id: the DAG run.
    """
    return as_path(audit_path) / path_segment(dag_id) / path_segment(run_id)


def manifest_location(
    audit_path: str | os.PathLike[str], dag_id: str, run_id: str, task_id: str, map_index: int | None
) -> AnyPath:
    """Return a task's manifest: ``<audit_path>/<dag_id>/<run_id>/<task_id>[-<map_index>].jsonl``.

    :param audit_path: the audit location (local directory or ObjectStoragePath URI).
    :param dag_id: the DAG.
    :param run_id: the DAG run.
    :param task_id: the task.
    :param map_index: the mapped task's index, or None (or -1) when not mapped.
    """
    name = path_segment(task_id)
    if map_index is not None and map_index >= 0:
        name += f"-{map_index}"
    return run_directory(audit_path, dag_id, run_id) / f"{name}{MANIFEST_SUFFIX}"


def night_location(audit_path: str | os.PathLike[str], dag_id: str, run_id: str) -> AnyPath:
    """Return where a run's merged manifest goes: ``<audit_path>/<dag_id>/<run_id>.jsonl``.

    :param audit_path: the audit location.
    :param dag_id: the DAG.
    :param run_id: the DAG run.
    """
    return as_path(audit_path) / path_segment(dag_id) / f"{path_segment(run_id)}{MANIFEST_SUFFIX}"


def task_of(context: Mapping[str, Any]) -> JsonDict:
    """Return the task instance's ``dag_id``, ``run_id``, ``task_id`` and ``map_index`` (None if not mapped).

    :param context: the task context.
    """
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return {
        "dag_id": str(ti.dag_id),
        "run_id": str(ti.run_id),
        "task_id": str(ti.task_id),
        "map_index": map_index if isinstance(map_index, int) and map_index >= 0 else None,
    }


def serialise(records: Iterable[AuditRecord]) -> bytes:
    """Return records as JSON Lines (UTF-8, one record a line, each line ending in a newline).

    :param records: the records.
    """
    return "".join(f"{record.to_json()}\n" for record in records).encode("utf-8")


def write_manifest(target: AnyPath | str, records: Iterable[AuditRecord]) -> str:
    """Write a manifest atomically: readers see the whole file or none; return where it went.

    Locally the lines go to a hidden temporary file in the same directory, flushed to disk, then renamed
    over the target (an interrupted write leaves no manifest, only perhaps a ``.*.tmp`` file). On object
    storage, where a rename is a copy, the bytes are written to the final key in one write: an object
    store shows an object only once its write completes.

    :param target: the manifest's path (see :func:`manifest_location`).
    :param records: its lines.
    """
    path = as_path(target) if isinstance(target, str) else target
    if isinstance(path, ObjectStoragePath) and path.protocol in ("file", "local"):
        path = Path(path.path)
    data = serialise(records)
    if isinstance(path, ObjectStoragePath):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return str(path)


def read_manifest(location: AnyPath | str) -> list[AuditRecord]:
    """Read a manifest; a malformed line is a clear error naming the file and line.

    :param location: the manifest's path or URI.
    """
    path = as_path(location) if isinstance(location, str) else location
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ClinikoInputError(
            f"No audit manifest at {location}: check the path (and the run id)."
        ) from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(AuditRecord.from_json(line))
        except (ValueError, TypeError) as error:
            raise ClinikoInputError(
                f"Audit manifest {location}, line {number}, is not a manifest line: {error}"
            ) from None
    return records


def task_manifests(directory: AnyPath | str) -> list[AnyPath]:
    """Return the task manifests in a run's directory, sorted by name (temporary files left out).

    :param directory: a run's directory (see :func:`run_directory`).
    """
    path = as_path(directory) if isinstance(directory, str) else directory
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if p.name.endswith(MANIFEST_SUFFIX) and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.name)


def merge_manifests(
    audit_path: str | os.PathLike[str], dag_id: str, run_id: str
) -> tuple[str, list[AuditRecord]]:
    """Merge a run's task manifests into one (the night's), written atomically; return where and its lines.

    Lines are ordered by task, map index and position in the batch.

    :param audit_path: the audit location the tasks wrote to.
    :param dag_id: the DAG.
    :param run_id: the DAG run.
    """
    records = [
        record
        for path in task_manifests(run_directory(audit_path, dag_id, run_id))
        for record in read_manifest(path)
    ]
    records.sort(key=lambda r: (r.task_id, -1 if r.map_index is None else r.map_index, r.index or 0))
    return write_manifest(night_location(audit_path, dag_id, run_id), records), records


def records_from_results(
    base: Mapping[str, Any], results: Iterable[Mapping[str, Any]], facts: Mapping[str, Mapping[str, Any]]
) -> Iterator[AuditRecord]:
    """Build a batch's manifest lines from its results and what was learned while uploading.

    :param base: ``run_id``, ``dag_id``, ``task_id`` and ``map_index`` of the task.
    :param results: the batch's results (``index``, ``patient_id``, ``file_path``, ``attachment_id``...).
    :param facts: per item index (as a string, as XCom keeps it): ``filename``, ``size``, ``sha256``,
        ``created_at``... as gathered while uploading.
    """
    now = utc_now()
    for result in results:
        index = result.get("index")
        known = facts.get(str(index), {})
        yield record_from(base, {**known, **result}, index=index, recorded_at=now)


def record_from(
    base: Mapping[str, Any], facts: Mapping[str, Any], *, index: int | None, recorded_at: str | None = None
) -> AuditRecord:
    """Build one manifest line from a task's identity and one file's facts.

    :param base: ``run_id``, ``dag_id``, ``task_id`` and ``map_index`` of the task.
    :param facts: the file's facts: ``patient_id``, ``file_path``, ``filename``, ``size``, ``sha256``,
        ``md5``, ``attachment_id``, ``created_at``, ``processed_at``, ``reused``, ``error``...
    :param index: the file's position in a batch, or None.
    :param recorded_at: when the line is written (default now).
    """
    reused = facts.get("reused")
    level = _text(facts.get("verification"))
    outcome = _text(facts.get("verification_outcome"))
    if outcome is None and level not in (None, "none"):
        outcome = "passed"
    source = facts.get("file_path")
    size = facts.get("size")
    error = _text(facts.get("error"))
    status = "error" if error else _text(facts.get("status"))
    if status is None:
        status = "processed" if facts.get("processed_at") else "waiting"
    return AuditRecord(
        run_id=str(base["run_id"]),
        dag_id=str(base["dag_id"]),
        task_id=str(base["task_id"]),
        map_index=base.get("map_index"),
        index=index,
        status=status,
        patient_id=_text(facts.get("patient_id")),
        source=None if source is None else redact_uri(str(source)),
        filename=_text(facts.get("filename")),
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        sha256=_text(facts.get("sha256")),
        md5=_text(facts.get("md5")),
        attachment_id=_text(facts.get("attachment_id")),
        created_at=_text(facts.get("created_at")),
        processed_at=_text(facts.get("processed_at")),
        reused=bool(reused),
        reused_reason=reused if isinstance(reused, str) else _text(facts.get("reused_reason")),
        verification=level,
        verification_outcome=outcome,
        error=error,
        retryable=facts.get("retryable") if "error" in facts else None,
        recorded_at=recorded_at or utc_now(),
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)


# --- Reconcile: a manifest against what Cliniko holds now ----------------------------------------------

CONFIRMED = "confirmed"
PROCESSING = "processing"
PROBLEMS = ("missing", "archived", "patient_changed", "size_changed", "content_changed")


@dataclass(frozen=True)
class Finding:
    """What Cliniko holds now for one attachment of a manifest.

    :param attachment_id: the attachment.
    :param patient_id: the patient the manifest says it went to.
    :param filename: the name the manifest says it has.
    :param status: ``"confirmed"``; ``"processing"`` (not processed yet: size unknown); or a problem:
        ``"missing"`` (deleted), ``"archived"``, ``"patient_changed"``, ``"size_changed"``,
        ``"content_changed"``.
    :param detail: one line saying what was found.
    """

    attachment_id: str
    patient_id: str | None
    filename: str | None
    status: str
    detail: str

    @property
    def problem(self) -> bool:
        """True when the attachment is no longer what the manifest says went to the patient."""
        return self.status in PROBLEMS


def attached(records: Iterable[AuditRecord]) -> list[AuditRecord]:
    """Return the manifest lines with an attachment to check (failed files left out), each attachment once.

    :param records: a manifest's lines.
    """
    seen: dict[str, AuditRecord] = {}
    for line in records:
        if line.attachment_id and not line.failed:
            seen.setdefault(line.attachment_id, line)
    return list(seen.values())


def compare(line: AuditRecord, record: Mapping[str, Any] | None) -> Finding:
    """Compare one manifest line with the attachment record Cliniko returns now (None: not returned).

    :param line: the manifest line.
    :param record: the record, archived ones included, or None when Cliniko no longer has it.
    """

    def finding(status: str, detail: str) -> Finding:
        return Finding(str(line.attachment_id), line.patient_id, line.filename, status, detail)

    if record is None:
        return finding("missing", "not in Cliniko any more (deleted)")
    if record.get("archived_at"):
        return finding("archived", f"archived at {record.get('archived_at')}")
    patient_link = str(((record.get("patient") or {}).get("links") or {}).get("self") or "")
    patient = patient_link.rsplit("/", 1)[-1] if patient_link else None
    if patient and line.patient_id and patient != line.patient_id:
        return finding("patient_changed", f"now in patient {patient}'s record")
    if record.get("processing_completed") is not True:
        return finding(PROCESSING, "still being processed by Cliniko: its size is not known yet")
    size = record.get("size")
    if line.size is not None and size != line.size:
        return finding("size_changed", f"Cliniko holds {size} bytes; {line.size} were sent")
    return finding(CONFIRMED, "present, not archived, same size")


def content_changed(finding: Finding, line: AuditRecord, sha256_now: str) -> Finding:
    """Return the finding after comparing the attachment's bytes (SHA-256 of ``/content``) with the manifest.

    :param finding: the finding so far (confirmed).
    :param line: the manifest line (its ``sha256``).
    :param sha256_now: the SHA-256 of what Cliniko serves now.
    """
    if line.sha256 is None or sha256_now == line.sha256:
        detail = (
            f"{finding.detail}, same content" if line.sha256 else f"{finding.detail} (no SHA-256 to compare)"
        )
        return Finding(finding.attachment_id, finding.patient_id, finding.filename, finding.status, detail)
    return Finding(
        finding.attachment_id,
        finding.patient_id,
        finding.filename,
        "content_changed",
        f"its bytes hash to SHA-256 {sha256_now[:16]}..., {line.sha256[:16]}... was sent",
    )


def reconcile_summary(source: str, findings: list[Finding], skipped: int, limit: int | None = None) -> str:
    """Return a reconciliation's summary: counts per status, then one line per attachment not confirmed.

    :param source: the manifest checked.
    :param findings: one per attachment.
    :param skipped: manifest lines with no attachment to check (failed uploads).
    :param limit: name at most this many attachments (then say how many more), or None for all.
    """
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.status] = counts.get(finding.status, 0) + 1
    order = (CONFIRMED, PROCESSING, *PROBLEMS)
    parts = [f"{counts[status]} {status.replace('_', ' ')}" for status in order if counts.get(status)]
    lines = [
        f"Reconciled {len(findings)} attachment(s) of {source} with Cliniko: {', '.join(parts) or 'none'}"
        + (f" ({skipped} line(s) had no attachment: failed uploads)" if skipped else "")
    ]
    named = [finding for finding in findings if finding.status != CONFIRMED]
    for finding in named[:limit]:
        lines.append(
            f"  attachment {finding.attachment_id} (patient {finding.patient_id}, {finding.filename}): "
            f"{finding.status.replace('_', ' ')}: {finding.detail}"
        )
    if limit is not None and len(named) > limit:
        lines.append(f"  ... and {len(named) - limit} more (every one is in the task's XCom)")
    return "\n".join(lines)
