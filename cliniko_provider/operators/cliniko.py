"""Operators for Cliniko: upload a file into a patient's record."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from airflow.providers.common.compat.sdk import conf
from airflow.sdk import BaseOperator

try:
    from airflow.sdk.exceptions import TaskDeferralError, TaskDeferralTimeout
except ImportError:  # Airflow 3.1 and 3.2 keep them in core
    from airflow.exceptions import (  # type: ignore[attr-defined,no-redef]
        TaskDeferralError,
        TaskDeferralTimeout,
    )

from cliniko_provider.assets.cliniko import attachment_counts, record_asset_events
from cliniko_provider.exceptions import (
    ClinikoBatchError,
    ClinikoBatchFinalError,
    ClinikoDeferralError,
    ClinikoError,
    ClinikoInputError,
    ClinikoIntegrityError,
    S3IntegrityError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.links.cliniko import ClinikoAttachmentsLink
from cliniko_provider.protocol.upload import UploadProtocol
from cliniko_provider.triggers.cliniko import (
    ProcessingCompletedBatchTrigger,
    ProcessingCompletedTrigger,
    record_from_event,
)
from cliniko_provider.utils.audit import (
    AUDIT_FACTS_KEY,
    manifest_location,
    record_from,
    records_from_results,
    task_of,
    write_manifest,
)
from cliniko_provider.utils.batch import (
    MAX_CONCURRENCY,
    PROCESSED,
    SUMMARY_LINES,
    WAITING,
    BatchItem,
    Identity,
    describe,
    failed,
    failure_summary,
    parse_upload,
    processed,
)
from cliniko_provider.utils.idempotency import UploadOutcome, sha256_of, upload_identity, wire_filename
from cliniko_provider.utils.integrity import (
    check_processed_record,
    check_verify,
    content_mismatch,
    expectation,
    higher,
)
from cliniko_provider.utils.upload import resolve_source
from cliniko_provider.utils.validation import check_upload_filename, one_line, validate_id

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Context

JsonDict = dict[str, Any]
INTEGRITY_ERRORS = (S3IntegrityError, ClinikoIntegrityError)  # a verification failed (the manifest says so)
DEFERRAL_MARGIN = 60.0  # seconds Airflow's deferral timeout leaves beyond the trigger's own deadline


def deferral_timeout(timeout: float, poll_interval: float) -> timedelta:
    """Return Airflow's deferral timeout for a wait of ``timeout`` s: after the trigger's own deadline.

    :param timeout: the operator's ``timeout`` (the trigger's deadline, from the deferral).
    :param poll_interval: the operator's ``poll_interval`` (the trigger's last round may take that long).
    """
    return timedelta(seconds=timeout + poll_interval + DEFERRAL_MARGIN)


def deferral_ended(ended: BaseException, timeout: float, poll_interval: float) -> ClinikoDeferralError:
    """Return the error for a deferred wait Airflow ended: its deferral timeout, or a trigger that failed.

    :param ended: what Airflow raised on resuming the task (``TaskDeferralTimeout`` or ``TaskDeferralError``).
    :param timeout: the operator's ``timeout``.
    :param poll_interval: the operator's ``poll_interval``.
    """
    after = "a retry (or a clear) finds it, uploading nothing again, and waits anew"
    if isinstance(ended, TaskDeferralTimeout):
        seconds = deferral_timeout(timeout, poll_interval).total_seconds()
        return ClinikoDeferralError(
            f"Airflow's deferral timeout ({seconds:g} s: timeout={timeout:g} plus poll_interval plus "
            f"{DEFERRAL_MARGIN:g} s) ended the wait for Cliniko's processing before the trigger reported: "
            f"not confirmed processed. The attachment exists; {after}. Fix: make sure a triggerer runs "
            "(airflow triggerer) and keeps up with its triggers, or raise the operator's timeout."
        )
    return ClinikoDeferralError(
        f"The trigger waiting for Cliniko's processing failed in the triggerer ("
        f"{one_line(str(ended))[:300]}; its traceback is in the task log): not confirmed processed. "
        f"The attachment exists; {after}."
    )


def audit_facts(outcome: UploadOutcome) -> JsonDict:
    """What the audit manifest says of an uploaded (or reused) file: digests, verification and times.

    :param outcome: how the upload ended.
    """
    record = outcome.record
    facts: JsonDict = {
        "created_at": record.get("created_at"),
        "sha256": outcome.sha256,
        "md5": outcome.md5,
        "verification": outcome.verification,
    }
    if record.get("processing_completed") is True:
        facts["processed_at"] = record.get("processed_at")
    return facts


def verify_content(
    hook: ClinikoHook, attachment_id: str, size: int, sha256: str | None, file_path: str
) -> None:
    """Stream a processed attachment's ``/content`` and compare its SHA-256 with the source's; raise if not.

    One request through the hook's retries and rate budget, reading at most ``size`` bytes and one more.

    :param hook: the Cliniko hook.
    :param attachment_id: the attachment id.
    :param size: the size sent (and shown by the processed record).
    :param sha256: hex SHA-256 of the source, or None to hash the source now.
    :param file_path: the source, hashed when ``sha256`` is None.
    :raises ClinikoIntegrityError: the bytes differ.
    """
    expected = sha256 or sha256_of(resolve_source(file_path).opener)
    actual, count = hook.attachment_digest(attachment_id, max_bytes=size)
    if actual != expected or count != size:
        raise content_mismatch(attachment_id, expected, actual, count, size)


class _WaitingOperator(BaseOperator):
    """An upload operator whose deferred wait, when Airflow ends it, fails its files saying why."""

    timeout: float
    poll_interval: float

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """Resume after a deferral; when Airflow ended the wait instead, fail what was waiting, saying why.

        Airflow resumes a task whose deferral timeout passed (or whose trigger failed) only to raise; each
        file not confirmed processed then fails with
        :class:`~cliniko_provider.exceptions.ClinikoDeferralError` (XCom and the manifest say ``"error"``),
        and the task with it (retryable: a retry finds the attachments and waits anew).

        :param next_method: the method to resume in (``"__fail__"`` when Airflow ended the wait).
        :param next_kwargs: its keyword arguments.
        :param context: the task context.
        """
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except (TaskDeferralTimeout, TaskDeferralError) as ended:
            self._wait_ended(context, deferral_ended(ended, self.timeout, self.poll_interval), ended)

    def _wait_ended(self, context: Context, error: ClinikoDeferralError, ended: BaseException) -> NoReturn:
        raise NotImplementedError


class ClinikoAttachmentUploadOperator(_WaitingOperator):
    """Upload one file into a Cliniko patient's record and return the attachment record (XCom).

    The three steps of Cliniko's upload guide: presign, a streamed POST to S3 (constant memory, exact
    ``Content-Length``, retried on S3 5xx and broken connections, a fresh presign after a 403), and the
    attachment record. Optionally waits until Cliniko has processed the file.

    **Idempotency, without touching the description.** Each upload has an identity: the task instance
    (DAG, task, run, map index), the patient, the file name shown, the description and the file's content
    identity (size and modification time for a local file; version id or ETag, else size and time, for
    object storage). The description Cliniko shows is exactly the one given.

    A first try asks Cliniko nothing extra (no earlier try can have uploaded). A retry or a clear looks
    for its earlier upload: first in this worker's private journal (the attachment id an earlier try
    recorded, HMAC-signed with the API key; one ``GET``); else, as a retry on another machine must, it
    lists the patient's attachments with exactly this description created since the run's ``run_after``
    (less 10 minutes for clock skew) and keeps one only if it has this file name and size and its bytes
    (``/content``) hash to this file's SHA-256. Candidates still processing are waited for (up to 5
    minutes, then the try fails, retryably, rather than guess). A create that failed with a 5xx or a lost
    answer is looked up the same way before it is retried. So a crash at any point (before the upload,
    after S3, after the create, create answer lost) ends, after a retry or a clear, with exactly one
    attachment; a reuse is logged (which record, why) and XCom ``cliniko_upload`` says
    ``{"attachment_id", "reused", "reason", "identity", "sha256", "md5", "verification"}`` (``md5`` of
    the bytes sent, None for a reuse; ``verification`` the highest integrity check passed). A file
    regenerated with other bytes is uploaded anew, and the log says why the earlier ones did not match.

    **Streaming.** The file is never read into memory: the S3 form goes with an exact ``Content-Length``
    and the file in 1 MiB chunks, so a 1 GiB upload uses about as much memory as a 1 MiB one. Progress of
    a large file is logged at most every 10% or 30 s. The operator maps with ``.partial(...).expand(...)``
    and ``.expand_kwargs(...)``.

    Limits: two uploads of byte-identical files under the same name and description, to the same patient,
    in the same run (e.g. two map indexes) cannot be told apart by Cliniko's records: a retry of one whose
    create answer was lost, on another worker, may take the other's attachment. Give such uploads distinct
    descriptions, or set ``description_marker=True``: a visible ``[ref:<12 hex>]`` (19 characters with its
    space, so at most 236 for the description) is appended and earlier uploads are found by it, at the cost
    of text clinicians read. An orphan temp object stays in S3 after a crash between the upload and the
    create. Two task instances running the same identity at the same moment are not guarded against.

    **Refused at once** (no retry, nothing sent): a missing, directory or empty file (Cliniko has nothing
    to process in 0 bytes), a file over 5 GiB, a non-numeric ``patient_id``, a description over 255
    characters, a file name S3 would cut (``/`` or ``\\``), ``.`` or ``..``, or one holding control or
    invisible formatting characters (U+202E, U+2028, U+0085...; the error names the character). An
    unknown patient, a bad API key and a full storage also fail without retry, with Cliniko's message.
    Every failure, whatever raised it, leaves a one-line reason in XCom ``cliniko_error``.

    **Names** arrive exactly, spaces at either end included. A ``"`` is sent as browsers and curl send it
    in form data (``%22``), so Cliniko shows ``a%22b.pdf`` for ``a"b.pdf``.

    :param patient_id: the Cliniko patient id (templated).
    :param file_path: a local path or any ObjectStoragePath URI (``file://``, ``s3://``...) (templated).
        URIs are taken literally, as ObjectStoragePath does, except that a percent-encoded ``file://``
        URI (as ``Path.as_uri()`` writes) falls back to its decoded path.
    :param filename: the name Cliniko shows; default the file's base name (templated).
    :param description: the attachment's description (templated).
    :param cliniko_conn_id: the Cliniko connection id.
    :param wait_for_completion: wait until Cliniko has processed the file; return the processed record.
    :param deferrable: wait in the triggerer instead of a worker slot (default
        ``[operators] default_deferrable``).
    :param poll_interval: seconds between checks while waiting (default 30).
    :param timeout: seconds to wait for processing before failing (default 3600).
    :param idempotency_key: replaces the task instance in the identity (templated), e.g. ``"{{ ds }}"``
        plus a report id: the look-up then spans runs (no ``created_at`` bound).
    :param look_for_existing: ``"on_retry"`` (default) looks for an earlier upload from the second try
        on (retries and clears); ``"always"`` also on a first try, one request more (with an
        ``idempotency_key`` that spans runs).
    :param description_marker: append the identity's visible marker to the description and find earlier
        uploads by it (for DAGs whose descriptions are not unique; see the limits above).
    :param audit_path: a local directory or any ObjectStoragePath URI (templated): when the task ends,
        failed or not, it receives the task's audit manifest (one JSON Lines line for the file; see
        :mod:`cliniko_provider.utils.audit`) at ``<audit_path>/<dag_id>/<run_id>/<task_id>[-<map
        index>].jsonl``, written atomically.
    :param verify: ``"content"`` to read the processed file back from Cliniko (``/content``, at most its
        size) and compare its SHA-256 with the source's; costs one request and the file's bytes, and
        needs ``wait_for_completion=True``. ``"size"`` (or None, the default, when waiting) checks the
        processed record's size and name, at no request; S3's ETag is checked in any case (see
        :mod:`~cliniko_provider.utils.integrity`). Templated (e.g. ``"{{ params.verify }}"``), checked
        once rendered: another value fails the task without retries, naming the values allowed.
    """

    template_fields: Sequence[str] = (
        "patient_id",
        "file_path",
        "filename",
        "description",
        "idempotency_key",
        "audit_path",
        "verify",
    )
    ui_color = "#e8f4f8"
    operator_extra_links = (ClinikoAttachmentsLink(),)

    def __init__(
        self,
        *,
        patient_id: int | str,
        file_path: str | os.PathLike[str],
        filename: str | None = None,
        description: str | None = None,
        cliniko_conn_id: str = ClinikoHook.default_conn_name,
        wait_for_completion: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 30.0,
        timeout: float = 60 * 60.0,
        idempotency_key: str | None = None,
        look_for_existing: Literal["always", "on_retry"] = "on_retry",
        description_marker: bool = False,
        audit_path: str | os.PathLike[str] | None = None,
        verify: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.verify = check_verify(verify, wait_for_completion)
        self.patient_id = patient_id
        self.file_path = file_path
        self.filename = filename
        self.description = description
        self.cliniko_conn_id = cliniko_conn_id
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.idempotency_key = idempotency_key
        if look_for_existing not in ("always", "on_retry"):
            raise ValueError(f"look_for_existing must be 'always' or 'on_retry', got {look_for_existing!r}")
        self.look_for_existing = look_for_existing
        self.description_marker = description_marker
        self.audit_path = audit_path
        self._attachment_id: str | None = None  # for lineage, once known
        self._facts: JsonDict = {}  # what the manifest says of the file, gathered while uploading

    @cached_property
    def hook(self) -> ClinikoHook:
        """The Cliniko hook."""
        return ClinikoHook(self.cliniko_conn_id)

    def execute(self, context: Context) -> JsonDict:
        """Upload the file (or find its earlier upload) and optionally wait for processing."""
        self._facts = {"patient_id": str(self.patient_id), "file_path": os.fspath(self.file_path)}
        try:
            record = self._upload(context)
        except Exception as error:
            self._report_failure(context, error)
            self._audit_failure(context, error)
            raise
        self._audit(context, record)
        return record

    def _upload(self, context: Context) -> JsonDict:
        self.verify = check_verify(self.verify, self.wait_for_completion, rendered=True)
        patient_id = validate_id("patient_id", self.patient_id)
        source = resolve_source(self.file_path)
        self._facts["size"] = source.size
        name = check_upload_filename(self.filename or source.name)
        self._facts["filename"] = wire_filename(name)
        identity = upload_identity(
            context,
            patient_id,
            name,
            self.description,
            source.content,
            idempotency_key=str(self.idempotency_key) if self.idempotency_key else None,
        )
        ti = context["ti"]
        outcome = UploadProtocol(self.hook, context).upload_once(
            patient_id,
            source,
            filename=name,
            description=self.description,
            identity=identity,
            look_first=self.look_for_existing == "always" or ti.try_number > 1,
            description_marker=self.description_marker,
        )
        summary = {**outcome.summary(identity), "filename": wire_filename(name), "size": source.size}
        ti.xcom_push(key="cliniko_upload", value=summary)
        record = outcome.record
        attachment_id = self._attachment_id = str(record["id"])
        self._facts.update(audit_facts(outcome), attachment_id=attachment_id)
        if outcome.reused:
            self._facts["reused"] = outcome.reason
        self.cliniko_attachment_ids = [attachment_id]  # for the "Cliniko attachments" link
        expect = expectation(source.size, wire_filename(name))
        if record.get("processing_completed") is True:
            check_processed_record(record, expect)
            return self._attached(context, self._verified(context, record, summary), outcome.reused)
        if not self.wait_for_completion:
            return self._attached(context, record, outcome.reused)
        if self.deferrable:
            if self.audit_path:
                ti.xcom_push(key=AUDIT_FACTS_KEY, value=self._facts)
            self.defer(
                trigger=ProcessingCompletedTrigger(
                    attachment_id,
                    cliniko_conn_id=self.cliniko_conn_id,
                    poll_interval=self.poll_interval,
                    deadline=time.time() + self.timeout,
                    expect=expect,
                ),
                method_name="execute_complete",
                timeout=deferral_timeout(self.timeout, self.poll_interval),
            )
        self.log.info("Waiting for Cliniko to process attachment %s", attachment_id)
        processed = self.hook.wait_for_processing(
            attachment_id, poll_interval=self.poll_interval, timeout=self.timeout, expect=expect
        )
        return self._attached(context, self._verified(context, processed, summary), outcome.reused)

    def _verified(self, context: Context, record: JsonDict, summary: JsonDict) -> JsonDict:
        """Record that the processed record matched; compare its content if asked; return the record."""
        level = higher(summary.get("verification") or "none", "processed")
        if self.verify == "content":
            attachment_id = str(record["id"])
            self.log.info("Verifying the content of attachment %s (%s bytes)", attachment_id, record["size"])
            size, sha256 = int(record["size"]), summary.get("sha256")
            verify_content(self.hook, attachment_id, size, sha256, os.fspath(self.file_path))
            level = "content"
        self._facts["verification"] = level
        context["ti"].xcom_push(key="cliniko_upload", value={**summary, "verification": level})
        return record

    def execute_complete(self, context: Context, event: JsonDict) -> JsonDict:
        """Resume after the trigger fired: return the processed record, or raise what went wrong.

        An error that retrying cannot help (archived, not found, timeout, or an event marked not
        ``retryable`` such as a 401) fails the task without retries.

        :param context: the task context.
        :param event: the trigger's event.
        """
        self._load_facts(context)
        ti = context["ti"]
        try:
            self.verify = check_verify(self.verify, self.wait_for_completion, rendered=True)
            record = record_from_event(event)
            self._attachment_id = str(record["id"])
            summary = ti.xcom_pull(task_ids=ti.task_id, key="cliniko_upload", map_indexes=ti.map_index)
            record = self._verified(context, record, summary if isinstance(summary, dict) else {})
        except Exception as error:
            self._report_failure(context, error)
            self._audit_failure(context, error)
            raise
        self._audit(context, record)
        self.cliniko_attachment_ids = [self._attachment_id]
        reused = False
        if self.outlets:  # whether it was reused is in XCom: ask only when an asset event will say it
            ti = context["ti"]
            summary = ti.xcom_pull(task_ids=ti.task_id, key="cliniko_upload", map_indexes=ti.map_index)
            reused = isinstance(summary, dict) and bool(summary.get("reused"))
        return self._attached(context, record, reused)

    def _wait_ended(self, context: Context, error: ClinikoDeferralError, ended: BaseException) -> NoReturn:
        """Airflow ended the wait: the file fails with why, in XCom ``cliniko_error`` and the manifest."""
        self._load_facts(context)
        self._report_failure(context, error)
        self._audit_failure(context, error)
        raise error from ended

    def _load_facts(self, context: Context) -> None:
        """Take back what the manifest needs from XCom, where ``execute`` left it before deferring."""
        if self.audit_path:
            ti = context["ti"]
            facts = ti.xcom_pull(task_ids=ti.task_id, key=AUDIT_FACTS_KEY, map_indexes=ti.map_index)
            self._facts = facts if isinstance(facts, dict) else {}

    def _attached(self, context: Context, record: JsonDict, reused: bool) -> JsonDict:
        """Fill the ``cliniko://`` outlets' event extra (counts only) and return the record."""
        result = {
            "attachment_id": record.get("id"),
            "reused": reused,
            "processed_at": record.get("processed_at") if record.get("processing_completed") else None,
        }
        record_asset_events(context, self.outlets, self.cliniko_conn_id, attachment_counts([result]))
        return record

    def _audit(self, context: Context, record: JsonDict) -> None:
        """Write the task's manifest (with ``audit_path``): the file, attached."""
        if not self.audit_path:
            return
        processed = {"processed_at": record.get("processed_at")} if record.get("processing_completed") else {}
        self._write_audit(context, {**self._facts, **processed})

    def _audit_failure(self, context: Context, error: BaseException) -> None:
        """Write the task's manifest with the file's error; a manifest that cannot be written is logged."""
        if not self.audit_path:
            return
        try:
            facts = failed(self._facts, error, self.hook.redactor)
            if isinstance(error, INTEGRITY_ERRORS):
                facts["verification_outcome"] = "failed"
            self._write_audit(context, facts)
        except Exception as audit_error:  # the upload's own error is what the task fails with
            self.log.error("The audit manifest could not be written: %s", audit_error)

    def _write_audit(self, context: Context, facts: JsonDict) -> None:
        assert self.audit_path is not None
        base = task_of(context)
        where = write_manifest(
            manifest_location(self.audit_path, **base), [record_from(base, facts, index=None)]
        )
        self.log.info("Audit manifest: %s", where)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any] | None:
        """Report the source file as input and the attachment as output (with the OpenLineage provider).

        Datasets as common-io's ``FileTransferOperator`` names files; the attachment is
        ``cliniko://<API host>``, ``patients/<patient id>/attachments/<attachment id>``.

        :param task_instance: the finished task instance (unused: the operator kept what it made).
        """
        if self._attachment_id is None:
            return None
        from cliniko_provider.utils.lineage import upload_lineage

        return upload_lineage(
            os.fspath(self.file_path),
            self.hook.settings.base_url,
            validate_id("patient_id", self.patient_id),
            self._attachment_id,
        )

    def _report_failure(self, context: Context, error: Exception) -> None:
        """Leave a one-line reason in XCom ``cliniko_error`` for a summary (mapped runs fail one by one)."""
        reason = self.hook.redactor(one_line(str(error))) or type(error).__name__
        context["ti"].xcom_push(key="cliniko_error", value=reason)


