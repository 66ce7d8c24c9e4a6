"""The retry runner's rules, with an injected clock (nothing really sleeps)."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from cliniko_provider.utils.budget import WINDOW, ProcessBudget
from cliniko_provider.utils.retry import (
    API_CALL,
    API_CREATE,
    MAX_RATE_LIMITS,
    RATE_LIMIT_MARGIN,
    S3_UPLOAD,
    S3_UPLOAD_REFRESHING,
    Action,
    CallState,
    Deadline,
    DeadlineExceeded,
    Decision,
    Failure,
    RetryPolicy,
    RetryRunner,
    final,
)
from tests.fake_http import FakeClock

NOW = 1_000_000.0


class Boom(Exception):
    pass


def failure(status: int | None, **headers: str) -> Failure:
    return Failure(status, {k.replace("_", "-"): v for k, v in headers.items()}, lambda n: Boom(f"after {n}"))


def decide(
    policy: RetryPolicy, *failures: Failure, rules: Any = API_CALL
) -> tuple[list[Decision], CallState]:
    state = CallState()
    return [policy.decide(item, rules, state, NOW, lambda: 0.5) for item in failures], state


# --- the policy: I/O-free decisions --------------------------------------------------------------------


def test_5xx_and_connection_failures_spend_attempts_up_to_max_attempts() -> None:
    decisions, state = decide(RetryPolicy(max_attempts=3), failure(500), failure(None), failure(503))
    assert [d.action for d in decisions] == [Action.RETRY, Action.RETRY, Action.FAIL]
    assert [d.wait for d in decisions[:2]] == [0.75, 1.5]
    assert state.attempts == 3


def test_max_attempts_of_one_never_retries() -> None:
    decisions, state = decide(RetryPolicy(max_attempts=1), failure(502))
    assert decisions == [Decision(Action.FAIL)] and state.attempts == 1


def test_a_create_is_not_repeated_after_a_5xx_or_a_broken_connection() -> None:
    for status in (500, None):
        decisions, _ = decide(RetryPolicy(), failure(status), rules=API_CREATE)
        assert decisions == [Decision(Action.FAIL)]


def test_a_create_waits_out_a_429() -> None:
    decisions, _ = decide(RetryPolicy(), failure(429, X_RateLimit_Reset=str(NOW + 3)), rules=API_CREATE)
    assert decisions[0].action is Action.RATE_LIMITED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 499])
def test_other_4xx_fail_at_once(status: int) -> None:
    assert decide(RetryPolicy(), failure(status))[0] == [Decision(Action.FAIL)]


def test_429_with_a_reset_waits_until_it_shares_it_and_spends_no_attempt() -> None:
    policy = RetryPolicy(max_attempts=1)
    decisions, state = decide(policy, *[failure(429, X_RateLimit_Reset=str(NOW + 10))] * 3, failure(500))
    assert [d.action for d in decisions] == [Action.RATE_LIMITED] * 3 + [Action.FAIL]
    assert decisions[0].wait == 10 + RATE_LIMIT_MARGIN
    assert decisions[0].share_until == NOW + 10 + RATE_LIMIT_MARGIN
    assert (state.attempts, state.rate_limits, state.rate_waited) == (1, 3, 3 * (10 + RATE_LIMIT_MARGIN))


def test_a_reset_in_the_past_waits_only_the_margin() -> None:
    decisions, _ = decide(RetryPolicy(), failure(429, X_RateLimit_Reset=str(NOW - 100)))
    assert decisions[0].wait == RATE_LIMIT_MARGIN


def test_a_wait_exactly_at_its_cap_is_kept_and_one_past_it_is_not() -> None:
    policy = RetryPolicy(max_rate_limit_wait=10)
    at_cap = decide(policy, failure(429, X_RateLimit_Reset=str(NOW + 10 - RATE_LIMIT_MARGIN)))[0][0]
    assert (at_cap.wait, at_cap.share_until) == (10, NOW + 10)
    past = decide(policy, failure(429, X_RateLimit_Reset=str(NOW + 10.001 - RATE_LIMIT_MARGIN)))[0][0]
    assert past.share_until is None and past.wait == 0.75


@pytest.mark.parametrize(
    "headers",
    [
        {"X_RateLimit_Reset": str(NOW + 86_400)},
        {"X_RateLimit_Reset": str(NOW * 1000)},
        {"X_RateLimit_Reset": "nan"},
        {"X_RateLimit_Reset": "-inf"},
        {"X_RateLimit_Reset": "inf"},
        {"X_RateLimit_Reset": "tomorrow"},
        {"Retry_After": "-1"},
        {"Retry_After": "nan"},
        {"Retry_After": "66"},
        {"Retry_After": "Thu, 01 Jan 2099 00:00:00 GMT"},
        {"Retry_After": "Thu, 01 Jan 1970 00:00:00 GMT"},
        {"Retry_After": "garbage, 99 Foo"},
        {},
    ],
)
def test_an_absurd_reset_is_a_bounded_backoff_shared_with_no_one(headers: dict[str, str]) -> None:
    decisions, state = decide(RetryPolicy(), failure(429, **headers))
    assert decisions == [Decision(Action.RATE_LIMITED, 0.75, None)]
    assert state.attempts == 0


def test_absurd_backoff_grows_but_never_past_max_rate_limit_wait() -> None:
    policy = RetryPolicy(max_rate_limit_wait=5, backoff_max=30)
    decisions, _ = decide(policy, *[failure(429)] * 6)
    assert [d.wait for d in decisions] == [0.75, 1.5, 3.0, 5, 5, 5]


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    policy = RetryPolicy()
    assert policy.rate_limit_wait({"Retry-After": "7"}, NOW) == 7
    assert policy.rate_limit_wait({"Retry-After": "0"}, NOW) == 0
    date = format_datetime(datetime.fromtimestamp(NOW + 30, tz=timezone.utc), usegmt=True)
    assert policy.rate_limit_wait({"Retry-After": date}, NOW) == 30
    assert policy.rate_limit_wait({"Retry-After": date}, NOW + 31) is None  # a date in the past
    assert policy.rate_limit_wait({"Retry-After": "65"}, NOW) == 65
    assert policy.rate_limit_wait({"Retry-After": "65.01"}, NOW) is None


def test_x_ratelimit_reset_comes_before_retry_after() -> None:
    headers = {"X-RateLimit-Reset": str(NOW + 4), "Retry-After": "20"}
    assert RetryPolicy().rate_limit_wait(headers, NOW) == 4 + RATE_LIMIT_MARGIN


def test_the_total_429_wait_of_one_call_is_bounded() -> None:
    policy = RetryPolicy(max_rate_limit_wait=10)
    assert policy.max_rate_limit_total == 50
    reset = failure(429, Retry_After="10")
    decisions, state = decide(policy, *[reset] * 6)
    assert [d.action for d in decisions] == [Action.RATE_LIMITED] * 5 + [Action.FAIL]
    assert state.rate_waited == 50  # exactly the bound is still waited


def test_the_number_of_429s_of_one_call_is_bounded_even_without_waits() -> None:
    decisions, _ = decide(RetryPolicy(max_rate_limit_wait=0), *[failure(429)] * (MAX_RATE_LIMITS + 1))
    assert [d.action for d in decisions].count(Action.RATE_LIMITED) == MAX_RATE_LIMITS
    assert decisions[-1].action is Action.FAIL


def test_s3_403_refreshes_the_presign_at_most_max_refreshes_times() -> None:
    decisions, state = decide(RetryPolicy(max_refreshes=2), *[failure(403)] * 3, rules=S3_UPLOAD_REFRESHING)
    assert [d.action for d in decisions] == [Action.REFRESH, Action.REFRESH, Action.FAIL]
    assert decide(RetryPolicy(), failure(403), rules=S3_UPLOAD)[0] == [Decision(Action.FAIL)]
    assert state.attempts == 0


def test_s3_slowdown_is_retried_like_a_5xx() -> None:
    decisions, state = decide(RetryPolicy(), failure(503), rules=S3_UPLOAD)
    assert decisions[0].action is Action.RETRY and state.attempts == 1


def test_backoff_doubles_to_its_ceiling() -> None:
    policy = RetryPolicy(backoff_base=1, backoff_max=8)
    assert [policy.backoff(n, lambda: 0.0) for n in range(1, 6)] == [0.5, 1, 2, 4, 4]
    assert policy.backoff(4, lambda: 1.0) == 8


# --- the runner: carries decisions out ------------------------------------------------------------------


def runner(clock: FakeClock, policy: RetryPolicy | None = None, per_minute: float = 1000) -> RetryRunner:
    return RetryRunner(
        policy or RetryPolicy(),
        ProcessBudget(per_minute, 65, clock),
        clock=clock,
        sleep=clock.sleep,
        asleep=clock.asleep,
        rand=lambda: 0.5,
    )


def script(clock: FakeClock, *results: Any) -> Any:
    answers = list(results)
    calls: list[float] = []

    def attempt() -> Any:
        calls.append(clock.now)
        return answers.pop(0)

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


def test_runner_returns_the_first_result_after_waiting_as_decided() -> None:
    clock = FakeClock(NOW)
    attempt = script(clock, failure(500), failure(429, Retry_After="3"), "done")
    assert runner(clock).run("GET /x", attempt) == "done"
    assert clock.sleeps == [0.75, 3]


def test_runner_raises_the_final_error_with_the_attempts_made() -> None:
    clock = FakeClock(NOW)
    with pytest.raises(Boom, match="after 2"):
        runner(clock, RetryPolicy(max_attempts=2)).run("GET /x", script(clock, failure(None), failure(None)))


def test_runner_shares_a_sane_reset_with_the_key_but_not_an_absurd_one() -> None:
    clock = FakeClock(NOW)
    run = runner(clock)
    run.run("GET /x", script(clock, failure(429, X_RateLimit_Reset=str(NOW + 86_400)), "ok"))
    assert run.budget.reserve(clock.now) == 0
    run.run("GET /x", script(clock, failure(429, Retry_After="20"), "ok"))
    assert run.budget.reserve(clock.now - 5) == pytest.approx(5)


def test_unpaced_calls_neither_book_slots_nor_share_resets() -> None:
    clock = FakeClock(NOW)
    run = runner(clock, per_minute=1)
    run.run("S3 upload", script(clock, failure(429, Retry_After="20"), "ok"), S3_UPLOAD)
    assert run.budget.reserve(clock.now) == 0  # the first booking: S3 took none, and shared no hold


def test_paced_calls_wait_for_the_budget_before_each_attempt() -> None:
    clock = FakeClock(NOW)
    run = runner(clock, per_minute=1)
    attempt = script(clock, failure(500), "ok")
    assert run.run("GET /x", attempt) == "ok"
    assert attempt.calls == [NOW, NOW + WINDOW]  # the second attempt waited for the window, not only 0.75 s


def test_a_slot_counts_from_its_answer_not_from_its_booking() -> None:
    # A request that went out late or took long was counted by Cliniko some time before its answer:
    # the next request of a full window waits a window from the answer.
    clock = FakeClock(NOW)
    run = runner(clock, per_minute=1)

    def slow() -> str:
        clock.now += 7.5
        return "ok"

    assert run.run("GET /slow", slow) == "ok"
    attempt = script(clock, "ok")
    assert run.run("GET /x", attempt) == "ok"
    assert attempt.calls == [NOW + 7.5 + WINDOW]


async def test_async_slots_count_from_their_answers_too() -> None:
    clock = FakeClock(NOW)
    run = runner(clock, per_minute=1)

    async def slow() -> str:
        clock.now += 3.0
        return "ok"

    assert await run.arun("GET /slow", slow) == "ok"
    assert await run.budget.areserve(clock.now) == pytest.approx(WINDOW)


def test_refresh_is_called_before_the_next_attempt() -> None:
    clock = FakeClock(NOW)
    refreshed: list[float] = []
    attempt = script(clock, failure(403), failure(403), "ok")
    result = runner(clock).run("S3", attempt, S3_UPLOAD_REFRESHING, lambda: refreshed.append(clock.now))
    assert result == "ok" and len(refreshed) == 2 and clock.sleeps == []


def test_refresh_rules_without_a_refresh_fail() -> None:
    clock = FakeClock(NOW)
    with pytest.raises(Boom):
        runner(clock).run("S3", script(clock, failure(403)), S3_UPLOAD_REFRESHING)


def test_runner_logs_what_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(NOW)
    caplog.set_level("INFO")
    bad = Failure(503, {}, final(Boom()), "SlowDown: slow")
    runner(clock).run("S3 upload", script(clock, bad, failure(429), "ok"))
    assert "S3 upload: 503 (SlowDown: slow) on attempt 1 of 5; retrying in 0.8 s" in caplog.text
    assert "rate limited (429); waiting 0.8 s (no usable reset: backing off, not counted" in caplog.text


async def test_async_runner_follows_the_same_rules() -> None:
    clock = FakeClock(NOW)
    answers: list[Any] = [failure(500), failure(429, Retry_After="4"), "done"]

    async def attempt() -> Any:
        return answers.pop(0)

    run = runner(clock)
    assert await run.arun("GET /x", attempt) == "done"
    assert clock.sleeps == [0.75, 4]
    assert await run.budget.areserve(clock.now - 2) == pytest.approx(2)


async def test_async_runner_raises_the_final_error() -> None:
    clock = FakeClock(NOW)

    async def attempt() -> Any:
        return failure(None)

    with pytest.raises(Boom, match="after 1"):
        await runner(clock, RetryPolicy(max_attempts=1)).arun("GET /x", attempt)


async def test_async_runner_needs_an_async_sleep() -> None:
    clock = FakeClock(NOW)
    bare = RetryRunner(RetryPolicy(), ProcessBudget(10, 65, clock), clock=clock)

    async def attempt() -> str:
        return "x"

    with pytest.raises(TypeError, match="asleep"):
        await bare.arun("GET /x", attempt)


def test_final_raises_the_same_error_whatever_the_attempts() -> None:
    error = Boom("x")
    assert final(error)(1) is error and final(error)(7) is error


def test_runner_logs_its_pacing(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(NOW)
    caplog.set_level("INFO")
    run = runner(clock, per_minute=1)
    run.run("GET /x", script(clock, "a"))
    run.run("GET /x", script(clock, "b"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"Pacing requests to stay under Cliniko's rate limit: waiting {WINDOW:.1f} s")
    ]
    assert clock.sleeps == [WINDOW]


async def test_async_runner_paces_and_shares_like_the_sync_one(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(NOW)
    caplog.set_level("INFO")
    run = runner(clock, per_minute=1)
    answers: list[Any] = [failure(429, Retry_After="5"), "done"]

    async def attempt() -> Any:
        return answers.pop(0)

    assert await run.arun("GET /x", attempt) == "done"
    assert clock.sleeps == [5, WINDOW - 5]  # the reset, then the window's free slot
    assert f"waiting {WINDOW - 5:.1f} s" in caplog.text


async def test_async_unpaced_calls_book_nothing_and_share_nothing() -> None:
    clock = FakeClock(NOW)
    run = runner(clock, per_minute=1)
    answers: list[Any] = [failure(429, Retry_After="5"), "done"]

    async def attempt() -> Any:
        return answers.pop(0)

    assert await run.arun("S3 upload", attempt, S3_UPLOAD) == "done"
    assert clock.sleeps == [5]
    assert await run.budget.areserve(clock.now) == 0


async def test_async_runner_cannot_refresh_so_a_403_fails() -> None:
    clock = FakeClock(NOW)

    async def attempt() -> Any:
        return failure(403)

    with pytest.raises(Boom):
        await runner(clock).arun("S3", attempt, S3_UPLOAD_REFRESHING)


def test_a_deadline_passes_at_its_time_moves_when_extended_and_names_itself() -> None:
    now = [100.0]
    deadline = Deadline(1.5, clock=lambda: now[0])
    assert deadline.remaining() == 1.5 and not deadline.passed()
    deadline.check()  # not yet
    now[0] = 101.5
    assert deadline.passed()
    with pytest.raises(
        DeadlineExceeded, match=r"^no complete answer within the 1\.5 s deadline \(the connection"
    ):
        deadline.check()
    deadline.extend(0.25)
    assert deadline.remaining() == 0.25 and not deadline.passed()
    assert deadline.seconds == 1.5  # the message names the connection's timeout, not the extension
