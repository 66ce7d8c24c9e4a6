"""ProcessingCompletedTrigger and its shared poller, against a fake Cliniko (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time as _time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from cliniko_provider.hooks.cliniko import ClinikoAsyncHook, ClinikoHook
from cliniko_provider.triggers import poller as poller_module
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger
from cliniko_provider.triggers.poller import REGISTRY, AttachmentPoller, PollerRegistry
from cliniko_provider.utils.errors import Redactor
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import SANDBOX_KEY, connection_json
from tests.fake_http import FakeClock, answering_user
from tests.helpers import create_attachment_via_api, own_rate_budgets, sandbox_control, sandbox_faults

START = 1_700_000_000.0


class FakeTime(FakeClock):
    """A UNIX clock that only moves when the code under test sleeps; sleeping yields to the loop."""

    def __init__(self) -> None:
        super().__init__(START)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


class FakeCliniko:
    """Answers ``GET /patient_attachments?q[]=id:=...`` like Cliniko, counting requests.

    ``done_at[id]`` is when an attachment finishes processing (fake time); ``archived`` ids are
    archived; ids in neither do not exist. ``script`` holds answers served before the normal ones.
    """

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.done_at: dict[str, float] = {}
        self.archived: set[str] = set()
        self.script: list[httpx.Response] = []
        self.requests: list[httpx.Request] = []
        self.pollers: list[AttachmentPoller] = []
        self.hooks: list[ClinikoAsyncHook] = []
        self.times: list[float] = []  # when each request came, in seconds after START
        self.asked: list[list[str]] = []  # the ids each request asked about
        self.user_look_ups: list[httpx.Request] = []  # GET /user: once per key and process

    def record(self, attachment_id: str) -> dict[str, Any]:
        done = self.time() >= self.done_at[attachment_id]
        return {
            "id": attachment_id,
            "archived_at": "2025-01-02T03:04:05Z" if attachment_id in self.archived else None,
            "processing_completed": done,
            "filename": "report.pdf" if done else None,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(self.time() - START)
        self.asked.append(self.ids(request))
        if self.script:
            return self.script.pop(0)
        filters = request.url.params.get_list("q[]")
        ids = self.ids(request)
        assert "archived_at:*" in filters
        assert len(ids) <= 100
        found = [self.record(i) for i in ids if i in self.done_at or i in self.archived]
        return httpx.Response(200, json={"patient_attachments": found, "links": {}})

    @staticmethod
    def ids(request: httpx.Request) -> list[str]:
        filters = request.url.params.get_list("q[]")
        return next(item for item in filters if item.startswith("id:="))[4:].split(",")

    def add(self, attachment_id: str, done_after: float = math.inf) -> None:
        self.done_at[attachment_id] = self.time() + done_after


@pytest.fixture(autouse=True)
def _own_rate_budgets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with own_rate_budgets(monkeypatch, tmp_path):
        yield


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh key per test, set on ``cliniko_default``."""
    key = f"TrIgGeRsEcReT{uuid.uuid4().hex[:8]}-au2"
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(key))
    return key


class SteppedTime(FakeTime):
    """Fake time that only the test moves: a sleep ends once the test has moved the clock past its end."""

    async def asleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        end = self.now + seconds
        while self.now < end:
            await asyncio.sleep(0.001)


def fake_cliniko(monkeypatch: pytest.MonkeyPatch, time: FakeTime) -> FakeCliniko:
    """A fake Cliniko behind every poller made in this test, on the given fake time."""
    cliniko = FakeCliniko(time)

    def hook_factory(conn_id: str) -> ClinikoAsyncHook:
        handler = answering_user(cliniko.handler, asked=cliniko.user_look_ups)
        hook = make_hook(conn_id, transport=httpx.MockTransport(handler), time=time)
        cliniko.hooks.append(hook)
        return hook

    def factory(conn_id: str, **kwargs: Any) -> AttachmentPoller:
        kwargs = {"hook_factory": hook_factory, "clock": time, "asleep": time.asleep, **kwargs}
        poller = AttachmentPoller(conn_id, **kwargs)
        cliniko.pollers.append(poller)
        return poller

    monkeypatch.setattr(REGISTRY, "factory", factory)
    return cliniko


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, api_key: str) -> FakeCliniko:
    """A fake Cliniko on fake time that jumps ahead whenever the poller sleeps."""
    return fake_cliniko(monkeypatch, FakeTime())


@pytest.fixture
def stepped(monkeypatch: pytest.MonkeyPatch, api_key: str) -> FakeCliniko:
    """A fake Cliniko on fake time that moves only when the test moves it (``fake.time.now = ...``)."""
    return fake_cliniko(monkeypatch, SteppedTime())


def make_hook(conn_id: str, *, transport: httpx.MockTransport, time: FakeTime) -> ClinikoAsyncHook:
    return ClinikoAsyncHook(conn_id, asleep=time.asleep, clock=time, rand=lambda: 0.0, transport=transport)


