"""ProcessingCompletedSensor: poke, reschedule and deferrable modes, with a fake hook and the sandbox."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from airflow.providers.common.compat.sdk import (
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)
from airflow.sdk import PokeReturnValue

try:
    from airflow.sdk.exceptions import AirflowRescheduleException
except ImportError:  # Airflow 3.1 (common-compat has no shim for it)
    from airflow.exceptions import AirflowRescheduleException  # type: ignore[no-redef,attr-defined]

from cliniko_provider.exceptions import ClinikoAttachmentGoneError, ClinikoError, ClinikoNotFoundError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sensors.cliniko import DEFERRAL_GRACE, ProcessingCompletedSensor
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger, error_event, success_event
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.helpers import FakeAttachmentHook, create_attachment_via_api, own_rate_budgets

PENDING = {"id": "7", "archived_at": None, "processing_completed": False}
DONE = {"id": "7", "archived_at": None, "processing_completed": True, "filename": "r.pdf"}
ARCHIVED = {"id": "7", "archived_at": "2025-03-01T10:00:00Z", "processing_completed": True}
NOT_FOUND = ClinikoNotFoundError(404, "Not found", request="GET /patient_attachments/7")


@pytest.fixture(autouse=True)
def _own_rate_budgets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with own_rate_budgets(monkeypatch, tmp_path):
        yield


def sensor(*answers: dict[str, Any] | Exception, **kwargs: Any) -> ProcessingCompletedSensor:
    kwargs = {"task_id": "wait", "attachment_id": "7", "poke_interval": 0, "timeout": 60, **kwargs}
    instance = ProcessingCompletedSensor(**kwargs)
    instance.__dict__["hook"] = FakeAttachmentHook(*answers)  # the cached_property's slot
    return instance


def context() -> Any:
    return cast(Any, {})


# --- arguments ------------------------------------------------------------------------------------------


def test_arguments_and_templating() -> None:
    made = ProcessingCompletedSensor(task_id="w", attachment_id="{{ ti.xcom_pull('up')['id'] }}")
    assert "attachment_id" in made.template_fields
    assert made.cliniko_conn_id == "cliniko_default"
    assert made.poke_interval == 30
    assert made.deferrable is False  # [operators] default_deferrable is False here
    assert isinstance(made.hook, ClinikoHook)
    aliased = ProcessingCompletedSensor(task_id="w", attachment_id="1", poll_interval=12, mode="reschedule")
    assert aliased.poke_interval == 12
    assert aliased.mode == "reschedule"


def test_deferrable_default_follows_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import cliniko_provider.sensors.cliniko as module

    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    try:
        reloaded = importlib.reload(module)
        assert reloaded.ProcessingCompletedSensor(task_id="w", attachment_id="1").deferrable is True
    finally:
        monkeypatch.delenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE")
        importlib.reload(module)


# --- start_from_trigger --------------------------------------------------------------------------------

needs_3_3 = pytest.mark.skipif(not AIRFLOW_V_3_3_PLUS, reason="start_from_trigger needs Airflow 3.3")


@needs_3_3
def test_a_known_id_starts_in_the_triggerer_and_ends_there() -> None:
    made = ProcessingCompletedSensor(
        task_id="w", attachment_id="42", cliniko_conn_id="c", deferrable=True, poke_interval=7, timeout=600
    )
    assert made.start_from_trigger is True
    args = made.start_trigger_args
    assert args is not None
    assert args.trigger_cls == "cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger"
    assert args.trigger_kwargs == {
        "attachment_id": "42",
        "cliniko_conn_id": "c",
        "poll_interval": 7.0,
        "deadline": None,
        "end_task": True,
    }
    assert (args.next_method, args.timeout) == ("execute_complete", timedelta(seconds=600))
    # the kwargs make the very trigger the sensor would defer to
    trigger = ProcessingCompletedTrigger(**args.trigger_kwargs)
    assert trigger.serialize()[1] == args.trigger_kwargs
    # the class attribute is untouched: other sensors do not inherit this one's arguments
    assert ProcessingCompletedSensor.start_trigger_args is None


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"deferrable": False}, "the sensor is not deferrable"),
        pytest.param(
            {"attachment_id": "{{ ti.xcom_pull('up')['id'] }}"},
            "attachment_id is not known before the task runs",
            marks=needs_3_3,
        ),
    ],
)
def test_the_wait_starts_on_a_worker_when_it_must(kwargs: dict[str, Any], why: str) -> None:
    arguments = {"task_id": "w", "attachment_id": "42", "deferrable": True, **kwargs}
    assert ProcessingCompletedSensor(**arguments).start_from_trigger is False
    with pytest.raises(ValueError, match=f"w: start_from_trigger=True is not possible: {why}"):
        ProcessingCompletedSensor(**arguments, start_from_trigger=True)


def test_an_upstream_output_is_not_known_before_the_task_runs() -> None:
    from airflow.sdk import DAG, task

    with DAG("d", schedule=None):

        @task
        def upload() -> str:
            return "42"

        made = ProcessingCompletedSensor(task_id="w", attachment_id=upload(), deferrable=True)
    assert made.start_from_trigger is False


@needs_3_3
def test_start_from_trigger_false_keeps_the_worker_path() -> None:
    made = ProcessingCompletedSensor(
        task_id="w", attachment_id="42", deferrable=True, start_from_trigger=False
    )
    assert made.start_from_trigger is False
    assert made.start_trigger_args is None


@pytest.mark.skipif(AIRFLOW_V_3_3_PLUS, reason="Airflow before 3.3")
def test_before_airflow_3_3_the_wait_starts_on_a_worker() -> None:
    assert (
        ProcessingCompletedSensor(task_id="w", attachment_id="42", deferrable=True).start_from_trigger
        is False
    )
    with pytest.raises(ValueError, match=re.escape("it needs Airflow 3.3 or newer")):
        ProcessingCompletedSensor(task_id="w", attachment_id="42", deferrable=True, start_from_trigger=True)


# --- poke and reschedule --------------------------------------------------------------------------------


def test_poke_is_done_with_the_record_as_xcom() -> None:
    result = sensor(DONE).poke(context())
    assert isinstance(result, PokeReturnValue)
    assert (result.is_done, result.xcom_value) == (True, DONE)


def test_poke_is_not_done_while_processing() -> None:
    assert not sensor(PENDING).poke(context())


def test_poke_mode_returns_the_processed_record() -> None:
    waiting = sensor(PENDING, PENDING, DONE)
    assert waiting.execute(context()) == DONE
    assert len(cast(FakeAttachmentHook, waiting.hook).calls) == 3


def test_poke_mode_times_out() -> None:
    with pytest.raises(AirflowSensorTimeout):
        sensor(PENDING, timeout=0).execute(context())


@pytest.mark.parametrize(("answer", "reason"), [(ARCHIVED, "archived at"), (NOT_FOUND, "does not exist")])
def test_poke_mode_fails_at_once_when_the_attachment_is_gone(answer: Any, reason: str) -> None:
    waiting = sensor(PENDING, answer)
    with pytest.raises(ClinikoAttachmentGoneError, match=reason):
        waiting.execute(context())
    assert len(cast(FakeAttachmentHook, waiting.hook).calls) == 2


def test_poke_mode_soft_fail_skips_when_gone() -> None:
    with pytest.raises(AirflowSkipException):
        sensor(ARCHIVED, soft_fail=True).execute(context())


def test_reschedule_mode_reschedules_while_processing() -> None:
    class TI:
        def get_first_reschedule_date(self, _: Any) -> None:
            return None

    with pytest.raises(AirflowRescheduleException):
        sensor(PENDING, mode="reschedule", poke_interval=60).execute(cast(Any, {"ti": TI()}))


# --- deferrable ------------------------------------------------------------------------------------------


def test_deferrable_returns_at_once_when_already_processed() -> None:
    assert sensor(DONE, deferrable=True).execute(context()) == DONE


def test_deferrable_defers_to_the_trigger_with_a_deadline() -> None:
    waiting = sensor(PENDING, deferrable=True, poke_interval=15, timeout=600, cliniko_conn_id="c")
    before = time.time()
    with pytest.raises(TaskDeferred) as info:
        waiting.execute(context())
    deferred = info.value
    assert deferred.method_name == "execute_complete"
    assert deferred.timeout == timedelta(seconds=600) + DEFERRAL_GRACE
    trigger = deferred.trigger
    assert isinstance(trigger, ProcessingCompletedTrigger)
    _, kwargs = trigger.serialize()
    assert kwargs["attachment_id"] == "7"
    assert kwargs["cliniko_conn_id"] == "c"
    assert kwargs["poll_interval"] == 15
    assert before + 600 <= kwargs["deadline"] <= time.time() + 600


@pytest.mark.parametrize("answer", [ARCHIVED, NOT_FOUND])
def test_deferrable_fails_before_deferring_when_gone(answer: Any) -> None:
    with pytest.raises(ClinikoAttachmentGoneError):
        sensor(answer, deferrable=True).execute(context())


def test_deferrable_soft_fail_skips_when_gone() -> None:
    with pytest.raises(AirflowSkipException, match="archived"):
        sensor(ARCHIVED, deferrable=True, soft_fail=True).execute(context())


def test_execute_complete_returns_the_record() -> None:
    waiting = sensor(PENDING, deferrable=True)
    assert (
        waiting.resume_execution("execute_complete", {"event": success_event("7", DONE)}, context()) == DONE
    )


@pytest.mark.parametrize(
    ("reason", "retryable", "error_type", "fails_without_retry"),
    [
        ("archived", False, ClinikoAttachmentGoneError, True),
        ("not_found", False, ClinikoAttachmentGoneError, True),
        ("timeout", False, AirflowSensorTimeout, False),  # Airflow fails a sensor timeout without retry
        ("api_error", False, ClinikoError, True),  # e.g. a 401: retrying cannot help
        ("api_error", True, ClinikoError, False),  # e.g. Cliniko kept failing: the task's retries may
    ],
)
def test_execute_complete_raises_the_events_error(
    reason: str, retryable: bool, error_type: type[Exception], fails_without_retry: bool
) -> None:
    waiting = sensor(PENDING, deferrable=True)
    event = error_event("7", reason, f"clear words about {reason}", retryable=retryable)
    with pytest.raises(error_type, match=f"clear words about {reason}") as info:
        waiting.resume_execution("execute_complete", {"event": event}, context())
    assert isinstance(info.value, AirflowFailException) is fails_without_retry


@pytest.mark.parametrize("reason", ["archived", "not_found", "timeout", "api_error"])
def test_execute_complete_soft_fail_skips(reason: str) -> None:
    waiting = sensor(PENDING, deferrable=True, soft_fail=True)
    with pytest.raises(AirflowSkipException):
        waiting.resume_execution("execute_complete", {"event": error_event("7", reason, "x")}, context())


# --- against the sandbox -------------------------------------------------------------------------------


def test_poke_mode_against_the_sandbox(sandbox_conn: str) -> None:
    hook = ClinikoHook(sandbox_conn)
    patient = hook.create_patient("Sensor", "Poke")
    attachment = create_attachment_via_api(hook, patient["id"], filename="poke test.pdf")
    assert attachment["processing_completed"] is False
    waiting = ProcessingCompletedSensor(
        task_id="wait", attachment_id=attachment["id"], poke_interval=0.1, timeout=30
    )
    record = waiting.execute(context())
    assert record["id"] == attachment["id"]
    assert record["processing_completed"] is True
    assert record["filename"] == "poke test.pdf"


def test_archived_and_unknown_attachments_fail_against_the_sandbox(sandbox_conn: str) -> None:
    hook = ClinikoHook(sandbox_conn)
    patient = hook.create_patient("Sensor", "Gone")
    attachment = create_attachment_via_api(hook, patient["id"])
    hook.archive_attachment(attachment["id"])
    with pytest.raises(ClinikoAttachmentGoneError, match=f"{attachment['id']} was archived at"):
        ProcessingCompletedSensor(task_id="a", attachment_id=attachment["id"], poke_interval=0).execute(
            context()
        )
    with pytest.raises(ClinikoAttachmentGoneError, match="999999999 does not exist"):
        ProcessingCompletedSensor(
            task_id="b", attachment_id="999999999", poke_interval=0, deferrable=True
        ).execute(context())
