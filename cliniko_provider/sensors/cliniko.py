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
from airflow.triggers.base import StartTriggerArgs

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger, record_from_event
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS

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
    at once (``soft_fail`` skips instead), as does a timeout (``AirflowSensorTimeout``).

    Each attachment is asked at its own ``poke_interval`` (at least 0.1 s; up to a tenth of it early, to
    share a request with others due then), so one short interval does not make every wait of the
    connection poll faster. A failed wait does not use the task's retries when they cannot help
    (archived, deleted, timeout, 401, 403, other 4xx, a broken connection); it does when Cliniko kept
    answering 5xx or 429.

    :param attachment_id: the attachment to wait for (templated), e.g. from the upload task's XCom.
    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param deferrable: wait in the triggerer instead of a worker slot
        (default ``[operators] default_deferrable``).
    :param poll_interval: seconds between checks; an alias of ``poke_interval`` (default 30).
    :param start_from_trigger: start the wait in the triggerer, so the task never takes a worker slot:
        the scheduler hands it straight to the triggerer, which ends it with the processed record (an
        error still resumes it on a worker, to raise the precise error). ``None`` (default) does so
        when it can: a deferrable sensor, Airflow 3.3 or newer, and an ``attachment_id`` known when the
        DAG is parsed (not a template or an upstream task's output, which only a worker can resolve).
        ``True`` insists (``ValueError`` when it cannot); ``False`` never does. Airflow's own deferral
        timeout (``timeout``) bounds such a wait.
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
        start_from_trigger: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if poll_interval is not None:
            kwargs["poke_interval"] = poll_interval
        kwargs.setdefault("poke_interval", 30.0)
        super().__init__(**kwargs)
        self.attachment_id = attachment_id
        self.cliniko_conn_id = cliniko_conn_id
        self.deferrable = deferrable
        why_not = self._why_not_start_from_trigger()
        if start_from_trigger and why_not:
            raise ValueError(f"{self.task_id}: start_from_trigger=True is not possible: {why_not}.")
        if start_from_trigger is not False and not why_not:
            self.start_from_trigger = True
            self.start_trigger_args = StartTriggerArgs(
                trigger_cls="cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger",
                trigger_kwargs={
                    "attachment_id": str(attachment_id),
                    "cliniko_conn_id": cliniko_conn_id,
                    "poll_interval": float(self.poke_interval),
                    "deadline": None,
                    "end_task": True,
                },
                next_method="execute_complete",
                next_kwargs=None,
                timeout=timedelta(seconds=self.timeout),
            )

    def _why_not_start_from_trigger(self) -> str | None:
        """Return why this sensor cannot start in the triggerer, or None when it can."""
        if not self.deferrable:
            return "the sensor is not deferrable"
        if not AIRFLOW_V_3_3_PLUS:
            return "it needs Airflow 3.3 or newer"
        if not isinstance(self.attachment_id, (str, int)) or "{{" in str(self.attachment_id):
            return "attachment_id is not known before the task runs (a template or an upstream output)"
        return None

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
