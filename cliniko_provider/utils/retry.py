"""The one retry runner every call goes through: API requests (sync and async), the S3 upload, the create.

Split as httpx splits its transports from its decisions: :class:`RetryPolicy` decides, without any I/O,
what follows a failed attempt (:meth:`RetryPolicy.decide`); :class:`RetryRunner` carries the decision
out (paces with the key's rate budget, sleeps, shares a 429's reset), sync or async; the hook module
owns the two transports (``requests`` and ``httpx``) that turn one HTTP exchange into a result or a
:class:`Failure`.

The rules:

- A 429 is an instruction to wait, not a failed attempt. A usable reset (``X-RateLimit-Reset`` or
  ``Retry-After``, seconds or HTTP date) of at most ``max_rate_limit_wait`` is waited for and shared
  with every user of the key. A reset past that bound, in milliseconds, negative, infinite or not a
  number is replaced by a bounded backoff and shared with no one. The waits of one call for 429s add
  up to at most ``RATE_LIMIT_TOTAL_FACTOR`` x ``max_rate_limit_wait`` (5 min 25 s by default), and
  at most ``MAX_RATE_LIMITS`` 429s are waited out; then the call fails.
- Attempts count 5xx answers (S3's ``503 SlowDown`` included) and connection failures only; after
  ``max_attempts`` of them the call fails. A call that is not idempotent (a create) is never repeated
  after one: it may have been carried out.
- S3's 403 means the presign expired or was refused: when the call can refresh it, it does so (at most
  ``max_refreshes`` times) and tries again at once.
- Anything else (4xx) fails at once.
- Each attempt has a total deadline (:class:`Deadline`, the connection's ``timeout``): the transports
  end an attempt whose answer has not come whole by then, and report it as a failure without an
  answer, so it is retried like a broken connection.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

from cliniko_provider.utils.budget import RateBudget

RATE_LIMIT_MARGIN = 0.5  # seconds added to X-RateLimit-Reset, which has one-second resolution
RATE_LIMIT_TOTAL_FACTOR = 5  # one call waits for 429s at most this many times max_rate_limit_wait
MAX_RATE_LIMITS = 50  # 429s one call waits out at most (bounds a server answering 429 with no wait)

T = TypeVar("T")
log = logging.getLogger(__name__)


class Log(Protocol):
    """The logging methods the runner uses (a stdlib or an Airflow logger)."""

    def info(self, event: str, *args: Any) -> Any: ...

    def warning(self, event: str, *args: Any) -> Any: ...


class DeadlineExceeded(TimeoutError):
    """An attempt's answer had not come whole by its :class:`Deadline` (raised by the transports' reads)."""


class Deadline:
    """The time one attempt has in all: connect, answer and body, on the monotonic clock.

    A wall-clock jump neither shortens nor stretches it.

    :param seconds: the time allowed (the connection's ``timeout``).
    :param clock: a monotonic clock.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.at = clock() + seconds

    def extend(self, seconds: float) -> None:
        """Move the deadline later (a download earns time by the bytes it receives).

        :param seconds: the time added.
        """
        self.at += seconds

    def remaining(self) -> float:
        """Seconds left; 0 or less once the deadline has passed."""
        return self.at - self._clock()

    def passed(self) -> bool:
        """Whether the deadline has passed."""
        return self.remaining() <= 0

    def check(self) -> None:
        """Raise :class:`DeadlineExceeded` once the deadline has passed."""
        if self.passed():
            raise DeadlineExceeded(self.reason())

    def reason(self) -> str:
        """What went wrong, for a :attr:`Failure.reason` and the final error (names the deadline)."""
        return (
            f"no complete answer within the {self.seconds:g} s deadline (the connection's 'timeout' extra, "
            "which bounds connect, answer and body together)"
        )


@dataclass(frozen=True)
class Failure:
    """One failed attempt, as a transport saw it.

    :param status: the HTTP status, or ``None`` when no answer came (connection error, timeout).
    :param headers: the answer's headers (empty without an answer).
    :param error: builds the exception to raise when the failure is final, given the attempts made.
    :param reason: a short description for the log (no secrets).
    """

    status: int | None
    headers: Mapping[str, str]
    error: Callable[[int], Exception]
    reason: str = ""


def final(error: Exception) -> Callable[[int], Exception]:
    """Return a :attr:`Failure.error` that raises ``error`` whatever the attempts made.

    :param error: the exception.
    """
    return lambda _attempts: error


@dataclass(frozen=True)
class CallRules:
    """What one kind of call allows.

    :param idempotent: False for creates: never repeated after a 5xx or a broken connection.
    :param paced: True for Cliniko's API (books a slot of the key's rate budget before each attempt);
        False for S3, which has no such budget.
    :param refresh_on_403: True for the S3 upload: a 403 means "fetch a fresh presign, try again".

    Only paced calls share a 429's reset with the key's other users (S3's throttling is not Cliniko's).
    """

    idempotent: bool = True
    paced: bool = True
    refresh_on_403: bool = False


API_CALL = CallRules()
API_CREATE = CallRules(idempotent=False)
UNPACED_CALL = CallRules(paced=False)
S3_UPLOAD = CallRules(paced=False)
S3_UPLOAD_REFRESHING = CallRules(paced=False, refresh_on_403=True)


class Action(enum.Enum):
    """What follows a failed attempt."""

    RETRY = "retry"  # wait, then try again: one attempt spent
    RATE_LIMITED = "rate_limited"  # wait for the rate limit, then try again: no attempt spent
    REFRESH = "refresh"  # refresh the presign, then try again at once
    FAIL = "fail"  # raise the failure's error


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one failure.

    :param action: what to do.
    :param wait: seconds to wait before the next attempt.
    :param share_until: for a sane 429, the UNIX time until which every user of the key holds back.
    """

    action: Action
    wait: float = 0.0
    share_until: float | None = None


@dataclass
class CallState:
    """What one call has spent so far.

    :param attempts: attempts spent (5xx answers and connection failures; the first attempt is 1).
    :param rate_limits: 429s waited out.
    :param rate_waited: seconds waited for 429s.
    :param refreshes: presigns refreshed.
    """

    attempts: int = 0
    rate_limits: int = 0
    rate_waited: float = 0.0
    refreshes: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a call again, and how long to wait first. Makes no I/O.

    :param max_attempts: attempts counted in all (5xx and connection failures), the first included.
    :param backoff_base: first backoff in seconds; doubles each attempt.
    :param backoff_max: ceiling of one backoff.
    :param max_rate_limit_wait: longest single wait for a 429; also bounds what is shared.
    :param max_refreshes: fresh presigns fetched after S3 answers 403, per upload.
    """

    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_rate_limit_wait: float = 65.0
    max_refreshes: int = 2

    @property
    def max_rate_limit_total(self) -> float:
        """The most one call waits for 429s in all, in seconds."""
        return RATE_LIMIT_TOTAL_FACTOR * self.max_rate_limit_wait

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Exponential backoff with jitter: half fixed, half random.

        :param attempt: the attempt that just failed (1 for the first).
        :param rand: a source of floats in [0, 1).
        """
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return float(ceiling / 2 + ceiling / 2 * rand())

    def rate_limit_wait(self, headers: Mapping[str, str], now: float) -> float | None:
        """Seconds until the rate limit resets, when the 429's headers give a usable reset, else None.

        ``X-RateLimit-Reset`` (a UNIX time in seconds) first, then ``Retry-After`` (seconds or an HTTP
        date). A reset more than ``max_rate_limit_wait`` away (a day ahead, milliseconds), not a number,
        infinite or not finite gives None.

        :param headers: the 429 answer's headers (a case-insensitive mapping).
        :param now: the current UNIX time.
        """
        wait: float | None = None
        reset = headers.get("X-RateLimit-Reset")
        retry_after = headers.get("Retry-After")
        if reset:
            number = _finite(reset)
            wait = None if number is None else max(0.0, number - now) + RATE_LIMIT_MARGIN
        elif retry_after:
            number = _finite(retry_after)
            if number is None:
                try:
                    number = parsedate_to_datetime(retry_after.strip()).timestamp() - now
                except (TypeError, ValueError, IndexError, OverflowError):
                    number = None
            wait = None if number is None or number < 0 else number
        if wait is None or not wait <= self.max_rate_limit_wait:
            return None
        return wait

    def decide(
        self,
        failure: Failure,
        rules: CallRules,
        state: CallState,
        now: float,
        rand: Callable[[], float] = random.random,
    ) -> Decision:
        """Decide what follows a failed attempt, and record it in ``state``.

        :param failure: what went wrong.
        :param rules: what this kind of call allows.
        :param state: what the call has spent so far (updated).
        :param now: the current UNIX time.
        :param rand: a source of floats in [0, 1).
        """
        status = failure.status
        if status == 429:
            decision = self._rate_limited(failure, state, now, rand)
        elif status is None or status >= 500:
            state.attempts += 1
            if not rules.idempotent or state.attempts >= self.max_attempts:
                decision = Decision(Action.FAIL)
            else:
                decision = Decision(Action.RETRY, self.backoff(state.attempts, rand))
        elif status == 403 and rules.refresh_on_403 and state.refreshes < self.max_refreshes:
            state.refreshes += 1
            decision = Decision(Action.REFRESH)
        else:
            decision = Decision(Action.FAIL)
        return decision

    def _rate_limited(
        self, failure: Failure, state: CallState, now: float, rand: Callable[[], float]
    ) -> Decision:
        reset = self.rate_limit_wait(failure.headers, now)
        if reset is None:
            wait = min(self.backoff(state.rate_limits + 1, rand), self.max_rate_limit_wait)
        else:
            wait = reset
        if state.rate_limits >= MAX_RATE_LIMITS or state.rate_waited + wait > self.max_rate_limit_total:
            return Decision(Action.FAIL)
        state.rate_limits += 1
        state.rate_waited += wait
        return Decision(Action.RATE_LIMITED, wait, None if reset is None else now + reset)


def _finite(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class RetryRunner:
    """Runs one call's attempts by the policy's decisions: sync (:meth:`run`) or async (:meth:`arun`).

    :param policy: the decisions.
    :param budget: the key's rate budget (paced calls book a slot before each attempt).
    :param clock: the current UNIX time.
    :param sleep: how to wait in :meth:`run`.
    :param asleep: how to wait in :meth:`arun`.
    :param rand: a source of jitter in [0, 1).
    :param logger: where retries are logged.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RateBudget,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Awaitable[object]] | None = None,
        rand: Callable[[], float] = random.random,
        logger: Log | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self._clock = clock
        self._sleep = sleep
        self._asleep = asleep
        self._rand = rand
        self.log: Log = logger or log

    def run(
        self,
        what: str,
        attempt: Callable[[], T | Failure],
        rules: CallRules = API_CALL,
        refresh: Callable[[], None] | None = None,
    ) -> T:
        """Run ``attempt`` until it gives a result or the policy says stop; return the result.

        :param what: the call, for the log (``"GET /patients/1"``, ``"S3 upload"``).
        :param attempt: one attempt: returns the result, or a :class:`Failure`.
        :param rules: what this kind of call allows.
        :param refresh: called on :attr:`Action.REFRESH` (e.g. fetches a fresh presign).
        """
        state = CallState()
        while True:
            booked = None
            if rules.paced:
                now = self._clock()
                wait = self.budget.reserve(now)
                self._pace(wait, self._sleep)
                booked = now + wait
            result = attempt()
            if booked is not None:
                self.budget.settle(booked, self._clock())
            if not isinstance(result, Failure):
                return result
            decision = self._decide(what, result, rules, state, can_refresh=refresh is not None)
            if decision.share_until is not None and rules.paced:
                self.budget.block_until(decision.share_until)
            if decision.action is Action.REFRESH and refresh is not None:
                refresh()
            if decision.wait > 0:
                self._sleep(decision.wait)

    async def arun(
        self,
        what: str,
        attempt: Callable[[], Awaitable[T | Failure]],
        rules: CallRules = API_CALL,
    ) -> T:
        """The async twin of :meth:`run`: the budget and the waits never block the event loop.

        :param what: the call, for the log.
        :param attempt: one attempt: returns the result, or a :class:`Failure`.
        :param rules: what this kind of call allows.
        """
        if self._asleep is None:
            raise TypeError("RetryRunner.arun needs asleep")
        state = CallState()
        while True:
            booked = None
            if rules.paced:
                now = self._clock()
                wait = await self.budget.areserve(now)
                if wait > 0:
                    self._log_pacing(wait)
                    await self._asleep(wait)
                booked = now + wait
            result = await attempt()
            if booked is not None:
                await self.budget.asettle(booked, self._clock())
            if not isinstance(result, Failure):
                return result
            decision = self._decide(what, result, rules, state, can_refresh=False)
            if decision.share_until is not None and rules.paced:
                await self.budget.ablock_until(decision.share_until)
            if decision.wait > 0:
                await self._asleep(decision.wait)

    def _pace(self, wait: float, sleep: Callable[[float], None]) -> None:
        if wait > 0:
            self._log_pacing(wait)
            sleep(wait)

    def _log_pacing(self, wait: float) -> None:
        self.log.info("Pacing requests to stay under Cliniko's rate limit: waiting %.1f s", wait)

    def _decide(
        self, what: str, failure: Failure, rules: CallRules, state: CallState, *, can_refresh: bool
    ) -> Decision:
        decision = self.policy.decide(failure, rules, state, self._clock(), self._rand)
        if decision.action is Action.REFRESH and not can_refresh:
            decision = Decision(Action.FAIL)
        outcome = failure.status or "connection error"
        if failure.reason:
            outcome = f"{outcome} ({failure.reason})"
        if decision.action is Action.FAIL:
            raise failure.error(state.attempts or 1)
        if decision.action is Action.RATE_LIMITED:
            self.log.warning(
                "%s: rate limited (429); waiting %.1f s (%s, not counted as an attempt)",
                what,
                decision.wait,
                "until the reset" if decision.share_until is not None else "no usable reset: backing off",
            )
        elif decision.action is Action.REFRESH:
            self.log.warning(
                "%s: %s; fetching a fresh presign (%d of %d)",
                what,
                outcome,
                state.refreshes,
                self.policy.max_refreshes,
            )
        else:
            self.log.warning(
                "%s: %s on attempt %d of %d; retrying in %.1f s",
                what,
                outcome,
                state.attempts,
                self.policy.max_attempts,
                decision.wait,
            )
        return decision
