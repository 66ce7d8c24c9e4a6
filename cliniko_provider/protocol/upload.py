"""The upload protocol: identity, what earlier tries reached, the look-up of earlier uploads, create-once.

The hook is the I/O layer (requests to Cliniko and S3); this module decides what to send and when, calling
the hook for every request, and the operators call it. :class:`UploadProtocol` uploads one file into a
patient's record unless an earlier try of the same upload already did (see
:mod:`cliniko_provider.utils.idempotency` for what an identity is and how candidates are screened).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import Any

from airflow.providers.common.compat.sdk import AirflowSensorTimeout

from cliniko_provider.exceptions import (
    ClinikoAttachmentGoneError,
    ClinikoConnectionError,
    ClinikoError,
    ClinikoNotFoundError,
    ClinikoServerError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.utils.idempotency import (
    UploadIdentity,
    UploadJournal,
    UploadOutcome,
    describe_with_marker,
    marker_token,
    screen_candidates,
    sha256_of,
)
from cliniko_provider.utils.retry import UNPACED_CALL, Failure, Log, final
from cliniko_provider.utils.s3_form import Progress
from cliniko_provider.utils.upload import UploadSource, format_bytes
from cliniko_provider.utils.validation import check_description, check_upload_filename, validate_id

JsonDict = dict[str, Any]
PENDING_WAIT = 300.0  # longest wait for an earlier attachment's processing before comparing its bytes
PENDING_POLL = 5.0


class UploadProtocol:
    """Upload files into patients' records exactly once, through a :class:`ClinikoHook` for all I/O.

    One instance serves one task (its threads may share it).

    :param hook: the Cliniko hook every request goes through.
    """

    def __init__(self, hook: ClinikoHook) -> None:
        self.hook = hook

    @property
    def log(self) -> Log:
        """The hook's logger: the protocol's lines read as the upload's, where they always were."""
        return self.hook.log

    @cached_property
    def journal(self) -> UploadJournal:
        """This worker's private record of what each upload identity reached (see ``UploadJournal``)."""
        return UploadJournal(self.hook.settings.api_key)

    def find_attachment_by_marker(self, patient_id: int | str, marker: str) -> JsonDict | None:
        """Return the patient's oldest non-archived attachment whose description holds ``marker``, if any.

        :param patient_id: the Cliniko patient id.
        :param marker: :attr:`~cliniko_provider.utils.idempotency.UploadIdentity.marker`.
        """
        token = marker_token(marker)
        matches = [
            record
            for record in self.hook.patient_call(
                patient_id,
                lambda pid: list(self.hook.list_attachments(f"description:~{token}", patient_id=pid)),
            )
            if marker in str(record.get("description") or "")
        ]
        return min(matches, key=lambda record: int(record.get("id") or 0), default=None)

    def find_earlier_upload(
        self, identity: UploadIdentity, source: UploadSource, *, description_marker: bool = False
    ) -> UploadOutcome | None:
        """Return the attachment an earlier attempt of this upload made, or None if none did.

        In order: the attachment this worker's journal recorded for the identity (one ``GET``); with
        ``description_marker``, the attachment whose description holds the marker; otherwise the patient's
        attachments with exactly this description created since ``identity.since`` (less 10 minutes of
        clock skew), kept only if they hold this file's name, size and bytes (SHA-256 of ``/content``).
        Candidates still processing are waited for (``PENDING_WAIT`` seconds at most); if one still is,
        this raises a retryable error rather than guess.

        :param identity: the upload's identity.
        :param source: the file (its bytes are hashed only if a candidate needs comparing).
        :param description_marker: look for the visible marker instead of the description and content.
        """
        pid = identity.patient_id
        facts = self.journal.read(identity.key)
        recorded = facts.get("attachment_id")
        if recorded:
            record = self._still_attached(identity, str(recorded), description_marker)
            if record is not None:
                return UploadOutcome(
                    record,
                    True,
                    f"this worker recorded attachment {recorded} as this upload",
                    sha256=str(facts["sha256"]) if facts.get("sha256") else None,
                )
        if description_marker:
            found = self.find_attachment_by_marker(pid, identity.marker)
            reason = (
                f"attachment {found and found.get('id')}'s description holds this upload's {identity.marker}"
            )
            return UploadOutcome(found, True, reason) if found else None
        filters = [f"description:={identity.description}"] if identity.description else []
        bound = identity.created_after()
        if bound:
            filters.append(f"created_at:>={bound}")
        records = self._patient_attachments(pid, *filters)
        ready, pending = screen_candidates(records, identity, source.size)
        deadline = self.hook.now() + PENDING_WAIT
        for record in pending:
            try:
                processed = self.hook.wait_for_processing(
                    record["id"], poll_interval=PENDING_POLL, timeout=max(0.0, deadline - self.hook.now())
                )
            except ClinikoAttachmentGoneError:
                continue
            except AirflowSensorTimeout:
                raise ClinikoError(
                    f"Attachment {record.get('id')} of patient {pid} has this description but is still being "
                    f"processed after {PENDING_WAIT:.0f} s, so whether it is this upload's earlier attempt "
                    "cannot be told yet (its bytes are readable only once processed). Not uploading, to "
                    "avoid a duplicate; the task's next retry checks again."
                ) from None
            ready += screen_candidates([processed], identity, source.size)[0]
        checked = 0
        if ready:
            ours = str(facts.get("sha256") or sha256_of(source.opener))
            for record in ready:
                checked += 1
                if self.hook.attachment_sha256(record["id"]) == ours:
                    reason = (
                        f"attachment {record.get('id')} (created {record.get('created_at')}) has this "
                        f"description, file name, size and content (SHA-256 {ours[:12]}...)"
                    )
                    return UploadOutcome(record, True, reason, sha256=ours, verification="content")
        self.log.info(
            "No earlier upload of %s for patient %s: %d attachment(s) with this description since %s, %d "
            "with this name and size, none with this file's content%s",
            identity.filename,
            pid,
            len(records),
            bound or "ever",
            checked,
            " (the file changed since: regenerated?)" if checked else "",
        )
        return None

    def _patient_attachments(self, patient_id: str, *filters: str) -> list[JsonDict]:
        """Return a patient's non-archived attachments matching the filters (unknown patient: input error)."""
        return self.hook.patient_call(
            patient_id, lambda pid: list(self.hook.list_attachments(*filters, patient_id=pid))
        )

    def _still_attached(
        self, identity: UploadIdentity, attachment_id: str, description_marker: bool
    ) -> JsonDict | None:
        """Return a recorded attachment if it still stands for the identity (not archived, same patient)."""
        try:
            record = self.hook.get_attachment(attachment_id)
        except ClinikoNotFoundError:
            return None
        patient = str(((record.get("patient") or {}).get("links") or {}).get("self") or "")
        description = str(record.get("description") or "")
        expected = (
            describe_with_marker(identity.description, identity.marker)
            if description_marker
            else identity.description
        )
        if (
            record.get("archived_at")
            or patient.rsplit("/", 1)[-1] != identity.patient_id
            or description != expected
        ):
            return None
        return record

    def upload_once(
        self,
        patient_id: int | str,
        source: UploadSource,
        *,
        filename: str | None = None,
        description: str | None = None,
        identity: UploadIdentity | None = None,
        look_first: bool = True,
        description_marker: bool = False,
        progress: Progress | None = None,
    ) -> UploadOutcome:
        """Upload one file into a patient's record (presign, S3, create) unless it is already there.

        With an ``identity`` the upload is idempotent: an earlier upload of the same identity is returned
        instead (see :meth:`find_earlier_upload`), and a create that failed with a 5xx or a broken
        connection is looked up before it is retried. The description is sent exactly as given, unless
        ``description_marker`` appends the identity's marker.

        :param patient_id: the Cliniko patient id.
        :param source: the file (see :func:`~cliniko_provider.utils.upload.resolve_source`).
        :param filename: the name Cliniko shows; default the source's name.
        :param description: the description, exactly as it should show (at most 255 characters).
        :param identity: the upload's identity, or None for no idempotency.
        :param look_first: look for an earlier upload before uploading; False on a first try, when none
            can exist (no request spent).
        :param description_marker: put the identity's visible marker in the description and find earlier
            uploads by it (for DAGs whose descriptions are not unique).
        :param progress: see :meth:`ClinikoHook.upload_file`.
        """
        pid = validate_id("patient_id", patient_id)
        name = check_upload_filename(filename or source.name)
        text = description or ""
        if identity is not None and description_marker:
            sent: str | None = describe_with_marker(text, identity.marker)
        else:
            sent = check_description(text) if text else None
        if identity is not None and look_first:
            found = self.find_earlier_upload(identity, source, description_marker=description_marker)
            if found is not None:
                self.log.info(
                    "Not uploading again: reusing attachment %s of patient %s, because %s",
                    found.record.get("id"),
                    pid,
                    found.reason,
                )
                return found
        self.log.info("Uploading %s (%s) for patient %s", name, format_bytes(source.size), pid)
        stored = self.hook.upload_to_patient(pid, source, name, progress=progress)
        if identity is not None:
            self.journal.write(identity.key, sha256=stored.sha256, patient_id=pid)
        outcome = self._create_once(pid, stored.upload_url, sent, identity, source, description_marker)
        if identity is not None:
            self.journal.write(identity.key, attachment_id=str(outcome.record.get("id")))
        return replace(outcome, sha256=stored.sha256, md5=stored.md5, verification=stored.verification)

    def upload_attachment(
        self,
        patient_id: int | str,
        source: UploadSource,
        *,
        filename: str | None = None,
        description: str | None = None,
        identity: UploadIdentity | None = None,
        look_first: bool = True,
        description_marker: bool = False,
        progress: Progress | None = None,
    ) -> JsonDict:
        """Like :meth:`upload_once`, returning only the attachment record.

        :param patient_id: the Cliniko patient id.
        :param source: the file (see :func:`~cliniko_provider.utils.upload.resolve_source`).
        :param filename: the name Cliniko shows; default the source's name.
        :param description: the description, exactly as it should show.
        :param identity: the upload's identity, or None for no idempotency.
        :param look_first: look for an earlier upload before uploading.
        :param description_marker: see :meth:`upload_once`.
        :param progress: see :meth:`ClinikoHook.upload_file`.
        """
        return self.upload_once(
            patient_id,
            source,
            filename=filename,
            description=description,
            identity=identity,
            look_first=look_first,
            description_marker=description_marker,
            progress=progress,
        ).record

    def _create_once(
        self,
        patient_id: str,
        upload_url: str,
        description: str | None,
        identity: UploadIdentity | None,
        source: UploadSource,
        description_marker: bool,
    ) -> UploadOutcome:
        """Create the record; after a 5xx or a broken connection, look it up before trying again."""

        def attempt() -> UploadOutcome | Failure:
            try:
                return UploadOutcome(
                    self.hook.create_attachment(patient_id, upload_url, description), False, "uploaded"
                )
            except (ClinikoServerError, ClinikoConnectionError) as error:
                if identity is None:
                    raise
                found = self.find_earlier_upload(identity, source, description_marker=description_marker)
                if found is not None:
                    self.log.info(
                        "The create failed (%s), but attachment %s exists", error, found.record.get("id")
                    )
                    return UploadOutcome(found.record, False, f"created; the answer was lost ({error})")
                return Failure(getattr(error, "status", None), {}, final(error), "no record was made")

        # Each attempt is already paced (its requests book their own slots).
        return self.hook.retry_runner().run("POST /patient_attachments", attempt, UNPACED_CALL)