async def until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Let the event loop run until ``condition()`` holds; fail after ``timeout`` real seconds.

    Generous, because the budget's file work runs in a thread that a loaded machine can delay.
    """

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


async def fire(trigger: ProcessingCompletedTrigger) -> list[dict[str, Any]]:
    """Run a trigger to its end; return the payloads of its events."""
    events = [event.payload async for event in trigger.run()]
    return events


async def fire_all(triggers: list[ProcessingCompletedTrigger]) -> list[dict[str, Any]]:
    # on fake time a healthy poller answers within a second: a broken one fails the test fast, not hangs it
    results = await asyncio.wait_for(asyncio.gather(*(fire(t) for t in triggers)), timeout=10)
    assert all(len(events) == 1 for events in results), "each trigger yields exactly one event"
    return [events[0] for events in results]


def trigger(
    attachment_id: str, deadline_in: float | None = 3600, **kwargs: Any
) -> ProcessingCompletedTrigger:
    deadline = None if deadline_in is None else START + deadline_in
    return ProcessingCompletedTrigger(attachment_id, deadline=deadline, **kwargs)


# --- serialisation -------------------------------------------------------------------------------------


def test_serialises_only_ids_intervals_and_deadline(api_key: str) -> None:
    classpath, kwargs = ProcessingCompletedTrigger(
        "42", "my_conn", poll_interval=15, deadline=123.5
    ).serialize()
    assert classpath == "cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger"
    assert kwargs == {
        "attachment_id": "42",
        "cliniko_conn_id": "my_conn",
        "poll_interval": 15.0,
        "deadline": 123.5,
        "end_task": False,
    }
    text = json.dumps(kwargs)
    token = base64.b64encode(f"{api_key}:".encode()).decode()
    assert api_key not in text
    assert token not in text
    assert SANDBOX_KEY not in text


def test_round_trips_through_airflows_serialisation() -> None:
    from airflow.serialization.serialized_objects import BaseSerialization

    expect = {"size": 1000, "filename": "a%22b.pdf"}
    classpath, kwargs = ProcessingCompletedTrigger(
        "42", poll_interval=5, deadline=START, expect=expect
    ).serialize()
    assert kwargs["expect"] == expect  # plain values, no secret
    restored = BaseSerialization.deserialize(BaseSerialization.serialize(kwargs))
    again = ProcessingCompletedTrigger(**restored)
    assert again.serialize() == (classpath, kwargs)


async def test_recreated_from_its_serialised_form_carries_on(fake: FakeCliniko) -> None:
    fake.add("42", done_after=95)
    _, kwargs = trigger("42", poll_interval=30).serialize()
    [event] = await fire_all([ProcessingCompletedTrigger(**kwargs)])
    assert event["status"] == "success"
    assert event["attachment"]["filename"] == "report.pdf"


# --- one trigger, every outcome ------------------------------------------------------------------------


needs_3_3 = pytest.mark.skipif(not AIRFLOW_V_3_3_PLUS, reason="tasks start in the triggerer on Airflow 3.3+")


class StartedInTheTriggerer:
    """What the triggerer gives a trigger whose task started in it: a runtime task instance."""

    task = None
    dag_id, task_id, run_id, map_index = "d", "wait", "r", 3

    async def axcom_push(self, key: str, value: Any) -> None:
        raise AssertionError("Airflow 3.3's axcom_push needs the real task; the trigger must not call it")


@pytest.fixture
def pushed(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    from airflow.sdk.execution_time.xcom import XCom

    calls: list[dict[str, Any]] = []

    async def aset(**kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(XCom, "aset", aset)
    return calls


RECORD = {"id": "42", "archived_at": None, "processing_completed": True, "filename": "report.pdf"}


@needs_3_3
async def test_end_task_ends_the_task_in_the_triggerer_with_the_record(
    fake: FakeCliniko, pushed: list[dict[str, Any]]
) -> None:
    from airflow.triggers.base import TaskSuccessEvent

    fake.add("42", done_after=5)
    waiting = trigger("42", poll_interval=10, end_task=True)
    waiting.task_instance = StartedInTheTriggerer()  # type: ignore[assignment]
    events = await asyncio.wait_for(collect(waiting), timeout=10)
    assert len(events) == 1
    assert isinstance(events[0], TaskSuccessEvent)
    assert events[0].xcoms is None  # pushed through the XCom backend instead
    assert pushed == [
        {
            "key": "return_value",
            "value": RECORD,
            "dag_id": "d",
            "task_id": "wait",
            "run_id": "r",
            "map_index": 3,
        }
    ]


@needs_3_3
async def test_end_task_resumes_on_a_worker_when_the_task_did_not_start_in_the_triggerer(
    fake: FakeCliniko, pushed: list[dict[str, Any]]
) -> None:
    fake.add("42", done_after=5)
    events = await asyncio.wait_for(collect(trigger("42", poll_interval=10, end_task=True)), timeout=10)
    assert [event.payload for event in events] == [
        {"status": "success", "attachment_id": "42", "attachment": RECORD}
    ]
    assert pushed == []


@needs_3_3
async def test_end_task_resumes_on_a_worker_when_the_push_fails(
    fake: FakeCliniko, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from airflow.sdk.execution_time.xcom import XCom

    async def refused(**kwargs: Any) -> None:
        raise RuntimeError("the API server refused the XCom")

    monkeypatch.setattr(XCom, "aset", refused)
    fake.add("42", done_after=5)
    waiting = trigger("42", poll_interval=10, end_task=True)
    waiting.task_instance = StartedInTheTriggerer()  # type: ignore[assignment]
    waiting._log = logging.getLogger("cliniko-test-trigger")  # Airflow 3.3's trigger logger is structlog's
    with caplog.at_level(logging.WARNING):
        events = await asyncio.wait_for(collect(waiting), timeout=10)
    assert [event.payload["status"] for event in events] == ["success"]
    assert "Could not push attachment 42's record, resuming on a worker" in caplog.text


@needs_3_3
async def test_end_task_still_resumes_the_task_on_an_error(
    fake: FakeCliniko, pushed: list[dict[str, Any]]
) -> None:
    from airflow.triggers.base import BaseTaskEndEvent

    waiting = trigger("404404", end_task=True)
    waiting.task_instance = StartedInTheTriggerer()  # type: ignore[assignment]
    events = await asyncio.wait_for(collect(waiting), timeout=10)
    assert len(events) == 1
    assert not isinstance(events[0], BaseTaskEndEvent)
    assert (events[0].payload["status"], events[0].payload["reason"]) == ("error", "not_found")
    assert pushed == []


async def collect(one: ProcessingCompletedTrigger) -> list[Any]:
    return [event async for event in one.run()]


async def test_success_event_carries_the_processed_record(fake: FakeCliniko) -> None:
    fake.add("42", done_after=65)
    [event] = await fire_all([trigger("42", poll_interval=30)])
    assert event == {
        "status": "success",
        "attachment_id": "42",
        "attachment": {
            "id": "42",
            "archived_at": None,
            "processing_completed": True,
            "filename": "report.pdf",
        },
    }
    # first asked one interval after it deferred, then every 30 s: done at 65, seen at the round after
    assert fake.times == [30.0, 60.0, 90.0]


async def test_archived_attachment_fails_with_when_and_fix(fake: FakeCliniko) -> None:
    fake.add("42")
    fake.archived.add("42")
    [event] = await fire_all([trigger("42")])
    assert event["status"] == "error"
    assert event["reason"] == "archived"
    assert "attachment 42 was archived at 2025-01-02T03:04:05Z" in event["message"]
    assert "Restore it" in event["message"]


async def test_missing_attachment_is_not_found(fake: FakeCliniko) -> None:
    [event] = await fire_all([trigger("404404")])
    assert event["reason"] == "not_found"
    assert "attachment 404404 does not exist" in event["message"]
    assert len(fake.requests) == 1


async def test_malformed_id_is_not_found_without_any_request(fake: FakeCliniko) -> None:
    [event] = await fire_all([trigger("abc")])
    assert (event["status"], event["reason"], event["attachment_id"]) == ("error", "not_found", "abc")
    assert "numeric id" in event["message"]
    assert fake.requests == []


async def test_deadline_passing_fires_a_timeout_at_the_deadline(fake: FakeCliniko) -> None:
    fake.add("42")
    [event] = await fire_all([trigger("42", deadline_in=100, poll_interval=30)])
    assert event["reason"] == "timeout"
    assert "attachment 42 by the deadline 2023-11-14T22:15:00Z" in event["message"]
    assert fake.time() == START + 100  # woke for the deadline, not the next round at 120
    assert fake.times == [30.0, 60.0, 90.0]


async def test_deadline_already_passed_times_out_without_a_request(fake: FakeCliniko) -> None:
    fake.add("42")
    [event] = await fire_all([trigger("42", deadline_in=-1)])
    assert event["reason"] == "timeout"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("status", "text"), [(401, "HTTP Basic: Access denied"), (403, "Forbidden"), (422, "Bad filter")]
)
async def test_client_error_is_an_api_error_at_once_that_task_retries_cannot_fix(
    fake: FakeCliniko, api_key: str, status: int, text: str
) -> None:
    fake.add("42")
    fake.script = [httpx.Response(status, text=text)]
    [event] = await fire_all([trigger("42")])
    assert event["reason"] == "api_error"
    assert event["retryable"] is False
    assert f"Cliniko refused the status check: Cliniko answered {status}" in event["message"]
    assert text in event["message"]
    assert api_key not in event["message"]
    assert len(fake.requests) == 1  # 4xx is never retried


async def test_5xx_is_retried_by_the_hook_then_across_rounds(fake: FakeCliniko) -> None:
    fake.add("42", done_after=0)
    # the hook's 5 attempts all fail in the first round; the next round succeeds
    fake.script = [httpx.Response(503, text="busy")] * 5
    [event] = await fire_all([trigger("42", poll_interval=30)])
    assert event["status"] == "success"
    assert len(fake.requests) == 6


async def test_5xx_for_too_many_rounds_is_an_api_error(
    fake: FakeCliniko, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add("42", done_after=0)
    fake.script = [httpx.Response(500, json={"message": "Kaputt"})] * 10
    factory = REGISTRY.factory
    monkeypatch.setattr(REGISTRY, "factory", partial(factory, max_failed_rounds=2))
    [event] = await fire_all([trigger("42")])
    assert event["reason"] == "api_error"
    assert event["retryable"] is True  # Cliniko may be back by the task's next try
    assert "Cliniko kept failing for 2 rounds" in event["message"]
    assert "500" in event["message"]
    assert "Kaputt" in event["message"]


async def test_timeout_after_failures_names_the_last_error(fake: FakeCliniko) -> None:
    fake.add("42")
    fake.script = [httpx.Response(502, text="bad gateway")] * 100
    [event] = await fire_all([trigger("42", deadline_in=60)])
    assert event["reason"] == "timeout"
    assert "Last error: Cliniko answered 502" in event["message"]


async def test_429_waits_for_the_reset_header_through_the_shared_policy(fake: FakeCliniko) -> None:
    fake.add("42", done_after=0)
    reset = START + 40  # the poller first asks at START + 30, one poll interval after the trigger started
    fake.script = [httpx.Response(429, headers={"X-RateLimit-Reset": str(int(reset))}, text="")]
    [event] = await fire_all([trigger("42")])
    assert event["status"] == "success"
    assert len(fake.requests) == 2
    assert pytest.approx(40 - 30 + 0.5) in fake.time.sleeps  # until the reset, plus the policy's margin


async def test_missing_connection_is_an_api_error(fake: FakeCliniko) -> None:
    [event] = await fire_all([trigger("42", cliniko_conn_id="no_such_conn")])
    assert event["reason"] == "api_error"
    assert event["retryable"] is True  # as in a worker: the connection may be added before the next try
    assert "no_such_conn" in event["message"]
    assert fake.requests == []


async def test_invalid_connection_is_an_api_error(fake: FakeCliniko, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_BAD", json.dumps({"conn_type": "cliniko", "password": "k-au1"}))
    [event] = await fire_all([trigger("42", cliniko_conn_id="cliniko_bad")])
    assert event["reason"] == "api_error"
    assert event["retryable"] is False
    assert "User-Agent" in event["message"]


async def test_unexpected_answer_is_an_api_error_not_a_hang(fake: FakeCliniko) -> None:
    fake.add("42")
    fake.script = [httpx.Response(200, text="<html>proxy</html>")]
    [event] = await fire_all([trigger("42")])
    assert event["reason"] == "api_error"


async def test_a_poller_crash_fails_its_waiters_instead_of_hanging(
    fake: FakeCliniko, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(AttachmentPoller, "_expire", broken)
    fake.add("42")
    [event] = await fire_all([trigger("42")])
    assert event["reason"] == "api_error"
    assert event["retryable"] is True
    assert "poller failed: bug" in event["message"]
    assert REGISTRY.active() == {}


async def test_no_secret_in_events_or_logs(
    fake: FakeCliniko, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = base64.b64encode(f"{api_key}:".encode()).decode()
    fake.add("1", done_after=0)
    fake.add("2")
    fake.archived.add("2")
    fake.script = [httpx.Response(503, text=f"echo {api_key} {token}")] * 5
    events = await fire_all([trigger("1"), trigger("2"), trigger("3"), trigger("4", deadline_in=0)])
    assert {e["status"] for e in events} == {"success", "error"}
    text = json.dumps(events) + caplog.text
    assert "echo" in caplog.text  # the echoed body was logged, blanked
    assert api_key not in text
    assert token not in text


# --- coalescing -----------------------------------------------------------------------------------------


async def test_250_triggers_cost_3_requests_a_round(fake: FakeCliniko) -> None:
    for i in range(1, 251):
        fake.add(str(i), done_after=70 if i % 2 else 100)
    events = await fire_all([trigger(str(i), poll_interval=30) for i in range(1, 251)])
    assert {e["status"] for e in events} == {"success"}
    assert [e["attachment_id"] for e in events] == [str(i) for i in range(1, 251)]
    # rounds at 30, 60 (none done), 90 (odd ones done), 120 (the rest)
    assert len(fake.requests) == 3 * 3 + 2
    [poller] = fake.pollers
    assert poller.stats.requests_per_round == [3, 3, 3, 2]


async def test_mixed_outcomes_in_one_batch(fake: FakeCliniko) -> None:
    fake.add("1", done_after=0)
    fake.add("2")
    fake.archived.add("2")
    fake.add("3", done_after=math.inf)
    events = await fire_all([trigger("1"), trigger("2"), trigger("3", deadline_in=45), trigger("4")])
    assert [(e["status"], e.get("reason"), e.get("retryable")) for e in events] == [
        ("success", None, None),
        ("error", "archived", False),
        ("error", "timeout", False),
        ("error", "not_found", False),
    ]
    assert fake.times == [30.0]  # the first round settles three; the deadline at 45 comes before the next


async def test_two_triggers_on_one_attachment_both_fire(fake: FakeCliniko) -> None:
    fake.add("42", done_after=10)
    events = await fire_all([trigger("42"), trigger("042")])
    assert [e["status"] for e in events] == ["success", "success"]
    assert [e["attachment_id"] for e in events] == ["42", "042"]  # each keeps the id it was given
    ids = [r.url.params.get_list("q[]")[0] for r in fake.requests]
    assert ids == ["id:=42"]  # one question answers both


async def test_each_waiter_is_asked_at_its_own_interval(fake: FakeCliniko) -> None:
    fake.add("1")
    fake.add("2")
    events = await fire_all(
        [trigger("1", poll_interval=60, deadline_in=130), trigger("2", poll_interval=20, deadline_in=130)]
    )
    assert [e["reason"] for e in events] == ["timeout", "timeout"]
    # the 20 s waiter does not drag the 60 s one along; when both are due they share one request
    assert fake.times == [20, 40, 60, 80, 100, 120]
    assert fake.asked == [["2"], ["2"], ["1", "2"], ["2"], ["2"], ["1", "2"]]
    assert fake.time() == START + 130


async def test_a_waiter_due_between_beats_is_asked_at_the_next_beat(fake: FakeCliniko) -> None:
    fake.add("1")
    fake.add("2")
    events = await fire_all(
        [trigger("1", poll_interval=20, deadline_in=90), trigger("2", poll_interval=30, deadline_in=90)]
    )
    assert [e["reason"] for e in events] == ["timeout", "timeout"]
    # rounds keep the 20 s beat; "2" falls due at 30 and 70 and is asked at the beats after
    assert fake.times == [20, 40, 60, 80]
    assert fake.asked == [["1"], ["1", "2"], ["1"], ["1", "2"]]


async def test_waking_for_a_deadline_does_not_start_a_round_off_the_beat(stepped: FakeCliniko) -> None:
    for item in ("1", "2", "3"):
        stepped.add(item)
    tasks = [asyncio.ensure_future(fire(trigger("1", poll_interval=30, deadline_in=None)))]
    await until(lambda: stepped.time.sleeps == [30])
    stepped.time.now = START + 5
    tasks.append(asyncio.ensure_future(fire(trigger("2", poll_interval=40, deadline_in=None))))  # due at 45
    await until(lambda: REGISTRY.active()["cliniko_default"].waiting == 2)
    stepped.time.now = START + 30
    await until(lambda: stepped.asked == [["1"]] and stepped.time.sleeps[-1] == 30)  # next beat at 60
    stepped.time.now = START + 50
    soon = asyncio.ensure_future(fire(trigger("3", poll_interval=600, deadline_in=55)))
    await until(lambda: stepped.time.sleeps[-1] == 5)  # woken at 50, with "2" overdue: no round yet
    assert stepped.asked == [["1"]]
    stepped.time.now = START + 55
    [event] = await asyncio.wait_for(soon, 5)
    assert event["reason"] == "timeout"
    stepped.time.now = START + 60
    await until(lambda: len(stepped.asked) == 2)
    assert stepped.asked == [["1"], ["1", "2"]]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_round_at_a_deadline_asks_before_it_expires(fake: FakeCliniko) -> None:
    fake.add("42", done_after=30)
    [event] = await fire_all([trigger("42", poll_interval=30, deadline_in=30)])
    assert event["status"] == "success"  # asked at 30, processed at 30: not a timeout at 30
    assert fake.times == [30]


@pytest.mark.parametrize(
    ("poll_interval", "first_check"),
    [(0, 0.1), (-5, 0.1), (math.nan, 0.1), (0.05, 0.1), (0.1, 0.1), (0.15, 0.15), (7, 7)],
)
async def test_the_poll_interval_has_a_floor(
    fake: FakeCliniko, poll_interval: float, first_check: float
) -> None:
    fake.add("42", done_after=first_check * 1.5)
    [event] = await fire_all([trigger("42", poll_interval=poll_interval)])
    assert event["status"] == "success"
    assert fake.times == pytest.approx([first_check, 2 * first_check], abs=1e-6)


@pytest.mark.parametrize(
    ("joins_after", "times", "asked"),
    [(4.0, [40, 80], [["1", "2"], ["1", "2"]]), (4.5, [40, 80], [["1"], ["1", "2"]])],
)
async def test_waiters_that_defer_apart_share_requests(
    stepped: FakeCliniko, joins_after: float, times: list[float], asked: list[list[str]]
) -> None:
    stepped.add("1")
    stepped.add("2")
    first = asyncio.ensure_future(fire(trigger("1", poll_interval=40, deadline_in=None)))
    await until(lambda: REGISTRY.active().get("cliniko_default") is not None)
    stepped.time.now = START + joins_after
    second = asyncio.ensure_future(fire(trigger("2", poll_interval=40, deadline_in=None)))
    await until(lambda: REGISTRY.active()["cliniko_default"].waiting == 2)
    poller = REGISTRY.active()["cliniko_default"]
    for now in sorted({40, 40 + joins_after, 80, 80 + joins_after}):
        stepped.time.now = START + now
        await until(lambda: poller._planned_wake > stepped.time.now)  # done with this moment
    # "2" is first due at 44: asked at 40 with "1", as 4 s is a tenth of 40. Due at 44.5, it is not, and
    # waits for the poller's next beat at 80, where they are in step from then on.
    assert stepped.times == times
    assert stepped.asked == asked
    first.cancel()
    second.cancel()
    await asyncio.gather(first, second, return_exceptions=True)


async def test_a_joining_waiter_due_sooner_wakes_the_poller(stepped: FakeCliniko) -> None:
    stepped.add("1")
    stepped.add("2", done_after=0)
    slow = asyncio.ensure_future(fire(trigger("1", poll_interval=600, deadline_in=None)))
    await until(lambda: stepped.time.sleeps == [600])  # the poller sleeps until "1" is due
    quick = asyncio.ensure_future(fire(trigger("2", poll_interval=5, deadline_in=None)))
    await until(lambda: len(stepped.time.sleeps) == 2)
    assert stepped.time.sleeps == [600, 5]  # woken, it re-planned for "2"
    stepped.time.now = START + 5
    [event] = await asyncio.wait_for(quick, 5)
    assert event["status"] == "success"
    assert stepped.asked == [["2"]]  # "1" is not due yet
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow


async def test_a_joining_waiter_with_an_earlier_deadline_wakes_the_poller(stepped: FakeCliniko) -> None:
    stepped.add("1")
    stepped.add("2")
    slow = asyncio.ensure_future(fire(trigger("1", poll_interval=600, deadline_in=None)))
    await until(lambda: stepped.time.sleeps == [600])
    soon = asyncio.ensure_future(fire(trigger("2", poll_interval=600, deadline_in=10)))
    await until(lambda: len(stepped.time.sleeps) == 2)
    assert stepped.time.sleeps == [600, 10]
    stepped.time.now = START + 10
    [event] = await asyncio.wait_for(soon, 5)
    assert event["reason"] == "timeout"
    assert stepped.requests == []
    slow.cancel()
    await asyncio.gather(slow, return_exceptions=True)


async def test_deadlines_fire_while_a_round_hangs(
    stepped: FakeCliniko, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poller_module, "DEADLINE_TICK", 0.01)
    asked: list[httpx.Request] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        await asyncio.Event().wait()  # Cliniko never answers (until the poller gives up on it)
        raise AssertionError("unreachable")

    stepped.handler = hang  # type: ignore[method-assign,assignment]
    stepped.add("1")
    first = asyncio.ensure_future(fire(trigger("1", poll_interval=30, deadline_in=40)))
    await until(lambda: stepped.time.sleeps == [30])
    stepped.time.now = START + 30
    await until(lambda: len(asked) == 1)  # the round at 30 asks about "1", and hangs
    poller = REGISTRY.active()["cliniko_default"]
    second = asyncio.ensure_future(fire(trigger("2", poll_interval=600, deadline_in=38)))
    await until(lambda: poller.waiting == 2)
    stepped.time.now = START + 37.99
    await asyncio.sleep(0.05)
    assert not second.done()
    stepped.time.now = START + 38  # "2", not asked, times out at its deadline
    [event] = await asyncio.wait_for(second, 5)
    assert event["reason"] == "timeout" and "Last error" not in event["message"]
    stepped.time.now = START + 42.99  # "1", asked, has a tenth of its interval more: until 43
    await asyncio.sleep(0.05)
    assert not first.done()
    stepped.time.now = START + 43
    [event] = await asyncio.wait_for(first, 5)
    assert event["reason"] == "timeout"
    assert event["message"].endswith("Last error: Cliniko had not answered the status check in flight")
    await until(lambda: poller.closed)  # nobody waits: the hung round is cancelled, the poller closes
    assert len(asked) == 1


async def test_a_waiter_due_later_than_planned_does_not_wake_the_poller(stepped: FakeCliniko) -> None:
    stepped.add("1")
    stepped.add("2")
    tasks = [asyncio.ensure_future(fire(trigger("1", poll_interval=60, deadline_in=None)))]
    await until(lambda: stepped.time.sleeps == [60])
    tasks.append(asyncio.ensure_future(fire(trigger("2", poll_interval=60, deadline_in=100))))
    await until(lambda: REGISTRY.active()["cliniko_default"].waiting == 2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert stepped.time.sleeps == [60]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_cancelling_the_poller_cancels_its_waiters_and_closes_it(stepped: FakeCliniko) -> None:
    stepped.add("1")
    stepped.add("2")
    tasks = [asyncio.ensure_future(fire(trigger(i, deadline_in=None))) for i in ("1", "1", "2")]
    await until(lambda: (p := REGISTRY.active().get("cliniko_default")) is not None and p.waiting == 3)
    [poller] = stepped.pollers
    assert poller._task is not None
    stepped.time.now = START + 30  # one round, so the hook has opened its client
    await until(lambda: len(stepped.requests) == 1)
    [hook] = stepped.hooks
    assert hook._client is not None
    poller._task.cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert poller.closed
    assert REGISTRY.active() == {}
    assert hook._client is None  # the HTTP client is closed
    with pytest.raises(RuntimeError, match="poller is closed; get a new one from the registry"):
        await poller.wait("1", 30, None)
    assert REGISTRY.get("cliniko_default") is not poller


async def test_a_closed_poller_is_replaced_for_the_next_trigger(fake: FakeCliniko) -> None:
    fake.add("1", done_after=0)
    [event] = await fire_all([trigger("1")])
    [first] = fake.pollers
    await until(lambda: first.closed)
    [hook] = fake.hooks
    assert hook._client is None
    [event] = await fire_all([trigger("1")])
    assert event["status"] == "success"
    assert len(fake.pollers) == 2


async def test_a_success_between_failures_restarts_the_count(
    fake: FakeCliniko, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add("42", done_after=100)
    busy = [httpx.Response(503, text="busy")] * 5  # one round's worth of the hook's attempts
    pending = httpx.Response(
        200, json={"patient_attachments": [{"id": "42", "processing_completed": False}], "links": {}}
    )
    fake.script = [*busy, pending, *busy]
    monkeypatch.setattr(REGISTRY, "factory", partial(REGISTRY.factory, max_failed_rounds=2))
    [event] = await fire_all([trigger("42", poll_interval=30)])
    assert event["status"] == "success"  # failed, answered, failed, done: never two failures in a row
    assert fake.times[-1] == 120


@pytest.mark.parametrize(("count", "per_round"), [(100, [1]), (101, [2]), (200, [2])])
async def test_at_most_100_ids_a_request(fake: FakeCliniko, count: int, per_round: list[int]) -> None:
    for i in range(1, count + 1):
        fake.add(str(i), done_after=0)
    events = await fire_all([trigger(str(i)) for i in range(1, count + 1)])
    assert [e["status"] for e in events] == ["success"] * count
    [poller] = fake.pollers
    assert poller.stats.requests_per_round == per_round
    assert poller.stats.waiting_per_round == [count]
    assert (poller.stats.rounds, poller.stats.requests) == (1, per_round[0])
    assert sorted(i for ids in fake.asked for i in ids) == sorted(str(i) for i in range(1, count + 1))


async def test_wait_many_registers_every_id_and_answers_by_id(fake: FakeCliniko) -> None:
    fake.add("1", done_after=0)
    fake.add("2")
    fake.archived.add("2")
    poller = REGISTRY.get("cliniko_default")
    payloads = await asyncio.wait_for(poller.wait_many(["1", "2", "3", "1"], 30, START + 60), 5)
    assert {key: value["status"] for key, value in payloads.items()} == {
        "1": "success",
        "2": "error",
        "3": "error",
    }
    assert [payloads["2"]["reason"], payloads["3"]["reason"]] == ["archived", "not_found"]
    assert fake.asked == [["1", "2", "3"]]  # one request for all of them
    assert len(fake.user_look_ups) == 1  # and, before it, the key's user (whose budget it draws on)


async def test_describe_blanks_secrets_and_keeps_one_short_line(fake: FakeCliniko) -> None:
    poller = REGISTRY.get("cliniko_default")
    poller._redact = Redactor(["s3cr3t"])
    assert poller._describe(RuntimeError("a\n  s3cr3t\tb")) == "a *** b"
    assert poller._describe(RuntimeError("x" * 600)) == "x" * 500
    assert poller._describe(RuntimeError()) == "RuntimeError"


async def test_cancelled_triggers_leave_and_the_last_one_closes_the_poller(fake: FakeCliniko) -> None:
    fake.add("1")
    tasks = [asyncio.ensure_future(fire(trigger("1", deadline_in=None))) for _ in range(3)]
    while not fake.requests:
        await asyncio.sleep(0)
    poller = REGISTRY.get("cliniko_default")
    assert poller.waiting == 3
    tasks[0].cancel()
    await asyncio.sleep(0)
    assert poller.waiting == 2
    for task in tasks[1:]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: poller.closed)  # the cancelled round settles its budget slot in a thread first
    assert REGISTRY.active() == {}


async def test_registry_gives_one_poller_per_connection_and_loop(fake: FakeCliniko) -> None:
    first = REGISTRY.get("cliniko_default")
    assert REGISTRY.get("cliniko_default") is first
    assert REGISTRY.get("other") is not first

    stale = first
    new_loop_poller: list[AttachmentPoller] = []

    def in_new_loop() -> None:
        async def get() -> None:
            new_loop_poller.append(REGISTRY.get("cliniko_default"))

        asyncio.run(get())

    await asyncio.to_thread(in_new_loop)
    assert new_loop_poller[0] is not stale
    assert new_loop_poller[0].loop is not asyncio.get_running_loop()
    # back in this loop, the other loop's poller is not reused
    assert REGISTRY.get("cliniko_default") is not new_loop_poller[0]


async def test_a_registry_makes_its_pollers_with_its_factory(fake: FakeCliniko) -> None:
    made: list[str] = []

    def factory(conn_id: str, **kwargs: Any) -> AttachmentPoller:
        made.append(conn_id)
        return REGISTRY.factory(conn_id, **kwargs)

    registry = PollerRegistry(factory)
    assert registry.active() == {}
    poller = registry.get("cliniko_default")
    assert made == ["cliniko_default"]
    assert registry.active() == {"cliniko_default": poller}
    assert REGISTRY.active() == {}  # registries share nothing


# --- against the sandbox -------------------------------------------------------------------------------


def many_attachments(sandbox: Any, monkeypatch: pytest.MonkeyPatch, count: int) -> list[str]:
    """Create ``count`` attachments through the real API (still processing for a few seconds)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLINIKO_DEFAULT",
        connection_json(SANDBOX_KEY, sandbox.base_url, requests_per_minute=100_000),
    )
    hook = ClinikoHook()
    patient = hook.create_patient("Trigger", "Many")
    with sandbox_faults(sandbox, processing_delay=max(3.0, count * 0.06)):
        return [create_attachment_via_api(hook, patient["id"])["id"] for _ in range(count)]


