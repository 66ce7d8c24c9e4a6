"""Triggers for Cliniko: wait in the triggerer until attachments are processed.

The trigger's event schema lives here too:

- ``{"status": "success", "attachment_id": id, "attachment": record}``;
- ``{"status": "error", "attachment_id": id, "reason": reason, "message": text, "retryable": bool}``,
  where ``reason`` is ``"archived"``, ``"not_found"``, ``"timeout"``, ``"api_error"`` or ``"mismatch"``
  (the processed record does not show the size or file name sent), and
  ``retryable`` says whether the task's own retries could help (False for a 401, a 403 or any other
  answer that a retry would only repeat).

:func:`record_from_event` turns an event back into the processed record or the matching error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from airflow.providers.common.compat.sdk import AirflowSensorTimeout
from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from cliniko_provider.exceptions import (
    ClinikoAttachmentGoneError,
    ClinikoError,
    ClinikoInputError,
    ClinikoIntegrityError,
    ClinikoPermanentError,
)
from cliniko_provider.utils.integrity import check_processed_record
from cliniko_provider.utils.validation import validate_id

JsonDict = dict[str, Any]

REASON_ARCHIVED = "archived"
REASON_NOT_FOUND = "not_found"
REASON_TIMEOUT = "timeout"
REASON_API_ERROR = "api_error"
REASON_MISMATCH = "mismatch"
GONE_REASONS = frozenset({REASON_ARCHIVED, REASON_NOT_FOUND})


def success_event(attachment_id: str, record: JsonDict) -> JsonDict:
    """Return the payload of a trigger event for a processed attachment.

    :param attachment_id: the attachment id.
    :param record: the processed record.
    """
    return {"status": "success", "attachment_id": attachment_id, "attachment": record}


def error_event(attachment_id: str, reason: str, message: str, *, retryable: bool = False) -> JsonDict:
    """Return the payload of a trigger event for a wait that failed.

    :param attachment_id: the attachment id.
    :param reason: ``archived``, ``not_found``, ``timeout``, ``api_error`` or ``mismatch``.
    :param message: a clear message for the user (never a secret).
    :param retryable: whether the task's own retries could help.
    """
    return {
        "status": "error",
        "attachment_id": attachment_id,
        "reason": reason,
        "message": message,
        "retryable": retryable,
    }


COMPACT_FIELDS = ("id", "processing_completed", "processed_at", "filename", "size")


def compact_event(event: JsonDict) -> JsonDict:
    """Return an event with its record cut down to :data:`COMPACT_FIELDS` (a batch event stays small).

    :param event: the payload of a ``ProcessingCompletedTrigger`` event.
    """
    record = event.get("attachment")
    if not isinstance(record, dict):
        return event
    return {**event, "attachment": {name: record.get(name) for name in COMPACT_FIELDS}}


def record_from_event(event: JsonDict) -> JsonDict:
    """Turn a trigger event into the processed record, or raise the error it stands for.

    :param event: the payload of a ``ProcessingCompletedTrigger`` event.
    :raises ClinikoAttachmentGoneError: ``archived`` or ``not_found`` (fails without retry).
    :raises AirflowSensorTimeout: ``timeout`` (fails without retry).
    :raises ClinikoIntegrityError: ``mismatch`` (fails without retry).
    :raises ClinikoPermanentError: ``api_error`` that retrying cannot fix (fails without retry).
    :raises ClinikoError: ``api_error`` that the task's retries may fix (also an event without
        ``retryable``, from a trigger deferred before it existed), or a malformed event.
    """
    if not isinstance(event, dict):
        raise ClinikoError(f"Unexpected event from the Cliniko trigger: {type(event).__name__}")
    attachment_id = str(event.get("attachment_id"))
    status = event.get("status")
    if status == "success" and isinstance(event.get("attachment"), dict):
        record: JsonDict = event["attachment"]
        return record
    message = str(event.get("message") or "")
    reason = event.get("reason")
    if status == "error" and reason in GONE_REASONS:
        raise ClinikoAttachmentGoneError(attachment_id, str(reason), message=message)
    if status == "error" and reason == REASON_MISMATCH:
        raise ClinikoIntegrityError(message or f"Cliniko attachment {attachment_id} is not the file sent")
    if status == "error" and reason == REASON_TIMEOUT:
        raise AirflowSensorTimeout(message or f"Timed out waiting for Cliniko attachment {attachment_id}")
    if status == "error":
        text = message or f"Waiting for Cliniko attachment {attachment_id} failed ({reason})"
        if event.get("retryable") is False:
            raise ClinikoPermanentError(text)
        raise ClinikoError(text)
    raise ClinikoError(
        f"Unexpected event from the Cliniko trigger for attachment {attachment_id}: status {status!r}"
    )


class ProcessingCompletedTrigger(BaseTrigger):
    """Fire once when Cliniko has processed an attachment, or when waiting for it fails.

    Every trigger of a connection in one triggerer shares one poller, which asks Cliniko about up to
    100 attachments per request (see :mod:`cliniko_provider.triggers.poller`), so a thousand waiting
    attachments cost about ten requests per poll interval. The events are described in this module's
    docstring; :func:`record_from_event` turns one back into the record or the matching error.

    :param attachment_id: the attachment to wait for.
    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param poll_interval: seconds between checks of this attachment (at least 0.1).
    :param deadline: UNIX timestamp after which the trigger fires a ``timeout`` event; None waits forever.
    :param end_task: on success, end the task in the triggerer (the record pushed as its return value,
        then ``TaskSuccessEvent``) instead of resuming it on a worker; errors still resume it, so the task
        raises the precise error and its retries apply. For tasks started in the triggerer (Airflow 3.3+).
    :param expect: what the processed record must show, ``{"size": bytes, "filename": name}`` as sent
        (plain values; see :func:`~cliniko_provider.utils.integrity.expectation`): otherwise the event
        is a ``mismatch`` error naming both. None checks nothing.
    """

    def __init__(
        self,
        attachment_id: str,
        cliniko_conn_id: str = "cliniko_default",
        poll_interval: float = 30.0,
        deadline: float | None = None,
        end_task: bool = False,
        expect: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.attachment_id = str(attachment_id)
        self.cliniko_conn_id = cliniko_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.end_task = bool(end_task)
        self.expect = None if expect is None else dict(expect)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the keyword arguments that re-create this trigger (no secrets)."""
        return (
            "cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger",
            {
                "attachment_id": self.attachment_id,
                "cliniko_conn_id": self.cliniko_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "end_task": self.end_task,
                # only when set: a trigger without one serialises as before it existed
                **({"expect": self.expect} if self.expect is not None else {}),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Wait through the connection's shared poller and yield exactly one event; never raise."""
        # The poller builds events with this module's functions, so it is imported here, not on top.
        from cliniko_provider.triggers.poller import REGISTRY

        try:
            normalised = validate_id("attachment_id", self.attachment_id)
        except ClinikoInputError as error:
            yield _event(error_event(self.attachment_id, REASON_NOT_FOUND, str(error)))
            return
        try:
            poller = REGISTRY.get(self.cliniko_conn_id)
            payload = await poller.wait(normalised, self.poll_interval, self.deadline)
        except Exception as error:  # the event carries the failure; the task decides what it means
            self.log.exception("Waiting for Cliniko attachment %s failed", self.attachment_id)
            payload = error_event(
                self.attachment_id,
                REASON_API_ERROR,
                f"Waiting for Cliniko attachment {self.attachment_id} failed: {type(error).__name__}",
                retryable=True,
            )
        payload["attachment_id"] = self.attachment_id
        if payload.get("status") == "success":
            payload = self._checked(payload)
        self.log.info(
            "Cliniko attachment %s: %s %s",
            self.attachment_id,
            payload["status"],
            payload.get("reason", ""),
        )
        if self.end_task and await self._pushed_as_return_value(payload):
            yield TaskSuccessEvent()  # type: ignore[no-untyped-call]
            return
        yield _event(payload)

    async def _pushed_as_return_value(self, payload: JsonDict) -> bool:
        """Push a success's record as the task's return value from the triggerer; True when done.

        Through the XCom backend, as the task itself would push it, rather than
        ``TaskSuccessEvent(xcoms=...)``: Airflow 3.3 stores those as JSON text, so a downstream task
        would pull a string instead of the record. Only a task that started in the triggerer has a
        runtime task instance here; anything else resumes the task on a worker, which returns the record.
        """
        record = payload.get("attachment")
        ti = self.task_instance
        if payload["status"] != "success" or not isinstance(record, dict):
            return False
        if ti is None or not hasattr(ti, "axcom_push"):
            return False
        try:
            from airflow.sdk.execution_time.xcom import XCom

            await XCom.aset(
                key="return_value",
                value=record,
                dag_id=ti.dag_id,
                task_id=ti.task_id,
                run_id=ti.run_id,
                map_index=ti.map_index,
            )
        except Exception:
            self.log.warning(
                "Could not push attachment %s's record, resuming on a worker",
                self.attachment_id,
                exc_info=True,
            )
            return False
        return True

    def _checked(self, payload: JsonDict) -> JsonDict:
        """The success payload, or a ``mismatch`` error when the record is not what ``expect`` says."""
        try:
            check_processed_record(payload.get("attachment") or {}, self.expect)
        except ClinikoIntegrityError as error:
            return error_event(self.attachment_id, REASON_MISMATCH, str(error))
        return payload


class ProcessingCompletedBatchTrigger(BaseTrigger):
    """Fire once when every one of many attachments is processed or has failed: one deferral for a batch.

    Each id waits through the connection's shared poller exactly as a :class:`ProcessingCompletedTrigger`
    does, so a batch of 100 costs about one request per poll round. The event is ``{"status": "done",
    "attachments": {id: event}}``, each one a single trigger's event with the record cut down by
    :func:`compact_event`.

    :param attachment_ids: the attachments to wait for.
    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param poll_interval: seconds between checks of each attachment (at least 0.1).
    :param deadline: UNIX timestamp after which the ids still waiting get a ``timeout`` event.
    :param expect: by attachment id, what its processed record must show (see
        :class:`ProcessingCompletedTrigger`); ids without an entry are not checked.
    """

    def __init__(
        self,
        attachment_ids: Sequence[str],
        cliniko_conn_id: str = "cliniko_default",
        poll_interval: float = 30.0,
        deadline: float | None = None,
        expect: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.attachment_ids = list(dict.fromkeys(str(item) for item in attachment_ids))
        self.cliniko_conn_id = cliniko_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.expect = None if expect is None else {str(key): dict(value) for key, value in expect.items()}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the keyword arguments that re-create this trigger (no secrets)."""
        return (
            "cliniko_provider.triggers.cliniko.ProcessingCompletedBatchTrigger",
            {
                "attachment_ids": self.attachment_ids,
                "cliniko_conn_id": self.cliniko_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                **({"expect": self.expect} if self.expect is not None else {}),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Wait for every id at once through the shared poller and yield exactly one event; never raise."""
        expect = self.expect or {}
        single = [
            ProcessingCompletedTrigger(
                item, self.cliniko_conn_id, self.poll_interval, self.deadline, expect=expect.get(item)
            )
            for item in self.attachment_ids
        ]
        payloads = await asyncio.gather(*(_first_payload(trigger) for trigger in single))
        pairs = zip(self.attachment_ids, payloads, strict=True)
        outcomes = {item: compact_event(payload) for item, payload in pairs}
        done = sum(1 for payload in outcomes.values() if payload["status"] == "success")
        self.log.info("Cliniko batch of %d attachment(s): %d processed", len(outcomes), done)
        yield _event({"status": "done", "attachments": outcomes})


async def _first_payload(trigger: ProcessingCompletedTrigger) -> JsonDict:
    async for event in trigger.run():
        payload: JsonDict = event.payload
        return payload
    message = "The Cliniko trigger ended without an event"
    return error_event(trigger.attachment_id, REASON_API_ERROR, message, retryable=True)


def _event(payload: JsonDict) -> TriggerEvent:
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]
