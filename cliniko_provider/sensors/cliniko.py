"""Sensors for Cliniko: wait until an uploaded attachment has been processed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import (
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    conf,
)
from airflow.sdk import BaseSensorOperator, PokeReturnValue

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger, record_from_event

if TYPE_CHECKING:
    from airflow.sdk import Context

# How long Airflow's own deferral timeout waits beyond the trigger's deadline: the trigger's timeout
# event (with its clear message) should win; Airflow's backstop only fires if no triggerer is running.
DEFERRAL_GRACE = timedelta(minutes=5)


class ProcessingCompletedSensor(BaseSensorOperator):
    """Wait until Cliniko has processed an attachment; return the processed record (XCom).

    Works in ``poke`` and ``reschedule`` modes and deferrable. Deferred sensors of one connection share
    one poller in the triggerer, which asks about up to 100 attachments per request, so thousands of
    them stay far below Cliniko's 200 requests a minute. An archived, deleted or unknown attachment fails
    at once (``soft_fail`` skips instead), as does a timeout.

    :param attachment_id: the attachment to wait for (templated), e.g. from the upload task's XCom.
    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param deferrable: wait in the triggerer instead of a worker slot
        (default ``[operators] default_deferrable``).
    :param poll_interval: seconds between checks; an alias of ``poke_interval`` (default 30).
    """

    template_fields: Sequence[str] = ("attachment_id",)
    ui_color = "#d7ecf5"

    def __init__(
        self,
        *,
        attachment_id: str,
        cliniko_conn_id: str = ClinikoHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float | None = None,
        **kwargs: Any,
    ) -> None:
        if poll_interval is not None:
            kwargs["poke_interval"] = poll_interval
        kwargs.setdefault("poke_interval", 30.0)
        super().__init__(**kwargs)
        self.attachment_id = attachment_id
        self.cliniko_conn_id = cliniko_conn_id
        self.deferrable = deferrable

    @cached_property
    def hook(self) -> ClinikoHook:
        """The Cliniko hook of the sensor's connection."""
        return ClinikoHook(self.cliniko_conn_id)

    def poke(self, context: Context) -> PokeReturnValue:
        """Check once; done when processed (with the record as XCom), fail when the attachment is gone.

        :param context: the task context.
        """
        self.log.info("Checking whether Cliniko has processed attachment %s", self.attachment_id)
        record = self.hook.processed_attachment(str(self.attachment_id))
        return PokeReturnValue(is_done=record is not None, xcom_value=record)

    def execute(self, context: Context) -> Any:
        """Wait for processing: by poking or rescheduling, or by checking once and then deferring.

        :param context: the task context.
        """
        if not self.deferrable:
            return super().execute(context)
        try:
            record = self.hook.processed_attachment(str(self.attachment_id))
        except (AirflowFailException, AirflowSensorTimeout) as error:
            if self.soft_fail or self.never_fail:
                raise AirflowSkipException(f"Skipping: {error}") from error
            raise
        if record is not None:
            return record
        self.log.info(
            "Cliniko is still processing attachment %s; deferring (checks every %.0f s, timeout %.0f s)",
            self.attachment_id,
            self.poke_interval,
            self.timeout,
        )
        self.defer(
            trigger=ProcessingCompletedTrigger(
                attachment_id=str(self.attachment_id),
                cliniko_conn_id=self.cliniko_conn_id,
                poll_interval=self.poke_interval,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout) + DEFERRAL_GRACE,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Return the processed record from the trigger's event, or raise the error it reports.

        An error that retrying cannot help (archived, not found, timeout, or an event marked not
        ``retryable`` such as a 401) fails the task without retries. ``soft_fail`` turns the error into
        a skip (``BaseSensorOperator.resume_execution``).

        :param context: the task context.
        :param event: the trigger's event payload.
        """
        record = record_from_event(event)
        self.log.info("Cliniko has processed attachment %s", self.attachment_id)
        return record
