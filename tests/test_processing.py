"""utils/processing: the waiting rules shared by the sensor, the trigger and the operator."""

from __future__ import annotations

import pickle
from typing import Any, cast

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from cliniko_provider.exceptions import ClinikoAttachmentGoneError, ClinikoError, ClinikoNotFoundError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.utils.processing import (
    check_processed,
    error_event,
    record_from_event,
    success_event,
    wait_for_processing,
)
from tests.fake_http import FakeClock
from tests.helpers import FakeAttachmentHook

PENDING = {"id": "7", "archived_at": None, "processing_completed": False, "filename": None}
DONE = {"id": "7", "archived_at": None, "processing_completed": True, "filename": "r.pdf"}
ARCHIVED = {"id": "7", "archived_at": "2025-03-01T10:00:00Z", "processing_completed": True}


def wait(
    hook: FakeAttachmentHook, clock: FakeClock, *, poll_interval: float = 10, timeout: float = 60
) -> dict[str, Any]:
    return wait_for_processing(
        cast(ClinikoHook, hook),
        "7",
        poll_interval=poll_interval,
        timeout=timeout,
        sleep=clock.sleep,
        clock=clock,
    )


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
    hook, clock = FakeAttachmentHook(PENDING, PENDING, DONE), FakeClock(100.0)
    assert wait(hook, clock) == DONE
    assert hook.calls == ["7", "7", "7"]
    assert clock.sleeps == [10, 10]


def test_wait_returns_at_once_when_already_processed() -> None:
    hook, clock = FakeAttachmentHook(DONE), FakeClock(100.0)
    assert wait(hook, clock) == DONE
    assert clock.sleeps == []


def test_wait_times_out_with_a_clear_message_and_never_oversleeps() -> None:
    hook, clock = FakeAttachmentHook(PENDING), FakeClock(100.0)
    with pytest.raises(AirflowSensorTimeout, match=r"attachment 7 after 25 s.*raise the sensor's timeout"):
        wait(hook, clock, poll_interval=10, timeout=25)
    assert clock.sleeps == [10, 10, 5]  # the last sleep is cut to the deadline
    assert len(hook.calls) == 4  # one last check at the deadline


def test_wait_fails_at_once_when_archived_while_waiting() -> None:
    hook, clock = FakeAttachmentHook(PENDING, ARCHIVED), FakeClock(100.0)
    with pytest.raises(ClinikoAttachmentGoneError, match="archived at"):
        wait(hook, clock)
    assert clock.sleeps == [10]


def test_wait_turns_404_into_a_clear_not_found_error() -> None:
    hook, clock = (
        FakeAttachmentHook(ClinikoNotFoundError(404, "Not found", request="GET /patient_attachments/7")),
        FakeClock(100.0),
    )
    with pytest.raises(ClinikoAttachmentGoneError) as info:
        wait(hook, clock)
    assert info.value.reason == "not_found"
    assert "attachment 7 does not exist" in str(info.value)


def test_wait_lets_other_errors_through() -> None:
    hook, clock = FakeAttachmentHook(ClinikoError("boom")), FakeClock(100.0)
    with pytest.raises(ClinikoError, match="boom"):
        wait(hook, clock)


def test_record_from_a_success_event() -> None:
    assert record_from_event(success_event("7", DONE)) == DONE


@pytest.mark.parametrize(
    ("reason", "error_type", "extra_check"),
    [
        ("archived", ClinikoAttachmentGoneError, AirflowFailException),
        ("not_found", ClinikoAttachmentGoneError, AirflowFailException),
        ("timeout", AirflowSensorTimeout, AirflowSensorTimeout),
        ("api_error", ClinikoError, ClinikoError),
    ],
)
def test_record_from_an_error_event_raises_the_matching_error_with_its_message(
    reason: str, error_type: type[Exception], extra_check: type[Exception]
) -> None:
    with pytest.raises(error_type, match="the clear message") as info:
        record_from_event(error_event("7", reason, "the clear message"))
    assert isinstance(info.value, extra_check)
    if reason == "api_error":  # retryable by the task's own retries
        assert not isinstance(info.value, AirflowFailException)
    if isinstance(info.value, ClinikoAttachmentGoneError):
        assert info.value.reason == reason


@pytest.mark.parametrize(
    "event",
    [
        {"status": "success", "attachment_id": "7"},  # no record
        {"status": "weird", "attachment_id": "7"},
        {"status": "error", "attachment_id": "7", "reason": "other"},
    ],
)
def test_record_from_a_malformed_event_is_an_error_not_a_silent_none(event: dict[str, Any]) -> None:
    with pytest.raises(ClinikoError, match="7"):
        record_from_event(event)


def test_record_from_a_non_dict_event() -> None:
    with pytest.raises(ClinikoError, match="Unexpected event"):
        record_from_event(cast(dict[str, Any], None))