async def wait_for_all_against_sandbox(sandbox: Any, ids: list[str]) -> None:
    """Wait on ``ids`` plus one unknown id, counting the requests the sandbox gets."""
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
    REGISTRY.factory = AttachmentPoller
    try:
        triggers = [
            ProcessingCompletedTrigger(i, poll_interval=1.0, deadline=_time.time() + 120) for i in ids
        ]
        triggers.append(ProcessingCompletedTrigger("12345", poll_interval=1.0))
        tasks = [asyncio.ensure_future(fire(t)) for t in triggers]
        await asyncio.sleep(0.1)
        poller = REGISTRY.active()["cliniko_default"]
        events = [e[0] for e in await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)]
    finally:
        REGISTRY.factory = AttachmentPoller
    assert [e["status"] for e in events[:-1]] == ["success"] * len(ids)
    assert all(e["attachment"]["processing_completed"] for e in events[:-1])
    assert events[-1]["reason"] == "not_found"
    stats = sandbox_control(sandbox, "stats")
    polls = stats["requests_by_route"].get("GET /v1/patient_attachments") or stats["requests_by_route"].get(
        "GET /patient_attachments"
    )
    per_round = poller.stats.requests_per_round
    assert polls == poller.stats.requests == sum(per_round)
    assert max(per_round) <= math.ceil((len(ids) + 1) / 100)  # 100 ids a request, however many wait
    assert stats["requests_total"] == polls  # nothing else: no per-attachment requests


async def test_triggers_against_the_sandbox(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = await asyncio.to_thread(many_attachments, sandbox, monkeypatch, 120)
    await wait_for_all_against_sandbox(sandbox, ids)


@pytest.mark.slow
async def test_1000_triggers_against_the_sandbox(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = await asyncio.to_thread(many_attachments, sandbox, monkeypatch, 1000)
    await wait_for_all_against_sandbox(sandbox, ids)


async def test_recreated_trigger_carries_on_against_the_sandbox(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    [attachment_id] = await asyncio.to_thread(many_attachments, sandbox, monkeypatch, 1)
    first = ProcessingCompletedTrigger(attachment_id, poll_interval=0.5, deadline=_time.time() + 60)
    task = asyncio.ensure_future(fire(first))
    await asyncio.sleep(0.3)
    task.cancel()  # the triggerer stops: the trigger is cancelled mid-wait
    with pytest.raises(asyncio.CancelledError):
        await task
    classpath, kwargs = first.serialize()
    assert classpath.endswith("ProcessingCompletedTrigger")
    [event] = await fire_all([ProcessingCompletedTrigger(**kwargs)])
    assert event["status"] == "success"
    assert event["attachment"]["id"] == attachment_id
