"""Waiting for processing: the hook's polling (sensor and operator) and the trigger's event schema."""

from __future__ import annotations

import pickle
from typing import Any, cast

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException, AirflowSensorTimeout

from cliniko_provider.exceptions import (
    ClinikoAttachmentGoneError,
    ClinikoError,
    ClinikoNotFoundError,
    ClinikoPermanentError,
)
from cliniko_provider.hooks.cliniko import check_processed
from cliniko_provider.triggers.cliniko import error_event, record_from_event, success_event
from tests.fake_http import FakeClock
from tests.helpers import FakeAttachmentHook

PENDING = {"id": "7", "archived_at": None, "processing_completed": False, "filename": None}
DONE = {"id": "7", "archived_at": None, "processing_completed": True, "filename": "r.pdf"}
ARCHIVED = {"id": "7", "archived_at": "2025-03-01T10:00:00Z", "processing_completed": True}


def wait(
    hook: FakeAttachmentHook, clock: FakeClock, *, poll_interval: float = 10, timeout: float = 60
) -> dict[str, Any]:
    assert hook._clock is clock
    return hook.wait_for_processing("7", poll_interval=poll_interval, timeout=timeout)


def test_check_processed() -> None:
    assert check_processed(DONE) is True
    assert check_processed(PENDING) is False
    assert check_processed({"id": "7"}) is False
    assert check_processed({"id": "7", "processing_completed": "true"}) is False  # only a real true


def test_check_processed_raises_for_an_archived_record_naming_id_time_and_fix() -> None:
    with pytest.raises(ClinikoAttachmentGoneError) as info:
        check_processed(ARCHIVED)
    error = info.value
    assert isinstance(error, AirflowFailException)
    assert isinstance(error, ClinikoError)
    assert (error.attachment_id, error.reason) == ("7", "archived")
    assert "attachment 7 was archived at 2025-03-01T10:00:00Z" in str(error)
    assert "Restore it" in str(error)


def test_gone_error_survives_pickling() -> None:
    error = ClinikoAttachmentGoneError("9", "not_found")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.attachment_id, copy.reason) == ("9", "not_found")
    assert "deleted, or never existed" in str(copy)


def test_wait_polls_until_processed_and_returns_the_record() -> None:
    clock = FakeClock(100.0)
    hook = FakeAttachmentHook(PENDING, PENDING, DONE, clock=clock)
    assert wait(hook, clock) == DONE
    assert hook.calls == ["7", "7", "7"]
    assert clock.sleeps == [10, 10]


def test_wait_returns_at_once_when_already_processed() -> None:
    clock = FakeClock(100.0)
    hook = FakeAttachmentHook(DONE, clock=clock)
    assert wait(hook, clock) == DONE
    assert clock.sleeps == []


def test_wait_times_out_with_a_clear_message_and_never_oversleeps() -> None:
    clock = FakeClock(100.0)
    hook = FakeAttachmentHook(PENDING, clock=clock)
    with pytest.raises(AirflowSensorTimeout, match=r"attachment 7 after 25 s.*raise the sensor's timeout"):
        wait(hook, clock, poll_interval=10, timeout=25)
    assert clock.sleeps == [10, 10, 5]  # the last sleep is cut to the deadline
    assert len(hook.calls) == 4  # one last check at the deadline


def test_wait_fails_at_once_when_archived_while_waiting() -> None:
    clock = FakeClock(100.0)
    hook = FakeAttachmentHook(PENDING, ARCHIVED, clock=clock)
    with pytest.raises(ClinikoAttachmentGoneError, match="archived at"):
        wait(hook, clock)
    assert clock.sleeps == [10]


def test_wait_turns_404_into_a_clear_not_found_error() -> None:
    clock = FakeClock(100.0)
    not_found = ClinikoNotFoundError(404, "Not found", request="GET /patient_attachments/7")
    hook = FakeAttachmentHook(not_found, clock=clock)
    with pytest.raises(ClinikoAttachmentGoneError) as info:
        wait(hook, clock)
    assert info.value.reason == "not_found"
    assert "attachment 7 does not exist" in str(info.value)


