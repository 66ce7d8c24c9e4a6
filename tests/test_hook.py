"""ClinikoHook and ClinikoAsyncHook with HTTP faked at the transport level."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from cliniko_provider.exceptions import (
    AirflowFailException,
    ClinikoAuthError,
    ClinikoClientError,
    ClinikoConfigError,
    ClinikoConnectionError,
    ClinikoInputError,
    ClinikoNotFoundError,
    ClinikoPermissionError,
    ClinikoServerError,
    ClinikoStorageLimitError,
    ClinikoValidationError,
)
from cliniko_provider.hooks.cliniko import ClinikoAsyncHook, ClinikoHook
from cliniko_provider.utils.budget import PROCESS_BUDGETS, WINDOW, MachineBudget, ProcessBudget
from cliniko_provider.utils.retry import RetryPolicy
from tests.conftest import connection_json
from tests.fake_http import USER, Answer, FakeClock, ScriptedAdapter, after_look_up, answering_user

KEY = "HoOkTeStSeCrEt-au3"
BASE = "https://api.au3.cliniko.com/v1"


@pytest.fixture(autouse=True)
def _connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY))
    PROCESS_BUDGETS.clear()
    yield
    PROCESS_BUDGETS.clear()


def make_hook(
    *answers: Answer, clock: FakeClock | None = None, user: dict[str, Any] | None = USER
) -> tuple[ClinikoHook, ScriptedAdapter, FakeClock]:
    clock = clock or FakeClock()
    hook = ClinikoHook(sleep=clock.sleep, clock=clock, rand=lambda: 0.5)
    adapter = ScriptedAdapter(list(answers), user=user)
    hook.session.mount("https://", adapter)
    hook.session.mount("http://", adapter)
    return hook, adapter, clock


def test_sends_basic_auth_user_agent_and_accept_to_the_shard() -> None:
    hook, adapter, _ = make_hook(Answer(200, {"id": "5", "first_name": "Ann"}))
    assert hook.get_patient("5")["first_name"] == "Ann"
    sent = after_look_up(adapter.requests)[0]
    assert sent.url == f"{BASE}/patients/5"
    assert sent.headers["Authorization"] == hook.settings.authorization
    assert sent.headers["User-Agent"] == "Cliniko Provider Tests (tests@cliniko-provider.example)"
    assert sent.headers["Accept"] == "application/json"


def test_5xx_backs_off_exponentially_then_succeeds() -> None:
    hook, adapter, clock = make_hook(Answer(502), Answer(503), Answer(500), Answer(200, {"id": "1"}))
    assert hook.get_attachment(1) == {"id": "1"}
    assert len(after_look_up(adapter.requests)) == 4
    # rand=0.5 → 3/4 of the ceiling: 1 s, 2 s, 4 s ceilings
    assert clock.sleeps == [0.75, 1.5, 3.0]


def test_backoff_jitter_stays_within_half_and_whole_ceiling() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_max=30.0)
    for attempt in range(1, 10):
        ceiling = min(30.0, 2 ** (attempt - 1))
        assert policy.backoff(attempt, lambda: 0.0) == ceiling / 2
        assert policy.backoff(attempt, lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)


def test_5xx_gives_up_after_max_attempts_with_clinikos_message() -> None:
    hook, adapter, _ = make_hook(*[Answer(500, "boom")] * 5)
    with pytest.raises(ClinikoServerError, match=r"Cliniko answered 500 to GET /patients/9: boom") as error:
        hook.get_patient(9)
    assert len(after_look_up(adapter.requests)) == 5
    assert not isinstance(error.value, AirflowFailException)  # Airflow's own retries may still help


def test_connection_errors_are_retried_then_reported() -> None:
    broken = requests.ConnectionError("connection refused")
    hook, adapter, clock = make_hook(*[Answer(raise_error=broken)] * 5)
    with pytest.raises(
        ClinikoConnectionError, match=r"Could not reach Cliniko at .* after 5 attempt"
    ) as raised:
        hook.get_patient(9)
    assert "Check the host/network" in str(raised.value) and "cliniko-sandbox" not in str(raised.value)
    assert len(after_look_up(adapter.requests)) == 5
    assert len(clock.sleeps) == 4


def test_429_waits_until_the_reset_header() -> None:
    clock = FakeClock(start=1_000.0)
    hook, adapter, _ = make_hook(
        Answer(429, "slow down", {"X-RateLimit-Reset": "1012"}), Answer(200, {"id": "3"}), clock=clock
    )
    assert hook.get_patient(3) == {"id": "3"}
    assert clock.sleeps == [12.5]  # until the reset, plus half a second for the header's resolution
    assert len(after_look_up(adapter.requests)) == 2


def test_429_honours_retry_after_without_reset() -> None:
    hook, _, clock = make_hook(Answer(429, "", {"Retry-After": "7"}), Answer(200, {"id": "3"}))
    hook.get_patient(3)
    assert clock.sleeps == [7.0]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RateLimit-Reset": "1600"},  # past the 65 s bound
        {"X-RateLimit-Reset": str(86_400 + 1000)},  # a day ahead
        {"X-RateLimit-Reset": "1000000000"},  # milliseconds (read as seconds: years ahead)
        {"X-RateLimit-Reset": "nan"},
        {"X-RateLimit-Reset": "inf"},
        {"X-RateLimit-Reset": "1e999"},
        {"X-RateLimit-Reset": "soon"},
        {"Retry-After": "-5"},
        {"Retry-After": "86400"},
        {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"},
        {"Retry-After": "not a date"},
        {},
    ],
)
def test_an_absurd_429_reset_is_a_bounded_backoff_shared_with_no_one(headers: dict[str, str]) -> None:
    clock = FakeClock(start=1_000.0)
    hook, adapter, _ = make_hook(Answer(429, "Too many", headers), Answer(200, {"id": "3"}), clock=clock)
    assert hook.get_patient(3) == {"id": "3"}
    assert clock.sleeps == [0.75]  # the first backoff (rand=0.5), nothing else
    assert len(after_look_up(adapter.requests)) == 2
    other, _, _ = make_hook(Answer(200, {}), clock=clock)
    other.get_patient(4)
    assert clock.sleeps == [0.75]  # the other user of the key is not held back


def test_429_makes_every_user_of_the_key_wait() -> None:
    clock = FakeClock(start=1_000.0)
    first, _, _ = make_hook(Answer(429, "", {"X-RateLimit-Reset": "1030"}), Answer(200, {}), clock=clock)
    first.get_patient(1)
    assert clock.now == pytest.approx(1030.5)
    other, _, _ = make_hook(Answer(200, {}), clock=clock)
    clock.now = 1_010.0  # another task of the same key asks before the reset
    other.get_patient(2)
    assert clock.sleeps[-1] == pytest.approx(20.5)


@pytest.mark.parametrize(
    ("status", "body", "error_type", "message"),
    [
        (
            401,
            "HTTP Basic: Access denied",
            ClinikoAuthError,
            r"401 to GET /patients/4: HTTP Basic: Access denied\. Check the API key",
        ),
        (403, '{"message": "Forbidden"}', ClinikoPermissionError, r"403 .*Forbidden.*lacks permission"),
        (404, '{"message": "Not found"}', ClinikoNotFoundError, r"404 .*Not found.*Check the id"),
        (
            422,
            '{"message": "Validation Failed", "errors": {"first_name": "can\'t be blank"}}',
            ClinikoValidationError,
            r"422 .*Validation Failed \(first_name can't be blank\)",
        ),
        (
            422,
            '{"message": "Validation Failed", "errors": {"base": "File storage limit reached"}}',
            ClinikoStorageLimitError,
            r"storage limit reached.*retrying will not help",
        ),
        (400, "Requires a user agent", ClinikoClientError, r"400 .*Requires a user agent"),
    ],
)
def test_4xx_fails_at_once_with_a_typed_error(
    status: int, body: str, error_type: type[Exception], message: str
) -> None:
    hook, adapter, clock = make_hook(Answer(status, body))
    with pytest.raises(error_type, match=message) as error:
        hook.get_patient(4)
    assert isinstance(error.value, AirflowFailException)
    assert len(after_look_up(adapter.requests)) == 1 and clock.sleeps == []


def test_validation_error_carries_field_errors() -> None:
    body = {"message": "Validation Failed", "errors": {"temp_attachment_url": "is invalid"}}
    hook, _, _ = make_hook(Answer(422, body))
    with pytest.raises(ClinikoValidationError) as error:
        hook.create_attachment(1, "https://bucket/x", "d")
    assert error.value.errors == {"temp_attachment_url": "is invalid"}
    assert error.value.status == 422


def test_create_is_not_repeated_after_a_5xx_but_is_after_a_429() -> None:
    hook, adapter, _ = make_hook(Answer(500, "oops"))
    with pytest.raises(ClinikoServerError):
        hook.create_attachment(1, "https://bucket/x")
    assert len(after_look_up(adapter.requests)) == 1

    hook, adapter, _ = make_hook(Answer(429, "", {"Retry-After": "1"}), Answer(201, {"id": "77"}))
    assert hook.create_attachment(1, "https://bucket/x") == {"id": "77"}
    assert len(adapter.requests) == 2  # the key's user is known in this process by now


def test_pagination_follows_next_lazily_with_100_per_page() -> None:
    page1 = {
        "patients": [{"id": "1"}, {"id": "2"}],
        "links": {"next": f"{BASE}/patients?page=2&per_page=100"},
    }
    page2 = {"patients": [{"id": "3"}], "links": {}}
    hook, adapter, _ = make_hook(Answer(200, page1), Answer(200, page2))
    found = hook.find_patients("email:=a@b.example", old_reference_id="R-1")
    assert adapter.requests == []  # nothing fetched before iteration, not even GET /user
    assert next(found)["id"] == "1"
    assert len(after_look_up(adapter.requests)) == 1
    assert [p["id"] for p in found] == ["2", "3"]
    first, second = after_look_up(adapter.requests)
    assert "per_page=100" in (first.url or "")
    assert "q%5B%5D=email%3A%3Da%40b.example" in (first.url or "")
    assert "q%5B%5D=old_reference_id%3A%3DR-1" in (first.url or "")
    assert second.url == f"{BASE}/patients?page=2&per_page=100"


def test_list_attachments_of_a_patient_including_archived() -> None:
    hook, adapter, _ = make_hook(Answer(200, {"patient_attachments": [{"id": "9"}], "links": {}}))
    assert list(hook.list_attachments("description:~ref", patient_id="12", include_archived=True)) == [
        {"id": "9"}
    ]
    url = after_look_up(adapter.requests)[0].url or ""
    assert url.startswith(f"{BASE}/patients/12/patient_attachments?")
    assert "archived_at%3A%2A" in url


def test_presign_archive_and_description_limit() -> None:
    presign = {
        "url": "https://bucket/",
        "fields": {"key": "k", "policy": "POLICYVALUE", "x-amz-signature": "SIGNATURE"},
    }
    hook, adapter, _ = make_hook(Answer(200, presign), Answer(204, ""))
    assert hook.get_presigned_post(5) == presign
    hook.archive_attachment(8)
    assert after_look_up(adapter.requests)[1].method == "POST"
    assert (after_look_up(adapter.requests)[1].url or "").endswith("/patient_attachments/8/archive")
    with pytest.raises(ClinikoInputError, match="256 characters long; Cliniko takes at most 255"):
        hook.create_attachment(1, "https://bucket/k", "x" * 256)


def test_secrets_are_masked_and_never_logged_or_raised(caplog: pytest.LogCaptureFixture) -> None:
    from airflow.sdk._shared.secrets_masker import _secrets_masker  # the masker mask_secret feeds

    caplog.set_level(logging.DEBUG)
    presign = {
        "url": "https://bucket/",
        "fields": {"policy": "POLICYVALUE123", "x-amz-signature": "SIGVALUE123"},
    }
    hook, _, _ = make_hook(Answer(500, "x"), Answer(200, presign), Answer(401, "HTTP Basic: Access denied"))
    hook.get_presigned_post(1)
    with pytest.raises(ClinikoAuthError) as error:
        hook.get_patient(1)
    masker = _secrets_masker()
    for secret in (KEY, hook.settings.authorization.split()[1], "POLICYVALUE123", "SIGVALUE123"):
        assert secret not in caplog.text
        assert secret not in str(error.value)
        assert secret not in masker.redact(f"leak {secret} here")


def test_test_connection_reports_one_line() -> None:
    hook, adapter, _ = make_hook(Answer(200, {"first_name": "Ann", "last_name": "Lee"}), user=None)
    assert hook.test_connection() == (True, f"Connected to Cliniko at {BASE} as Ann Lee.")
    assert len(adapter.requests) == 1  # GET /user once: the test is the look-up
    hook, adapter, _ = make_hook(Answer(401, "HTTP Basic: Access denied"), Answer(500), user=None)
    ok, message = hook.test_connection()
    assert not ok and "401" in message and "Check the API key" in message and "\n" not in message
    assert len(adapter.requests) == 1


def test_test_connection_without_user_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, user_agent=""))
    ok, message = ClinikoHook().test_connection()
    assert not ok and "no User-Agent" in message


def test_test_connection_to_an_unreachable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, "http://127.0.0.1:9/v1"))
    ok, message = ClinikoHook().test_connection()
    assert not ok and "Could not reach Cliniko at http://127.0.0.1:9/v1" in message and "refused" in message
    assert "Is `cliniko-sandbox` running?" in message  # a loopback host is the sandbox's


def test_bad_connection_is_a_config_error_that_does_not_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json("k-au1", "http://example.com"))
    with pytest.raises(ClinikoConfigError) as error:
        ClinikoHook().get_patient(1)
    assert isinstance(error.value, AirflowFailException)


def test_rate_budget_holds_the_201st_request_until_the_window_frees() -> None:
    budget = ProcessBudget(per_minute=200, max_block=65)
    waits = [budget.reserve(now=1000.0 + i * 0.01) for i in range(200)]
    assert waits == [0.0] * 200
    assert budget.reserve(now=1010.0) == pytest.approx(WINDOW - 10)  # the first slot frees at 1000 + WINDOW


def test_rate_budget_is_shared_through_its_file(tmp_path: Path) -> None:
    """Two budgets on one file behave as one: what one process sends, the other counts."""
    clock = FakeClock(100.0)
    worker, triggerer = (MachineBudget("k", 3, 65, state_dir=tmp_path, clock=clock) for _ in range(2))
    assert [worker.reserve(now=100.0), triggerer.reserve(now=100.5), worker.reserve(now=101.0)] == [0, 0, 0]
    assert triggerer.reserve(now=102.0) == pytest.approx(WINDOW - 2)  # frees when the first leaves the window
    clock.now = 400.0
    worker.block_until(430.0)
    assert triggerer.reserve(now=400.0) == pytest.approx(30.0)


def test_rate_budget_for_key_keeps_the_key_out_of_the_file_name(monkeypatch: pytest.MonkeyPatch) -> None:
    hook, _, _ = make_hook(Answer(200, {}))
    hook.get_patient(1)
    assert isinstance(hook.budget, MachineBudget)
    assert KEY not in str(hook.budget.path)
    assert KEY not in hook.budget.path.read_text()


async def test_async_hook_shares_settings_policy_and_fetches_100_ids_at_once() -> None:
    seen: list[httpx.Request] = []
    script = [
        httpx.Response(503, text="busy"),
        httpx.Response(429, headers={"X-RateLimit-Reset": "1005"}, text=""),
        httpx.Response(200, json={"patient_attachments": [{"id": "2"}, {"id": "10"}], "links": {}}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return script.pop(0)

    clock = FakeClock(start=1_000.0)
    looked_up: list[httpx.Request] = []
    transport = httpx.MockTransport(answering_user(handler, asked=looked_up))
    hook = ClinikoAsyncHook(asleep=clock.asleep, clock=clock, rand=lambda: 0.0, transport=transport)
    try:
        records = await hook.aget_attachments(["10", "2", 2])
    finally:
        await hook.aclose()
    assert len(looked_up) == 1  # the key's user, once, before the first call
    assert set(records) == {"2", "10"}
    assert clock.sleeps == [0.5, pytest.approx(5.0)]  # backoff after 503, then until the 429 reset
    params = seen[-1].url.params
    assert params.get_list("q[]") == ["id:=2,10", "archived_at:*"]
    assert params["per_page"] == "100"
    assert seen[-1].headers["authorization"].startswith("Basic ")


async def test_async_hook_raises_typed_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"message": "Not found"})

    hook = ClinikoAsyncHook(transport=httpx.MockTransport(handler))
    with pytest.raises(ClinikoNotFoundError):
        await hook.aget_attachment(5)
    await hook.aclose()


def _unused(*_: Any) -> None:  # keeps helpers importable for other test modules
    pass
