"""Operators for Cliniko: upload a file into a patient's record."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import conf
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger, record_from_event
from cliniko_provider.utils.upload import UploadSource, idempotency_marker, resolve_source
from cliniko_provider.utils.validation import validate_id

if TYPE_CHECKING:
    from airflow.sdk import Context

JsonDict = dict[str, Any]


class ClinikoAttachmentUploadOperator(BaseOperator):
    """Upload one file into a Cliniko patient's record and return the attachment record (XCom).

    The three steps of Cliniko's upload guide: presign, a streamed POST to S3 (constant memory, exact
    ``Content-Length``, retried on S3 5xx and broken connections, a fresh presign after a 403), and the
    attachment record. Optionally waits until Cliniko has processed the file.

    **Idempotency.** Every upload has an idempotency key; its hash goes into the description as a
    marker, ``"<description> [ref:<12 hex>]"``: 19 characters with the space, counted in Cliniko's 255,
    so a description may have at most 236. Before uploading, the operator looks for a non-archived
    attachment of the patient whose description holds the marker and returns it instead of uploading
    again; after a create that failed with a 5xx or a broken connection it looks again before retrying.
    So a retry of the task after a crash at any point (before or after the upload, after the record was
    made) never makes a second attachment. A crash between the upload and the create leaves an orphan
    temp object in S3 and nothing in Cliniko. Two task instances running the same key at the same
    moment are not guarded against (Airflow does not run one task instance twice at once).

    The default key is the DAG id, task id and run id with the patient id, file name and file size: a
    retry or a clear of the same run finds its earlier upload, while the next run (tomorrow's report of
    the same name) uploads anew. Pass ``idempotency_key`` to choose otherwise, e.g. ``"{{ ds }}"`` plus
    a report id to attach each report once whatever the run. Archiving the attachment in Cliniko lets
    the same key upload again.

    **Refused at once** (no retry, nothing sent): a missing, directory or empty file (Cliniko has nothing
    to process in 0 bytes), a file over 5 GiB, a non-numeric ``patient_id``, a description too long with
    the marker, a file name S3 would cut (``/`` or ``\\``). An unknown patient, a bad API key and a full
    storage also fail without retry, with Cliniko's message.

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
    :param poll_interval: seconds between checks while waiting.
    :param timeout: seconds to wait for processing before failing.
    :param idempotency_key: overrides the default idempotency key (templated).
    :param look_for_existing: ``"always"`` (default) looks for an earlier upload before every upload;
        ``"on_retry"`` only from the second try on, saving one API request per file when the DAG has
        already checked what is attached (as the nightly example does, in bulk, for its run date).
    """

    template_fields: Sequence[str] = (
        "patient_id",
        "file_path",
        "filename",
        "description",
        "idempotency_key",
    )
    ui_color = "#e8f4f8"

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
        look_for_existing: Literal["always", "on_retry"] = "always",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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

    @cached_property
    def hook(self) -> ClinikoHook:
        """The Cliniko hook."""
        return ClinikoHook(self.cliniko_conn_id)

    def execute(self, context: Context) -> JsonDict:
        """Upload the file (or find the earlier upload) and optionally wait for processing."""
        patient_id = validate_id("patient_id", self.patient_id)
        source = resolve_source(self.file_path)
        key = self.idempotency_key or self.default_idempotency_key(context, patient_id, source)
        try:
            record = self.hook.upload_attachment(
                patient_id,
                source,
                filename=self.filename or None,
                description=self.description,
                marker=idempotency_marker(str(key)),
                look_first=self.look_for_existing == "always" or context["ti"].try_number > 1,
            )
        except AirflowException as error:
            self._report_failure(context, error)
            raise
        attachment_id = str(record["id"])
        if not self.wait_for_completion or record.get("processing_completed") is True:
            return record
        if self.deferrable:
            self.defer(
                trigger=ProcessingCompletedTrigger(
                    attachment_id,
                    cliniko_conn_id=self.cliniko_conn_id,
                    poll_interval=self.poll_interval,
                    deadline=time.time() + self.timeout,
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=self.timeout + self.poll_interval + 60),
            )
        self.log.info("Waiting for Cliniko to process attachment %s", attachment_id)
        return self.hook.wait_for_processing(
            attachment_id, poll_interval=self.poll_interval, timeout=self.timeout
        )

    def execute_complete(self, context: Context, event: JsonDict) -> JsonDict:
        """Resume after the trigger fired: return the processed record, or raise what went wrong.

        An error that retrying cannot help (archived, not found, timeout, or an event marked not
        ``retryable`` such as a 401) fails the task without retries.

        :param context: the task context.
        :param event: the trigger's event.
        """
        try:
            return record_from_event(event)
        except AirflowException as error:
            self._report_failure(context, error)
            raise

    @staticmethod
    def _report_failure(context: Context, error: AirflowException) -> None:
        """Leave the reason in XCom ``cliniko_error`` for a summary task (mapped runs fail one by one)."""
        context["ti"].xcom_push(key="cliniko_error", value=str(error))

    def default_idempotency_key(self, context: Context, patient_id: str, source: UploadSource) -> str:
        """Return the default idempotency key: this run of this task, the patient, the file name and size.

        :param context: the task context.
        :param patient_id: the validated patient id.
        :param source: the file.
        """
        ti = context["ti"]
        name = self.filename or source.name
        return "\x1f".join((ti.dag_id, ti.task_id, str(ti.run_id), patient_id, name, str(source.size)))