def test_wait_lets_other_errors_through() -> None:
    clock = FakeClock(100.0)
    hook = FakeAttachmentHook(ClinikoError("boom"), clock=clock)
    with pytest.raises(ClinikoError, match="boom"):
        wait(hook, clock)


def test_record_from_a_success_event() -> None:
    assert record_from_event(success_event("7", DONE)) == DONE


@pytest.mark.parametrize(
    ("reason", "retryable", "error_type", "fails_without_retry"),
    [
        ("archived", False, ClinikoAttachmentGoneError, True),
        ("not_found", False, ClinikoAttachmentGoneError, True),
        ("timeout", False, AirflowSensorTimeout, False),  # Airflow never retries a sensor timeout
        ("api_error", False, ClinikoPermanentError, True),  # 401, 403...: a retry would only repeat it
        ("api_error", True, ClinikoError, False),  # Cliniko kept failing: the task's retries may help
    ],
)
def test_record_from_an_error_event_raises_the_matching_error_with_its_message(
    reason: str, retryable: bool, error_type: type[Exception], fails_without_retry: bool
) -> None:
    event = error_event("7", reason, "the clear message", retryable=retryable)
    assert event["retryable"] is retryable
    with pytest.raises(error_type, match=r"^the clear message$") as info:
        record_from_event(event)
    assert isinstance(info.value, AirflowFailException) is fails_without_retry
    if isinstance(info.value, ClinikoAttachmentGoneError):
        assert info.value.reason == reason
        assert info.value.attachment_id == "7"


def test_error_events_are_not_retryable_unless_said() -> None:
    assert error_event("7", "api_error", "m") == {
        "status": "error",
        "attachment_id": "7",
        "reason": "api_error",
        "message": "m",
        "retryable": False,
    }
    assert success_event("7", DONE) == {"status": "success", "attachment_id": "7", "attachment": DONE}


def test_an_api_error_event_of_an_older_trigger_without_the_flag_stays_retryable() -> None:
    event = {"status": "error", "attachment_id": "7", "reason": "api_error", "message": "m"}
    with pytest.raises(ClinikoError, match=r"^m$") as info:
        record_from_event(event)
    assert not isinstance(info.value, AirflowFailException)


@pytest.mark.parametrize(
    ("event", "error_type", "message"),
    [
        (
            {"status": "error", "attachment_id": "7", "reason": "timeout"},
            AirflowSensorTimeout,
            "^Timed out waiting for Cliniko attachment 7$",
        ),
        (
            {"status": "error", "attachment_id": "7", "reason": "api_error", "retryable": False},
            ClinikoPermanentError,
            r"^Waiting for Cliniko attachment 7 failed \(api_error\)$",
        ),
        (
            {"status": "error", "attachment_id": "7", "reason": "archived"},
            ClinikoAttachmentGoneError,
            "attachment 7 was archived at None",
        ),
    ],
)
def test_an_error_event_without_a_message_still_says_what_failed(
    event: dict[str, Any], error_type: type[Exception], message: str
) -> None:
    with pytest.raises(error_type, match=message):
        record_from_event(event)


@pytest.mark.parametrize(
    "event",
    [
        {"status": "success", "attachment_id": "7"},  # no record
        {"status": "weird", "attachment_id": "7"},
        {"status": "error", "attachment_id": "7", "reason": "other"},
    ],
)
def test_record_from_a_malformed_event_is_an_error_not_a_silent_none(event: dict[str, Any]) -> None:
    with pytest.raises(ClinikoError, match="7") as info:
        record_from_event(event)
    assert not isinstance(info.value, AirflowFailException)


def test_record_from_a_non_dict_event() -> None:
    with pytest.raises(ClinikoError, match=r"^Unexpected event from the Cliniko trigger: NoneType$"):
        record_from_event(cast(dict[str, Any], None))
    with pytest.raises(ClinikoError, match=r"^Unexpected event from the Cliniko trigger: list$"):
        record_from_event(cast(dict[str, Any], ["success"]))
