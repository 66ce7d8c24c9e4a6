"""The upload protocol: identity, what earlier tries reached, the look-up of earlier uploads, create-once.

The hook is the I/O layer (requests to Cliniko and S3); this module decides what to send and when, calling
the hook for every request, and the operators call it. :class:`UploadProtocol` uploads one file into a
patient's record unless an earlier try of the same upload already did (see
:mod:`cliniko_provider.utils.idempotency` for what an identity is and how candidates are screened).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Protocol

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
    CLOCK_SKEW,
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
from cliniko_provider.utils.validation import check_description, check_upload_filename, one_line, validate_id

JsonDict = dict[str, Any]
PENDING_WAIT = 300.0  # longest wait for an earlier attachment's processing before comparing its bytes
PENDING_POLL = 5.0


class UploadState(Protocol):
    """What each upload identity reached (``UploadJournal`` and :class:`TaskStateProgress` both are one)."""

    def read(self, identity_key: str) -> JsonDict:
        """Return the facts recorded for an identity ({} when none).

        :param identity_key: :attr:`UploadIdentity.key`.
        """

    def write(self, identity_key: str, **facts: object) -> None:
        """Record facts for an identity (merged with what it already holds).

        :param identity_key: :attr:`UploadIdentity.key`.
        :param facts: e.g. ``sha256=...``, ``create_sent_at=...``, ``attachment_id=...``.
        """


class TaskStateProgress:
    """Each upload's progress in Airflow's task state store (AIP-103, Airflow 3.3+): it survives the machine.

    One key per upload identity, holding its facts as one JSON object (the SHA-256 once streamed, when
    the create was sent, the attachment id once created). Retries of the task instance share it on any
    worker. A read that fails counts as nothing known (the look-up asks Cliniko); a write that fails
    raises (:class:`UploadProtocol` then keeps the task's progress in the worker's journal, or, if the
    store took the file's SHA-256 but not the create's mark, stops the try before the create).

    Calls to the store are serialised: a batch's threads share it, and the in-process comms of
    ``airflow dags test`` unset ``SUPERVISOR_COMMS`` while one call is sent, so a second thread's call
    failed with "cannot import name 'SUPERVISOR_COMMS'" (a worker's own comms hold a lock already).

    :param store: the context's ``task_state_store``.
    :param lock: the lock every thread of the task shares for the store.
    """

    def __init__(self, store: Any, lock: threading.Lock | None = None) -> None:
        self._store = store
        self._lock = lock or threading.Lock()

    @staticmethod
    def _key(identity_key: str) -> str:
        return f"cliniko-upload:{identity_key}"

    def read(self, identity_key: str) -> JsonDict:
        """Return the facts recorded for an identity ({} when none or unreadable).

        :param identity_key: :attr:`UploadIdentity.key`.
        """
        try:
            with self._lock:
                value = self._store.get(self._key(identity_key))
        except Exception:  # the store is a fast path: Cliniko's records remain the last resort
            return {}
        return dict(value) if isinstance(value, dict) and value.get("identity") == identity_key else {}

    def write(self, identity_key: str, **facts: object) -> None:
        """Record facts for an identity (merged with what it already holds).

        :param identity_key: :attr:`UploadIdentity.key`.
        :param facts: e.g. ``sha256=...``, ``create_sent_at=...``, ``attachment_id=...``.
        """
        merged = {**self.read(identity_key), **facts, "identity": identity_key}
        with self._lock:
            self._store.set(self._key(identity_key), merged)


class UploadProtocol:
    """Upload files into patients' records exactly once, through a :class:`ClinikoHook` for all I/O.

    One instance serves one try of one task (its threads may share it).

    :param hook: the Cliniko hook every request goes through.
    :param context: the task context: its ``task_state_store`` (Airflow 3.3+) keeps each file's progress,
        its ``ti`` tells a first try; None for neither (the worker's journal, every try a retry).
    """

    def __init__(self, hook: ClinikoHook, context: Mapping[str, Any] | None = None) -> None:
        self.hook = hook
        self._context = context or {}
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()  # one for the task: its threads may race to build `state`
        self._reading: dict[str, threading.Lock] = {}
        self._digests: dict[str, str] = {}  # attachment id -> SHA-256 of its content, this try
        self._claimed: dict[str, str] = {}  # attachment id -> the identity key it is known to be

    @cached_property
    def state(self) -> UploadState:
        """Where each upload's progress is kept: the task state store (Airflow 3.3+), else the journal."""
        store = self._context.get("task_state_store")
        if store is not None:
            return TaskStateProgress(store, self._store_lock)
        return UploadJournal(self.hook.settings.api_key)

    @property
    def durable(self) -> bool:
        """True when the state survives the machine (the task state store), so a retry anywhere sees it."""
        return isinstance(self.state, TaskStateProgress)

    @property
    def _where(self) -> str:
        return "the task state store" if self.durable else "this worker"

    @property
    def first_try(self) -> bool:
        """True on a task instance's first try (no earlier try of its uploads exists)."""
        ti = self._context.get("ti")
        return ti is not None and int(getattr(ti, "try_number", 2) or 2) <= 1

    @property
    def log(self) -> Log:
        """The hook's logger: the protocol's lines read as the upload's, where they always were."""
        return self.hook.log

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
        self,
        identity: UploadIdentity,
        source: UploadSource,
        *,
        description_marker: bool = False,
        pending_may_be_ours: bool = True,
    ) -> UploadOutcome | None:
        """Return the attachment an earlier attempt of this upload made, or None if none did.

        In order: the attachment the upload's state recorded (one ``GET``); nothing more when the task
        state store shows that no earlier try of this task instance sent the create; with
        ``description_marker``, the attachment whose description holds the marker; otherwise the patient's
        attachments with exactly this description created since the create was sent (or
        ``identity.since``), less 10 minutes of clock skew. Records another file of this task recorded as
        its own are skipped. Processed ones with this file's name and size are compared first, by the
        SHA-256 of their ``/content`` (each read at most once per try, never beyond the record's size); a
        match is reused at once. Only then, and only if ``pending_may_be_ours``, candidates still
        processing are waited for (``PENDING_WAIT`` seconds at most); if one still is, this raises a
        retryable error rather than guess.

        :param identity: the upload's identity.
        :param source: the file (its bytes are hashed only if a candidate needs comparing).
        :param description_marker: look for the visible marker instead of the description and content.
        :param pending_may_be_ours: False when no earlier try of this upload can have made a record that is
            still processing (a first try): such records are then not waited for.
        """
        pid = identity.patient_id
        facts = self.state.read(identity.key)
        recorded = facts.get("attachment_id")
        if recorded:
            record = self._still_attached(identity, str(recorded), description_marker)
            if record is not None:
                self._claim(str(recorded), identity)
                return UploadOutcome(
                    record,
                    True,
                    f"{self._where} recorded attachment {recorded} as this upload",
                    sha256=str(facts["sha256"]) if facts.get("sha256") else None,
                )
        if (
            self.durable
            and identity.since is not None
            and facts.get("sha256")
            and not facts.get("create_sent_at")
        ):
            self.log.info(
                "No earlier upload of %s for patient %s: the task state store shows that no earlier try "
                "sent the create",
                identity.filename,
                pid,
            )
            return None
        if description_marker:
            found = self.find_attachment_by_marker(pid, identity.marker)
            reason = (
                f"attachment {found and found.get('id')}'s description holds this upload's {identity.marker}"
            )
            return UploadOutcome(found, True, reason) if found else None
        filters = [f"description:={identity.description}"] if identity.description else []
        bound = created_bound(facts.get("create_sent_at")) or identity.created_after()
        if bound:
            filters.append(f"created_at:>={bound}")
        records = [
            record
            for record in self._patient_attachments(pid, *filters)
            if self._claimed.get(str(record.get("id")), identity.key) == identity.key
        ]
        ready, pending = screen_candidates(records, identity, source.size)
        ours = str(facts.get("sha256") or "") or None
        for record in ready:
            ours = ours or sha256_of(source.opener)
            same = self._same_content(record, identity, ours)
            if same is not None:
                return same
        checked = len(ready)
        if pending and not pending_may_be_ours:
            self.log.info(
                "%d attachment(s) of patient %s with this description are still processing; none can be "
                "this upload's (no earlier try of it exists), so they are not waited for",
                len(pending),
                pid,
            )
            pending = []
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
            for candidate in screen_candidates([processed], identity, source.size)[0]:
                checked += 1
                ours = ours or sha256_of(source.opener)
                same = self._same_content(candidate, identity, ours)
                if same is not None:
                    return same
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

    def _same_content(self, record: JsonDict, identity: UploadIdentity, ours: str) -> UploadOutcome | None:
        """Return the record as this upload's if its bytes hash to ``ours`` (read once a try, size-bound).

        The record passed :func:`screen_candidates`: its ``size`` is a number, the file's.
        """
        attachment_id = str(record["id"])
        with self._lock:
            lock = self._reading.setdefault(attachment_id, threading.Lock())
        with lock:
            if attachment_id not in self._digests:
                size = int(str(record["size"]))
                self._digests[attachment_id] = self.hook.attachment_sha256(attachment_id, max_bytes=size)
        if self._digests[attachment_id] != ours:
            return None
        self._claim(attachment_id, identity)
        reason = (
            f"attachment {attachment_id} (created {record.get('created_at')}) has this "
            f"description, file name, size and content (SHA-256 {ours[:12]}...)"
        )
        return UploadOutcome(record, True, reason, sha256=ours, verification="content")

    def _record(self, identity: UploadIdentity, **facts: object) -> None:
        """Record facts; a task state store that fails is left for the journal, with a warning."""
        try:
            self.state.write(identity.key, **facts)
        except Exception as error:
            if not self.durable:
                raise
            self.log.warning(
                "Airflow's task state store could not record this upload's progress (%s): this task keeps "
                "it in the worker's journal instead",
                one_line(str(error))[:200] or type(error).__name__,
            )
            with self._lock:
                self.__dict__["state"] = UploadJournal(self.hook.settings.api_key)
            self.state.write(identity.key, **facts)

    def _claim(self, attachment_id: str, identity: UploadIdentity) -> None:
        """Remember that an attachment is this identity's: no other file of this task can take it."""
        with self._lock:
            self._claimed.setdefault(attachment_id, identity.key)

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
            or patient.rpartition("/")[2] != identity.patient_id
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
            found = self.find_earlier_upload(
                identity,
                source,
                description_marker=description_marker,
                pending_may_be_ours=not self.first_try,
            )
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
            self._record(identity, sha256=stored.sha256, patient_id=pid)
            # Recorded before the create is sent, and a store that took the line above but fails this
            # one stops the try here: a later try whose state has a SHA-256 but no create_sent_at knows
            # that no record of this upload can exist.
            self.state.write(identity.key, create_sent_at=_now_iso(self.hook.now()))
        outcome = self._create_once(pid, stored.upload_url, sent, identity, source, description_marker)
        if identity is not None:
            attachment_id = str(outcome.record.get("id"))
            self._claim(attachment_id, identity)
            self._record(identity, attachment_id=attachment_id)
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


def created_bound(moment: object) -> str | None:
    """Return the ``created_at:>=`` bound for a create sent at ``moment`` (ISO, UTC) less the clock skew.

    :param moment: ``create_sent_at`` as recorded (None or unparsable: no bound).
    """
    if not isinstance(moment, str):
        return None
    try:
        sent = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except ValueError:
        return None
    if sent.tzinfo is None:
        return None
    return (sent.astimezone(timezone.utc) - CLOCK_SKEW).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_iso(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
