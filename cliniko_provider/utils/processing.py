"""Waiting for Cliniko to process an attachment: the rules shared by the sensor, the trigger and the operator.

Cliniko sets ``processing_completed`` once it has processed an uploaded file. An archived record will
never be processed, and a missing one (deleted, or never in this account) cannot be: both fail at once
with :class:`~cliniko_provider.exceptions.ClinikoAttachmentGoneError` instead of waiting for a timeout.

Trigger events (see :class:`~cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger`) are
``{"status": "success", "attachment_id": id, "attachment": record}`` or
``{"status": "error", "attachment_id": id, "reason": "archived" | "not_found" | "timeout" | "api_error",
"message": text}``; :func:`record_from_event` turns one back into the record or the matching error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSensorTimeout

from cliniko_provider.exceptions import ClinikoAttachmentGoneError, ClinikoError, ClinikoNotFoundError

if TYPE_CHECKING:
    from cliniko_provider.hooks.cliniko import ClinikoHook

JsonDict = dict[str, Any]

REASON_ARCHIVED = "archived"
REASON_NOT_FOUND = "not_found"
REASON_TIMEOUT = "timeout"
REASON_API_ERROR = "api_error"
GONE_REASONS = frozenset({REASON_ARCHIVED, REASON_NOT_FOUND})


def check_processed(record: JsonDict) -> bool:
    """Return True when Cliniko has finished processing the attachment; raise if it never will.

    :param record: an attachment record from Cliniko.
    :raises ClinikoAttachmentGoneError: the record is archived.
    """
    archived_at = record.get("archived_at")
    if archived_at:
        raise ClinikoAttachmentGoneError(str(record.get("id")), REASON_ARCHIVED, archived_at=str(archived_at))
    return record.get("processing_completed") is True


def processed_or_none(hook: ClinikoHook, attachment_id: str) -> JsonDict | None:
    """Fetch the attachment once; return its record when processed, else None.

    :param hook: the Cliniko hook.
    :param attachment_id: the attachment id.
    :raises ClinikoAttachmentGoneError: the attachment is archived, deleted or never existed.
    """
    try:
        record = hook.get_attachment(attachment_id)
    except ClinikoNotFoundError:
        raise ClinikoAttachmentGoneError(str(attachment_id), REASON_NOT_FOUND) from None
    return record if check_processed(record) else None


def timeout_message(attachment_id: str, timeout: float) -> str:
    """Return the message of a wait that ran out of time.

    :param attachment_id: the attachment id.
    :param timeout: how long the wait lasted, in seconds.
    """
    return (
        f"Cliniko had not finished processing attachment {attachment_id} after {timeout:.0f} s. "
        "Large files take longer: raise the sensor's timeout, or check the attachment in Cliniko"
    )


def wait_for_processing(
    hook: ClinikoHook,
    attachment_id: str,
    *,
    poll_interval: float,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> JsonDict:
    """Poll one attachment until Cliniko has processed it; return the processed record.

    :param hook: the Cliniko hook (its retry policy and rate budget apply to every poll).
    :param attachment_id: the attachment id.
    :param poll_interval: seconds between polls.
    :param timeout: seconds to wait in all before giving up.
    :param sleep: how to wait (injectable for tests).
    :param clock: a monotonic clock (injectable for tests).
    :raises ClinikoAttachmentGoneError: the attachment is archived, deleted or never existed.
    :raises AirflowSensorTimeout: it was not processed within ``timeout``.
    """
    deadline = clock() + timeout
    while True:
        record = processed_or_none(hook, attachment_id)
        if record is not None:
            return record
        remaining = deadline - clock()
        if remaining <= 0:
            raise AirflowSensorTimeout(timeout_message(attachment_id, timeout))
        sleep(min(poll_interval, remaining))


def success_event(attachment_id: str, record: JsonDict) -> JsonDict:
    """Return the payload of a trigger event for a processed attachment.

    :param attachment_id: the attachment id.
    :param record: the processed record.
    """
    return {"status": "success", "attachment_id": attachment_id, "attachment": record}


def error_event(attachment_id: str, reason: str, message: str) -> JsonDict:
    """Return the payload of a trigger event for a wait that failed.

    :param attachment_id: the attachment id.
    :param reason: ``archived``, ``not_found``, ``timeout`` or ``api_error``.
    :param message: a clear message for the user (never a secret).
    """
    return {"status": "error", "attachment_id": attachment_id, "reason": reason, "message": message}


def record_from_event(event: JsonDict) -> JsonDict:
    """Turn a trigger event into the processed record, or raise the error it stands for.

    :param event: the payload of a ``ProcessingCompletedTrigger`` event.
    :raises ClinikoAttachmentGoneError: ``archived`` or ``not_found``.
    :raises AirflowSensorTimeout: ``timeout``.
    :raises ClinikoError: ``api_error`` (Cliniko kept failing; the task's retries may succeed) or a
        malformed event.
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
    if status == "error" and reason == REASON_TIMEOUT:
        raise AirflowSensorTimeout(message or f"Timed out waiting for Cliniko attachment {attachment_id}")
    if status == "error":
        raise ClinikoError(message or f"Waiting for Cliniko attachment {attachment_id} failed ({reason})")
    raise ClinikoError(
        f"Unexpected event from the Cliniko trigger for attachment {attachment_id}: status {status!r}"
    )