class ClinikoBatchUploadOperator(_WaitingOperator):
    """Upload many files in one task, several at once, and return one compact result per file (XCom).

    Each file goes through exactly what :class:`ClinikoAttachmentUploadOperator` does for one (the same
    checks, streaming, retries and idempotency), on a small pool of threads sharing one hook, so every
    request draws from the API key's one rate budget. One bad file does not stop the others: when all are
    done (and processed, with ``wait_for_completion``), the task fails if any failed, naming each one;
    without retries when no failure can be fixed by retrying (bad input, Cliniko's 4xx answers).

    The result (XCom ``return_value``: pushed once the uploads are done, kept while the task waits, and
    pushed even when the task fails) lists, in the order given,
    ``{"index", "patient_id", "file_path", "attachment_id", "status"}`` per file; once uploaded (or
    found) also ``"filename"`` (as sent), ``"size"``, ``"sha256"``, ``"md5"`` (of the bytes sent; None
    for a reuse) and ``"verification"`` (the highest integrity check passed, see
    :mod:`~cliniko_provider.utils.integrity`); plus ``"processed_at"`` once processed, or ``"error"``
    (the reason, one line) and ``"retryable"`` for a file that failed. ``"status"`` says what each
    result is: ``"processed"`` (confirmed: Cliniko has processed it), ``"error"``, or ``"waiting"``
    (not confirmed: not waited for, or still being processed; results pushed before a deferral say
    ``"waiting"``, so a wait that is abandoned never reads as success). A failed task also leaves every
    reason in XCom ``cliniko_error``, one line per file.

    **Idempotency** is each file's own, exactly as for a single upload (``UploadProtocol.upload_once``
    with an identity from :func:`~cliniko_provider.utils.idempotency.upload_identity`): the task instance, the
    file's path as the item's discriminator (not its position), the patient, name, description and
    content identity; descriptions are sent exactly as given. A retried or cleared task finds each file's
    earlier upload (the task state store on Airflow 3.3+, else this worker's journal; then Cliniko's
    records by description and content) and uploads only the rest; a reused file's result says why
    under ``"reused"``. ``idempotency_key`` in an item replaces the task instance.

    **Waiting** for processing takes one deferral for the whole batch
    (:class:`~cliniko_provider.triggers.cliniko.ProcessingCompletedBatchTrigger`): the triggerer's poller
    asks about 100 attachments per request. Use ``.expand(uploads=...)`` over batches of about 100 for
    thousands of files: a task per batch stays far below ``max_map_length`` and shows each batch in the UI.

    **Lineage** (with ``apache-airflow-providers-openlineage``): one event per task, however many files,
    naming every file read as an input and every attachment made as an output, as the single-file
    operator names them; a file that failed before Cliniko had its attachment is left out (the failed
    task's FAIL event names what it did attach). Each file adds about 250 bytes (100 files: about 40 KB
    with Airflow's facets); above 1,000 files the event is aggregated, one input per source directory and
    one output ``attachments`` per Cliniko, so it stays under a few KB.

    :param uploads: the files (templated): a list of dicts with ``patient_id`` and ``file_path``, and
        optionally ``filename``, ``description`` and ``idempotency_key`` (as the single-file operator's
        arguments).
    :param cliniko_conn_id: the Cliniko connection id.
    :param max_concurrency: files uploaded at once in this task (1 to 10; default 4). The rate budget,
        not this, bounds the request rate.
    :param wait_for_completion: wait until Cliniko has processed every uploaded file.
    :param deferrable: wait in the triggerer instead of a worker slot (default
        ``[operators] default_deferrable``).
    :param poll_interval: seconds between checks while waiting.
    :param timeout: seconds to wait for processing before a file fails with a timeout.
    :param look_for_existing: ``"on_retry"`` (default: a first try asks nothing extra) or ``"always"``, as
        for the single-file operator.
    :param audit_path: a local directory or any ObjectStoragePath URI (templated): when the task ends,
        failed or not, it receives the task's audit manifest, one JSON Lines file with a line per file
        (see :mod:`cliniko_provider.utils.audit`), at ``<audit_path>/<dag_id>/<run_id>/<task_id>[-<map
        index>].jsonl``, written atomically.
    :param verify: ``"content"`` to read each processed file back from Cliniko and compare its SHA-256
        with the source's (one request and the file's bytes per file; needs ``wait_for_completion=True``);
        ``"size"`` or None for the checks that cost no request (templated), as for the single-file
        operator.
    """

    template_fields: Sequence[str] = ("uploads", "audit_path", "verify")
    ui_color = "#e8f4f8"
    operator_extra_links = (ClinikoAttachmentsLink(),)

    def __init__(
        self,
        *,
        uploads: Sequence[Mapping[str, Any]] | str,
        cliniko_conn_id: str = ClinikoHook.default_conn_name,
        max_concurrency: int = 4,
        wait_for_completion: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 30.0,
        timeout: float = 60 * 60.0,
        look_for_existing: Literal["always", "on_retry"] = "on_retry",
        audit_path: str | os.PathLike[str] | None = None,
        verify: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.verify = check_verify(verify, wait_for_completion)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ValueError(f"max_concurrency must be a whole number, got {max_concurrency!r}")
        if not 1 <= max_concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"max_concurrency must be from 1 to {MAX_CONCURRENCY}, got {max_concurrency}")
        if look_for_existing not in ("always", "on_retry"):
            raise ValueError(f"look_for_existing must be 'always' or 'on_retry', got {look_for_existing!r}")
        self.uploads = uploads
        self.cliniko_conn_id = cliniko_conn_id
        self.max_concurrency = max_concurrency
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.look_for_existing = look_for_existing
        self.audit_path = audit_path
        self._facts: dict[str, JsonDict] = {}  # per item index: what the manifest needs beyond the result
        self._results: list[JsonDict] = []  # for lineage, once known

    @cached_property
    def hook(self) -> ClinikoHook:
        """The Cliniko hook, shared by the upload threads."""
        return ClinikoHook(self.cliniko_conn_id)

    def execute(self, context: Context) -> list[JsonDict]:
        """Upload every file (finding earlier uploads), then wait for processing if asked to."""
        uploads = self.uploads
        try:
            self.verify = check_verify(self.verify, self.wait_for_completion, rendered=True)
            if isinstance(uploads, (str, bytes, Mapping)) or not isinstance(uploads, Sequence):
                raise ClinikoInputError(
                    f"uploads must be a list of dicts, got {type(uploads).__name__}: e.g. "
                    "[{'patient_id': '123', 'file_path': '/data/a.pdf'}]."
                )
            if not uploads:
                self.log.info("No files to upload")
                self._write_manifest(context, [])  # the night's record shows the task ran
                return []
            self.hook.prepare()  # Airflow calls once, here, before the threads share the hook
        except ClinikoError as error:
            context["ti"].xcom_push(key="cliniko_error", value=self.hook.redactor(str(error)))
            self._audit_task_failure(context, error)
            raise
        look_first = self.look_for_existing == "always" or context["ti"].try_number > 1
        results = [describe(index, upload) for index, upload in enumerate(uploads)]
        items: list[BatchItem] = []
        first_of: dict[Identity, int] = {}
        for index, upload in enumerate(uploads):
            try:
                item = parse_upload(index, upload)
                if first_of.setdefault(item.identity, index) != index:
                    raise ClinikoInputError(
                        f"uploads[{index}] repeats uploads[{first_of[item.identity]}] (same patient, file, "
                        "filename and idempotency key): give each file once."
                    )
                items.append(item)
            except ClinikoInputError as error:
                results[index] = self._failed(results[index], error)

        protocol = UploadProtocol(self.hook, context)

        def run(item: BatchItem) -> None:
            try:
                result = self._upload(context, protocol, item, look_first)
                results[item.index].update(result)
                self.log.info(
                    "Upload #%d: %s to patient %s: attachment %s%s",
                    item.index,
                    item.file_path,
                    item.patient_id,
                    result["attachment_id"],
                    f" (an earlier upload: {result['reused']})" if result.get("reused") else "",
                )
            except Exception as error:  # one bad file must not stop the others: its reason is its result
                results[item.index] = self._failed(results[item.index], error)

        self.log.info("Uploading %d file(s), %d at a time", len(items), self.max_concurrency)
        with ThreadPoolExecutor(max(1, min(self.max_concurrency, len(items))), "cliniko-upload") as pool:
            list(pool.map(run, items))
        pending = [str(r["attachment_id"]) for r in results if "error" not in r and "processed_at" not in r]
        expect = {
            str(r["attachment_id"]): expectation(r["size"], r["filename"])
            for r in results
            if str(r.get("attachment_id")) in pending
        }
        if self.wait_for_completion and pending:
            if self.deferrable:
                # The results wait in XCom (kept through a deferral, and shown in the UI meanwhile), not
                # in the deferral's kwargs, which `airflow dags test` drops when it runs the trigger.
                context["ti"].xcom_push(key="return_value", value=results)
                if self.audit_path:
                    context["ti"].xcom_push(key=AUDIT_FACTS_KEY, value=self._facts)
                self.log.info("Deferring until Cliniko has processed %d attachment(s)", len(pending))
                self.defer(
                    trigger=ProcessingCompletedBatchTrigger(
                        pending,
                        cliniko_conn_id=self.cliniko_conn_id,
                        poll_interval=self.poll_interval,
                        deadline=time.time() + self.timeout,
                        expect=expect,
                    ),
                    method_name="execute_complete",
                    timeout=deferral_timeout(self.timeout, self.poll_interval),
                )
            self.log.info("Waiting for Cliniko to process %d attachment(s)", len(pending))
            outcomes = self.hook.wait_for_processing_of_many(
                pending, poll_interval=self.poll_interval, timeout=self.timeout, expect=expect
            )
            results = self._with_outcomes(results, outcomes)
        return self._finish(context, self._verified(results))

    def execute_complete(self, context: Context, event: JsonDict) -> list[JsonDict]:
        """Resume after the batch trigger fired: merge each file's outcome into the results it left in XCom.

        :param context: the task context.
        :param event: the trigger's event, ``{"status": "done", "attachments": {id: payload}}``.
        """
        self.verify = check_verify(self.verify, self.wait_for_completion, rendered=True)
        events = event.get("attachments") if isinstance(event, dict) else None
        if not isinstance(events, dict):
            raise ClinikoError(f"Unexpected event from the Cliniko batch trigger: {str(event)[:200]}")
        results = self._results_before_deferral(context)
        outcomes: dict[str, JsonDict | Exception] = {}
        for attachment_id, payload in events.items():
            try:
                outcomes[str(attachment_id)] = record_from_event(payload)
            except Exception as error:  # that file's wait failed: its reason is its result
                outcomes[str(attachment_id)] = error
        return self._finish(context, self._verified(self._with_outcomes(results, outcomes)))

    def _wait_ended(self, context: Context, error: ClinikoDeferralError, ended: BaseException) -> NoReturn:
        """Airflow ended the wait: each file not confirmed processed fails with why (result and manifest
        line ``"error"``, so no summary counts it uploaded), and the task as for any failed file.
        """
        try:
            results = self._results_before_deferral(context)
        except ClinikoError as missing:
            context["ti"].xcom_push(key="cliniko_error", value=self.hook.redactor(str(error)))
            self._audit_task_failure(context, error)
            raise missing from ended
        waiting = {str(r["attachment_id"]): error for r in results if r.get("status") == WAITING}
        try:
            self._finish(context, self._verified(self._with_outcomes(results, waiting)))
        except ClinikoError as failure:
            raise failure from ended
        raise error from ended  # no file was left waiting: the task fails all the same, as Airflow decided

    def _results_before_deferral(self, context: Context) -> list[JsonDict]:
        """Return the results ``execute`` left in XCom before deferring (and the manifest's facts)."""
        ti = context["ti"]
        results = ti.xcom_pull(task_ids=ti.task_id, key="return_value", map_indexes=ti.map_index)
        if not isinstance(results, list):
            raise ClinikoError("The batch's results are missing from XCom 'return_value': clear the task")
        if self.audit_path:
            facts = ti.xcom_pull(task_ids=ti.task_id, key=AUDIT_FACTS_KEY, map_indexes=ti.map_index)
            self._facts = facts if isinstance(facts, dict) else {}
        return results

    def _upload(
        self, context: Context, protocol: UploadProtocol, item: BatchItem, look_first: bool
    ) -> JsonDict:
        """Upload one file (or find its earlier upload); return its part of the result."""
        source = resolve_source(item.file_path)
        facts = self._facts[str(item.index)] = {"size": source.size}
        name = check_upload_filename(item.filename or source.name)
        facts["filename"] = wire_filename(name)
        identity = upload_identity(
            context,
            item.patient_id,
            name,
            item.description,
            source.content,
            idempotency_key=item.idempotency_key or None,
            item=source.uri,  # the file, not its position: re-splitting batches uploads nothing again
        )
        outcome = protocol.upload_once(
            item.patient_id,
            source,
            filename=name,
            description=item.description,
            identity=identity,
            look_first=look_first,
        )
        facts["created_at"] = outcome.record.get(
            "created_at"
        )  # the rest of the manifest's line is the result
        result: JsonDict = {
            "attachment_id": str(outcome.record["id"]),
            "filename": wire_filename(name),
            "size": source.size,
            "sha256": outcome.sha256,
            "md5": outcome.md5,
            "verification": outcome.verification,
        }
        if outcome.reused:
            result["reused"] = outcome.reason
        if outcome.record.get("processing_completed") is True:
            check_processed_record(outcome.record, expectation(source.size, result["filename"]))
            result.update(processed({}, outcome.record.get("processed_at")))
            result["verification"] = higher(outcome.verification, "processed")
        return result

    def _verified(self, results: list[JsonDict]) -> list[JsonDict]:
        """With ``verify="content"``, compare each processed file's content with its source, a few at once."""
        if self.verify != "content":
            return results
        checked = [r for r in results if "error" not in r and "processed_at" in r]

        def verify(result: JsonDict) -> None:
            try:
                verify_content(
                    self.hook,
                    str(result["attachment_id"]),
                    int(result["size"]),
                    result.get("sha256"),
                    str(result["file_path"]),
                )
                result["verification"] = "content"
            except Exception as error:  # that file's check failed: its reason is its result
                result.update(self._failed(result, error))

        self.log.info("Verifying the content of %d processed attachment(s)", len(checked))
        self.hook.prepare()
        with ThreadPoolExecutor(max(1, min(self.max_concurrency, len(checked))), "cliniko-verify") as pool:
            list(pool.map(verify, checked))
        return results

    def _failed(self, result: JsonDict, error: BaseException) -> JsonDict:
        self.log.warning(
            "Upload #%d: %s to patient %s failed: %s",
            result["index"],
            result["file_path"],
            result["patient_id"],
            self.hook.redactor(str(error)),
        )
        if isinstance(error, INTEGRITY_ERRORS):
            self._facts.setdefault(str(result["index"]), {})["verification_outcome"] = "failed"
        return failed(result, error, self.hook.redactor)

    def _with_outcomes(
        self, results: list[JsonDict], outcomes: Mapping[str, JsonDict | Exception]
    ) -> list[JsonDict]:
        """Return the results with each waited-for file's outcome: when processed, or why it failed."""
        merged = []
        for result in results:
            outcome = outcomes.get(str(result.get("attachment_id")))
            if "error" not in result and isinstance(outcome, Exception):
                result = self._failed(result, outcome)
            elif "error" not in result and isinstance(outcome, dict):
                level = higher(result.get("verification") or "none", "processed")
                result = {**processed(result, outcome.get("processed_at")), "verification": level}
                self.log.info(
                    "Upload #%d: %s processed for patient %s (attachment %s)",
                    result["index"],
                    result["file_path"],
                    result["patient_id"],
                    result["attachment_id"],
                )
            merged.append(result)
        return merged

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any] | None:
        """Report every file read as an input and every attachment made as an output: one event per task.

        Named as for the single-file operator; a file that failed before Cliniko had its attachment is left
        out. Above :data:`~cliniko_provider.utils.lineage.MAX_FILES_NAMED` files the event names groups.

        :param task_instance: the finished task instance (unused: the operator kept its results).
        """
        if not self._results:
            return None
        from cliniko_provider.utils.lineage import batch_lineage

        return batch_lineage(self._results, self.hook.settings.base_url)

    def _write_manifest(self, context: Context, results: list[JsonDict]) -> None:
        """Write the task's manifest (with ``audit_path``): a line per result, none for an empty batch."""
        if not self.audit_path:
            return
        base = task_of(context)
        where = write_manifest(
            manifest_location(self.audit_path, **base), records_from_results(base, results, self._facts)
        )
        self.log.info("Audit manifest: %s (%d line(s))", where, len(results))

    def _audit_task_failure(self, context: Context, error: BaseException) -> None:
        """Write the manifest of a task that failed as a whole (no file to name): one line with the error.

        A manifest that cannot be written is logged: the task's own error is what it fails with.
        """
        if not self.audit_path:
            return
        try:
            base = task_of(context)
            line = record_from(base, failed({}, error, self.hook.redactor), index=None)
            where = write_manifest(manifest_location(self.audit_path, **base), [line])
            self.log.info("Audit manifest: %s (the task's error)", where)
        except Exception as audit_error:
            self.log.error("The audit manifest could not be written: %s", audit_error)

    def _finish(self, context: Context, results: list[JsonDict]) -> list[JsonDict]:
        """Write the manifest; return the results, or push them with the reasons and fail if any failed."""
        # For the "Cliniko attachments" link: the records this task made or found.
        self.cliniko_attachment_ids = [str(r["attachment_id"]) for r in results if r.get("attachment_id")]
        self._results = results
        failures = [result for result in results if "error" in result]
        self.log.info(
            "Cliniko batch: %d of %d file(s) processed, %d waiting for Cliniko's processing, %d failed",
            sum(result.get("status") == PROCESSED for result in results),
            len(results),
            sum(result.get("status") == WAITING for result in results),
            len(failures),
        )
        self._write_manifest(context, results)
        if not failures:
            record_asset_events(context, self.outlets, self.cliniko_conn_id, attachment_counts(results))
            return results
        ti = context["ti"]
        ti.xcom_push(key="return_value", value=results)
        ti.xcom_push(key="cliniko_error", value=self.hook.redactor(failure_summary(results)))
        message = failure_summary(results, limit=SUMMARY_LINES)
        if any(result["retryable"] for result in failures):
            raise ClinikoBatchError(message)
        raise ClinikoBatchFinalError(message)
