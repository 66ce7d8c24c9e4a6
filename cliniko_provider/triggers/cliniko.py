"""Triggers for Cliniko: wait in the triggerer until attachments are processed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from cliniko_provider.exceptions import ClinikoInputError
from cliniko_provider.triggers.poller import REGISTRY
from cliniko_provider.utils.processing import REASON_API_ERROR, REASON_NOT_FOUND, error_event
from cliniko_provider.utils.validation import validate_id


class ProcessingCompletedTrigger(BaseTrigger):
    """Fire once when Cliniko has processed an attachment, or when waiting for it fails.

    Every trigger of a connection in one triggerer shares one poller, which asks Cliniko about up to
    100 attachments per request (see :mod:`cliniko_provider.triggers.poller`), so a thousand waiting
    attachments cost about ten requests per poll interval.

    The event is ``{"status": "success", "attachment_id": id, "attachment": record}`` or
    ``{"status": "error", "attachment_id": id, "reason": "archived" | "not_found" | "timeout" |
    "api_error", "message": text}``; :func:`cliniko_provider.utils.processing.record_from_event` turns it
    back into the record or the matching error.

    :param attachment_id: the attachment to wait for.
    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param poll_interval: seconds between checks (the shared poller runs at the smallest interval).
    :param deadline: UNIX timestamp after which the trigger fires a ``timeout`` event; None waits forever.
    """

    def __init__(
        self,
        attachment_id: str,
        cliniko_conn_id: str = "cliniko_default",
        poll_interval: float = 30.0,
        deadline: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.attachment_id = str(attachment_id)
        self.cliniko_conn_id = cliniko_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the keyword arguments that re-create this trigger (no secrets)."""
        return (
            "cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger",
            {
                "attachment_id": self.attachment_id,
                "cliniko_conn_id": self.cliniko_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Wait through the connection's shared poller and yield exactly one event; never raise."""
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
            )
        payload["attachment_id"] = self.attachment_id
        self.log.info(
            "Cliniko attachment %s: %s %s",
            self.attachment_id,
            payload["status"],
            payload.get("reason", ""),
        )
        yield _event(payload)


def _event(payload: dict[str, Any]) -> TriggerEvent:
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]
