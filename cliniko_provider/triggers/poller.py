"""One shared poller per Cliniko connection and event loop, so that N waiting triggers cost ~N/100 requests.

Every :class:`~cliniko_provider.triggers.cliniko.ProcessingCompletedTrigger` of a connection running in
one triggerer process registers its attachment id with the same :class:`AttachmentPoller` and awaits a
future. The poller asks Cliniko about the waiters that are due, up to 100 ids per request
(``ClinikoAsyncHook.aget_attachments``), through the hook's retry policy and the rate budget of the key.
So 1000 attachments waiting at the same interval cost 10 requests a round instead of 1000.

Rules:

- Each waiter is asked at its own poll interval (at least :data:`MIN_POLL_INTERVAL`), first one interval
  after it joins (the sensor and operator check once themselves before they defer, and an answer within
  seconds of the deferral can race Airflow's scheduler into retrying the task). Rounds keep a beat: the
  shortest interval among the waiters. A round asks only the waiters that are due, or due within the
  next tenth of their own interval (:data:`EARLY_FRACTION`); a waiter that falls due between two beats
  is asked at the next one. So a waiter with a long interval is not asked more often because another
  has a short one, and triggers that defer at different moments fall into step after their first
  check and share their requests. A waiter that joins due earlier than the poller's next wake-up (or
  with an earlier deadline) wakes it.
- Processed → success; archived → ``archived``; missing from the answer (deleted, never existed, or
  another account) → ``not_found``; deadline passed → ``timeout``.
- Deadlines fire on time whatever the poller is doing: while a round waits for Cliniko (retries, a 429,
  an answer that trickles in), the waiters whose deadline passes get their ``timeout`` at once. A
  waiter the round is asking about gets a tenth of its interval more (:data:`EARLY_FRACTION`), so an
  answer already on its way still counts; every deadline fires within one poll interval.
- Retryable failures (5xx, 429, connection errors, after the hook's own retries) are retried when the
  waiter is next due, until its deadline or until ``max_failed_rounds`` checks in a row failed for it,
  when it gets a retryable ``api_error``. Other failures (401, 403, other 4xx, a broken connection
  definition) are an ``api_error`` at once, not retryable when the task's retries could not help either.
- The registry is keyed by connection id and checks the running loop: a poller belongs to the loop it
  was made in, and a new loop (a new test, a restarted triggerer) gets a new poller. A poller leaves the
  registry and closes its HTTP client when its last waiter leaves. Cancelling the poller cancels its
  waiters; a poller that fails fails its waiters; neither leaves a trigger waiting for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from airflow.providers.common.compat.sdk import AirflowFailException

from cliniko_provider.exceptions import (
    ClinikoAttachmentGoneError,
    ClinikoConnectionError,
    ClinikoRateLimitError,
    ClinikoServerError,
)
from cliniko_provider.hooks.cliniko import PER_PAGE, ClinikoAsyncHook, check_processed
from cliniko_provider.triggers.cliniko import (
    REASON_API_ERROR,
    REASON_NOT_FOUND,
    REASON_TIMEOUT,
    error_event,
    success_event,
)
from cliniko_provider.utils.errors import redact

JsonDict = dict[str, Any]
RETRYABLE_ERRORS = (ClinikoServerError, ClinikoRateLimitError, ClinikoConnectionError)
MIN_POLL_INTERVAL = 0.1
"""The shortest poll interval a waiter gets, in seconds (shorter ones, 0 and NaN are raised to it)."""
EARLY_FRACTION = 0.1
"""A waiter may be asked this fraction of its interval early, to share a round with others, and, while a
round asks about it, may time out this fraction of its interval after its deadline."""
DEADLINE_TICK = 1.0
"""During a round, the clock is read again at least this often (real seconds), so a clock that jumps
(a changed wall clock) still fires the deadlines it passed."""

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Waiter:
    """One trigger waiting for one attachment.

    :param attachment_id: the normalised attachment id.
    :param poll_interval: how often the trigger wants the attachment checked, in seconds.
    :param deadline: UNIX time after which the trigger gives up, or None.
    :param future: resolved with the trigger event's payload.
    :param due: UNIX time of its next check.
    """

    attachment_id: str
    poll_interval: float
    deadline: float | None
    future: asyncio.Future[JsonDict]
    due: float
    failures: int = 0
    last_error: str = ""
    asked: bool = False  # a round in flight is asking about it

    def expires_at(self) -> float:
        """When this waiter times out: its deadline, a little later while a round asks about it."""
        if self.deadline is None:
            return math.inf
        return self.deadline + (self.poll_interval * EARLY_FRACTION if self.asked else 0.0)

    def due_by(self, now: float) -> bool:
        """Whether a round at ``now`` should ask about this waiter (it is due, or nearly).

        :param now: the round's UNIX time.
        """
        return self.due <= now + self.poll_interval * EARLY_FRACTION


@dataclass
class PollerStats:
    """What a poller did (for logs, tests and the benchmark)."""

    rounds: int = 0
    requests: int = 0
    requests_per_round: list[int] = field(default_factory=list)
    waiting_per_round: list[int] = field(default_factory=list)


def batched(items: list[str], size: int) -> Iterator[list[str]]:
    """Yield ``items`` in lists of at most ``size``.

    :param items: the items.
    :param size: the largest batch.
    """
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AttachmentPoller:
    """Polls Cliniko for every attachment its waiters wait on, each at its own interval, 100 ids a request.

    Must be created inside the running event loop it will serve.

    :param conn_id: the Cliniko connection id.
    :param hook_factory: makes the async hook from the connection id (tests inject a fake transport).
    :param clock: the current UNIX time (deadlines are UNIX timestamps).
    :param asleep: how to wait between rounds.
    :param max_failed_rounds: checks in a row with retryable failures before a waiter gets ``api_error``.
    :param on_close: called (synchronously) when the poller stops taking waiters.
    """

    def __init__(
        self,
        conn_id: str,
        *,
        hook_factory: Callable[[str], ClinikoAsyncHook] = ClinikoAsyncHook,
        clock: Callable[[], float] = time.time,
        asleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        max_failed_rounds: int = 20,
        on_close: Callable[[AttachmentPoller], None] | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.loop = asyncio.get_running_loop()
        self.stats = PollerStats()
        self.closed = False
        self.on_close = on_close
        self._hook_factory = hook_factory
        self._clock = clock
        self._asleep = asleep
        self._max_failed_rounds = max_failed_rounds
        self._waiters: dict[str, list[Waiter]] = {}
        self._wake = asyncio.Event()
        self._planned_wake = math.inf
        self._task: asyncio.Task[None] | None = None
        self._redact: Callable[[str], str] = redact  # the hook's redactor, once it has the connection

    @property
    def waiting(self) -> int:
        """How many waiters are registered."""
        return sum(len(waiters) for waiters in self._waiters.values())

    async def wait(self, attachment_id: str, poll_interval: float, deadline: float | None) -> JsonDict:
        """Register a waiter and return its event payload once the attachment is done (or failed).

        :param attachment_id: the normalised attachment id.
        :param poll_interval: seconds between checks wanted by this waiter.
        :param deadline: UNIX time to give up at, or None.
        :raises asyncio.CancelledError: the poller was cancelled.
        """
        if self.closed:
            raise RuntimeError("This Cliniko poller is closed; get a new one from the registry")
        now = self._clock()
        if deadline is not None and deadline <= now:
            return error_event(attachment_id, REASON_TIMEOUT, self._timeout_message(attachment_id, deadline))
        interval = poll_interval if poll_interval >= MIN_POLL_INTERVAL else MIN_POLL_INTERVAL
        # The task checked the attachment just before it deferred: the first check here is one interval
        # later. Answering sooner also races Airflow's scheduler, which may still be recording the
        # deferral, and then puts the task up for retry instead of resuming it.
        waiter = Waiter(attachment_id, interval, deadline, self.loop.create_future(), now + interval)
        self._waiters.setdefault(attachment_id, []).append(waiter)
        if self._task is None:
            self._task = self.loop.create_task(self._run(), name=f"cliniko-poller-{self.conn_id}")
        elif min(waiter.due, math.inf if deadline is None else deadline) < self._planned_wake:
            self._wake.set()
        try:
            return await waiter.future
        finally:
            self._remove(waiter)

    async def wait_many(
        self, attachment_ids: Iterable[str], poll_interval: float, deadline: float | None
    ) -> dict[str, JsonDict]:
        """Wait for several attachments at once; return each one's event payload by id.

        :param attachment_ids: normalised attachment ids.
        :param poll_interval: seconds between checks of each.
        :param deadline: UNIX time to give up at, or None.
        """
        ids = list(dict.fromkeys(attachment_ids))
        payloads = await asyncio.gather(*(self.wait(item, poll_interval, deadline) for item in ids))
        return dict(zip(ids, payloads, strict=True))

    def _remove(self, waiter: Waiter) -> None:
        waiters = self._waiters.get(waiter.attachment_id)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[waiter.attachment_id]
        if not self._waiters:
            self._wake.set()

    def _resolve(self, waiter: Waiter, payload: JsonDict) -> None:
        if not waiter.future.done():
            waiter.future.set_result(payload)
        self._remove(waiter)

    async def _run(self) -> None:
        hook: ClinikoAsyncHook | None = None
        try:
            hook = self._hook_factory(self.conn_id)
            last_round = -math.inf
            while self._waiters:
                now = self._clock()
                due = any(w.due <= now for w in self._all_waiters())
                if due and now >= last_round + self._beat():
                    await self._round_by_deadlines(hook, now)
                    last_round = now
                self._expire(self._clock())
                if not self._waiters:
                    break
                first_due = min(w.due for w in self._all_waiters())
                deadlines = [w.deadline for w in self._all_waiters() if w.deadline is not None]
                self._planned_wake = min([max(first_due, last_round + self._beat()), *deadlines])
                await self._pause(self._planned_wake - self._clock())
        except asyncio.CancelledError:
            for waiter in self._all_waiters():
                waiter.future.cancel()
            raise
        except Exception as error:  # a bug must not leave triggers hanging: fail them clearly instead
            log.exception("The Cliniko poller of connection %r failed", self.conn_id)
            self._fail(self._all_waiters(), f"The Cliniko poller failed: {self._describe(error)}", True)
        finally:
            self.closed = True
            if self.on_close is not None:
                self.on_close(self)
            if hook is not None:
                await hook.aclose()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a waiter joins that needs an earlier round, or all left."""
        self._wake.clear()
        if seconds <= 0:
            return
        waker = asyncio.ensure_future(self._wake.wait())
        # nothing is ever due (an infinite interval and no deadline): only a joining or leaving waiter wakes
        sleepers = {waker} if math.isinf(seconds) else {waker, asyncio.ensure_future(self._asleep(seconds))}
        try:
            await asyncio.wait(sleepers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sleeper in sleepers:
                sleeper.cancel()

    async def _round_by_deadlines(self, hook: ClinikoAsyncHook, now: float) -> None:
        """Run a round while firing the deadlines that pass meanwhile, so a slow round holds no trigger.

        :param hook: the async hook.
        :param now: the round's UNIX time.
        """
        due = [item for item, waiters in self._waiters.items() if any(w.due_by(now) for w in waiters)]
        asked = [waiter for item in due for waiter in self._waiters[item]]
        for waiter in asked:
            waiter.due = now + waiter.poll_interval
            waiter.asked = True
        round_task = asyncio.ensure_future(self._round(hook, now, due))
        try:
            self._planned_wake = -math.inf  # busy: any waiter that joins wakes this loop, for its deadline
            while not round_task.done():
                first_expiry = min((w.expires_at() for w in self._all_waiters()), default=math.inf)
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                pause = max(0.0, min(first_expiry - self._clock(), DEADLINE_TICK))
                try:
                    await asyncio.wait(
                        {round_task, waker}, timeout=pause, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waker.cancel()
                if not round_task.done():
                    self._expire(self._clock())
                if not self._waiters:
                    round_task.cancel()  # nobody waits for its answer any more
        finally:
            round_task.cancel()
            for waiter in asked:
                waiter.asked = False
        with contextlib.suppress(asyncio.CancelledError):
            await round_task

    async def _round(self, hook: ClinikoAsyncHook, now: float, due: list[str]) -> None:
        """Ask about the attachments ``due``, 100 ids a request.

        :param hook: the async hook.
        :param now: the round's UNIX time.
        :param due: the attachment ids to ask about.
        """
        try:
            await hook.aget_settings()
        except Exception as error:  # missing or invalid connection
            message = f"Cannot use the Cliniko connection {self.conn_id!r}: {self._describe(error)}"
            self._fail(self._all_waiters(), message, not isinstance(error, AirflowFailException))
            return
        self._redact = hook.redactor
        requests = 0
        for ids in batched(due, PER_PAGE):
            requests += 1
            try:
                records = await hook.aget_attachments(ids)
            except RETRYABLE_ERRORS as error:
                self._failed(ids, error)
                continue
            except Exception as error:
                waiters = [w for item in ids for w in self._waiters.get(item, [])]
                message = f"Cliniko refused the status check: {self._describe(error)}"
                self._fail(waiters, message, not isinstance(error, AirflowFailException))
                continue
            for attachment_id in ids:
                self._settle(attachment_id, records.get(attachment_id))
        self.stats.rounds += 1
        self.stats.requests += requests
        self.stats.requests_per_round.append(requests)
        self.stats.waiting_per_round.append(len(due))
        log.debug("Cliniko poller %r: round with %d request(s)", self.conn_id, requests)

    def _settle(self, attachment_id: str, record: JsonDict | None) -> None:
        waiters = list(self._waiters.get(attachment_id, []))
        if record is None:
            gone = ClinikoAttachmentGoneError(attachment_id, REASON_NOT_FOUND)
            for waiter in waiters:
                self._resolve(waiter, error_event(attachment_id, REASON_NOT_FOUND, str(gone)))
            return
        try:
            processed = check_processed(record)
        except ClinikoAttachmentGoneError as error:
            for waiter in waiters:
                self._resolve(waiter, error_event(attachment_id, error.reason, str(error)))
            return
        for waiter in waiters:
            if processed:
                self._resolve(waiter, success_event(attachment_id, record))
            else:
                waiter.failures = 0

    def _failed(self, ids: Iterable[str], error: Exception) -> None:
        """Count a retryable failure against each waiter of a batch; fail those over the limit."""
        text = self._describe(error)
        log.warning("Cliniko poller %r: status check failed, retrying when due: %s", self.conn_id, text)
        for attachment_id in ids:
            for waiter in list(self._waiters.get(attachment_id, [])):
                waiter.failures += 1
                waiter.last_error = text
                if waiter.failures >= self._max_failed_rounds:
                    message = f"Cliniko kept failing for {waiter.failures} rounds: {text}"
                    self._resolve(
                        waiter, error_event(attachment_id, REASON_API_ERROR, message, retryable=True)
                    )

    def _fail(self, waiters: Iterable[Waiter], message: str, retryable: bool) -> None:
        for waiter in list(waiters):
            text = f"{message} (attachment {waiter.attachment_id})"
            self._resolve(
                waiter, error_event(waiter.attachment_id, REASON_API_ERROR, text, retryable=retryable)
            )

    def _expire(self, now: float) -> None:
        for waiter in self._all_waiters():
            if waiter.deadline is not None and waiter.expires_at() <= now:
                last_error = waiter.last_error
                if waiter.asked:
                    last_error = "Cliniko had not answered the status check in flight"
                message = self._timeout_message(waiter.attachment_id, waiter.deadline, last_error)
                self._resolve(waiter, error_event(waiter.attachment_id, REASON_TIMEOUT, message))

    def _beat(self) -> float:
        """Seconds between rounds: the shortest poll interval among the waiters."""
        return min((w.poll_interval for w in self._all_waiters()), default=math.inf)

    def _all_waiters(self) -> list[Waiter]:
        return [waiter for waiters in self._waiters.values() for waiter in waiters]

    @staticmethod
    def _timeout_message(attachment_id: str, deadline: float, last_error: str = "") -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline))
        text = (
            f"Cliniko had not finished processing attachment {attachment_id} by the deadline {when}. "
            "Large files take longer: raise the sensor's timeout, or check the attachment in Cliniko"
        )
        return f"{text}. Last error: {last_error}" if last_error else text

    def _describe(self, error: BaseException) -> str:
        """One line about an error, with any secret of the connection blanked out."""
        text = " ".join(str(error).split()) or type(error).__name__
        return self._redact(text)[:500]


class PollerRegistry:
    """The pollers of this process, one per connection id, each tied to the event loop it runs in.

    :param factory: makes a poller for a connection id (tests inject fakes through it).
    """

    def __init__(self, factory: Callable[..., AttachmentPoller] = AttachmentPoller) -> None:
        self.factory = factory
        self._pollers: dict[str, AttachmentPoller] = {}

    def get(self, conn_id: str) -> AttachmentPoller:
        """Return the running loop's poller of a connection, creating it when needed.

        :param conn_id: the Cliniko connection id.
        """
        loop = asyncio.get_running_loop()
        poller = self._pollers.get(conn_id)
        if poller is None or poller.closed or poller.loop is not loop:
            poller = self.factory(conn_id, on_close=self._discard)
            self._pollers[conn_id] = poller
        return poller

    def _discard(self, poller: AttachmentPoller) -> None:
        if self._pollers.get(poller.conn_id) is poller:
            del self._pollers[poller.conn_id]

    def active(self) -> dict[str, AttachmentPoller]:
        """The open pollers of the running event loop, by connection id."""
        loop = asyncio.get_running_loop()
        return {key: p for key, p in self._pollers.items() if p.loop is loop and not p.closed}


REGISTRY = PollerRegistry()
