"""The rate budget of one API key: one small interface, and backends for a process or a machine.

Cliniko allows 200 requests a minute per API key. Every request first books a slot in the key's
budget (``reserve``) and, once answered, moves the slot to the time of its answer (``settle``):
Cliniko counted the request at some moment before it answered, so measuring the window from the
answer keeps every pair of requests 200 apart more than a minute apart however late a request
went out (a busy worker, a slow network). After a 429 with a sane reset, every user of the key
holds back until then (``block_until``). Backends:

- :class:`ProcessBudget`: this process only.
- :class:`MachineBudget` (the default): every process of this OS user on this machine, through a
  small state file in the user's private state directory.
- :class:`~cliniko_provider.utils.budget_redis.RedisBudget`: every process of every machine that
  reaches one Redis (the connection's ``redis_conn_id``), with the machine budget as its fallback.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cliniko_provider.utils.private_state import FIX, PrivateDir

log = logging.getLogger(__name__)

WINDOW = 60.5  # Cliniko's minute, and half a second for a request booked before an older one was answered
SETTLE_TOLERANCE = 1e-3  # seconds: a booked time handed back to settle matches its slot within this
LONGEST_FLIGHT = 600.0  # seconds past the window an unsettled slot is kept: after that its process died
SHARE_RETRY_AFTER = 60.0  # seconds before a machine budget that could not share tries again


class RateBudget(Protocol):
    """A request budget for one API key. ``now`` and ``until`` are UNIX times in seconds."""

    def reserve(self, now: float) -> float:
        """Book one request slot; return the seconds to wait before sending it."""
        ...

    def block_until(self, until: float) -> None:
        """Hold every request on the key until ``until`` (after a 429 whose reset is sane)."""
        ...

    def settle(self, booked: float, answered: float) -> None:
        """Move the slot booked for ``booked`` (``now`` + the wait ``reserve`` gave) to ``answered``."""
        ...

    async def areserve(self, now: float) -> float:
        """:meth:`reserve`, never blocking the event loop."""
        ...

    async def ablock_until(self, until: float) -> None:
        """:meth:`block_until`, never blocking the event loop."""
        ...

    async def asettle(self, booked: float, answered: float) -> None:
        """:meth:`settle`, never blocking the event loop."""
        ...


class BudgetSettings(Protocol):
    """The parts of the connection settings that shape a budget."""

    @property
    def api_key(self) -> str: ...

    @property
    def requests_per_minute(self) -> float: ...

    @property
    def max_rate_limit_wait(self) -> float: ...

    @property
    def redis_conn_id(self) -> str | None: ...


def key_id(api_key: str) -> str:
    """Return a short identifier of an API key (a hash; never the key itself).

    :param api_key: the API key.
    """
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


T = TypeVar("T")


class Budgets:
    """The budgets of one process: one per key (and the settings that shape it), made on first use."""

    def __init__(self) -> None:
        self._budgets: dict[Hashable, RateBudget] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], RateBudget]) -> RateBudget:
        """Return the budget kept under ``key``, making it with ``make`` the first time.

        :param key: what identifies the budget (key id, limits, backend).
        :param make: builds the budget.
        """
        with self._lock:
            budget = self._budgets.get(key)
            if budget is None:
                budget = self._budgets[key] = make()
            return budget

    def clear(self) -> None:
        """Forget every budget (tests use this to start each test afresh)."""
        with self._lock:
            self._budgets.clear()


PROCESS_BUDGETS = Budgets()


def budget_for(settings: BudgetSettings, budgets: Budgets = PROCESS_BUDGETS) -> RateBudget:
    """Return this process's budget for the key of a connection.

    The cluster budget in Redis when the connection names a ``redis_conn_id`` (the machine budget
    standing in while Redis cannot be reached), else the machine-wide budget.

    :param settings: the connection settings (key, requests a minute, longest 429 wait, Redis).
    :param budgets: where the process keeps its budgets.
    """
    kid = key_id(settings.api_key)
    per_minute, max_block = settings.requests_per_minute, settings.max_rate_limit_wait
    machine = budgets.get(
        ("machine", kid, per_minute, max_block), lambda: MachineBudget(kid, per_minute, max_block)
    )
    redis_conn_id = settings.redis_conn_id
    if not redis_conn_id:
        return machine
    from cliniko_provider.utils.budget_redis import RedisBudget

    return budgets.get(
        ("redis", redis_conn_id, kid, per_minute, max_block),
        lambda: RedisBudget(kid, per_minute, max_block, redis_conn_id, machine),
    )


class SlidingWindow:
    """The I/O-free state of a budget: send times in the last window, and a hold after a 429.

    :param per_minute: requests allowed in any window.
    :param max_block: the longest hold accepted (the connection's ``max_rate_limit_wait``).
    """

    def __init__(self, per_minute: float, max_block: float) -> None:
        self.limit = max(1, int(per_minute))
        self.max_block = max_block
        self.sent: list[float] = []  # the slots' times: booked, or answered once settled
        self.flying: list[float] = []  # the booked times of the slots not settled yet
        self.blocked_until = 0.0

    def reserve(self, now: float) -> float:
        """Book one slot; return the seconds to wait before sending (at most a window and the hold).

        :param now: the current UNIX time.
        """
        self._forget(now)
        start = max(now, min(self.blocked_until, now + self.max_block))
        if len(self.sent) >= self.limit:
            start = max(start, self.sent[-self.limit] + WINDOW)
        start = min(start, now + WINDOW + self.max_block)
        bisect.insort(self.sent, start)
        bisect.insort(self.flying, start)
        return start - now

    def _forget(self, now: float) -> None:
        """Forget the slots that left the window, but not one still in flight (its settle moves it to
        its answer) unless it left the window ``LONGEST_FLIGHT`` ago: then its process died."""
        left = now - WINDOW
        self.flying = [booked for booked in self.flying if booked > left - LONGEST_FLIGHT]
        self.sent = sorted(
            [sent for sent in self.sent if sent > left] + [b for b in self.flying if b <= left]
        )

    def settle(self, booked: float, answered: float) -> None:
        """Move the slot in flight booked for ``booked`` to ``answered`` (never earlier); no slot there,
        no change.

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the request's answer (or failure) came.
        """
        index = bisect.bisect_left(self.flying, booked - SETTLE_TOLERANCE)
        if index < len(self.flying) and self.flying[index] <= booked + SETTLE_TOLERANCE:
            slot = self.flying.pop(index)
            at = bisect.bisect_left(self.sent, slot)
            if at < len(self.sent) and self.sent[at] == slot:
                self.sent.pop(at)
            bisect.insort(self.sent, max(slot, answered))

    def block_until(self, until: float, now: float) -> None:
        """Hold every request until ``until``, at most ``max_block`` seconds after ``now``.

        :param until: UNIX time when requests may go again.
        :param now: the current UNIX time.
        """
        if math.isfinite(until):
            self.blocked_until = max(self.blocked_until, min(until, now + self.max_block))

    def load(self, data: Any, now: float) -> bool:
        """Take the state read from a shared file; return False (state unchanged) when it is damaged.

        Only finite numbers within the window and the hold bound are taken: a value written by a
        faulty or hostile process can never hold this one back longer than ``max_block``.

        :param data: the decoded JSON.
        :param now: the current UNIX time.
        """
        if not isinstance(data, dict):
            return False
        sent, blocked = data.get("sent"), data.get("blocked_until")
        if not isinstance(sent, list) or not isinstance(blocked, int | float) or not _is_number(blocked):
            return False
        flying = data.get("flying", [])
        if not isinstance(flying, list):
            return False
        latest = now + WINDOW + self.max_block
        self.sent = sorted(float(t) for t in sent if _is_number(t) and now - WINDOW < t <= latest)
        self.flying = sorted(float(t) for t in flying if _is_number(t) and t <= latest)
        self._forget(now)
        self.blocked_until = min(float(blocked), now + self.max_block)
        return True

    def dump(self) -> bytes:
        """Return the state as the shared file holds it."""
        return json.dumps(
            {"sent": self.sent, "flying": self.flying, "blocked_until": self.blocked_until}
        ).encode()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class ProcessBudget:
    """A budget of this process alone.

    :param per_minute: requests allowed in any window of ``WINDOW`` seconds.
    :param max_block: the longest hold after a 429, in seconds.
    :param clock: the current UNIX time (bounds holds set without a ``now``).
    """

    def __init__(self, per_minute: float, max_block: float, clock: Callable[[], float] | None = None) -> None:
        self._window = SlidingWindow(per_minute, max_block)
        self._clock = clock or time.time
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        """Book one slot; return the seconds to wait.

        :param now: the current UNIX time.
        """
        with self._lock:
            return self._window.reserve(now)

    def block_until(self, until: float) -> None:
        """Hold the key until ``until`` (bounded by ``max_block``).

        :param until: UNIX time.
        """
        with self._lock:
            self._window.block_until(until, self._clock())

    def settle(self, booked: float, answered: float) -> None:
        """Move the slot booked for ``booked`` to ``answered``.

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the answer came.
        """
        with self._lock:
            self._window.settle(booked, answered)

    async def areserve(self, now: float) -> float:
        """Book one slot (memory only, so safe on the event loop).

        :param now: the current UNIX time.
        """
        return self.reserve(now)

    async def ablock_until(self, until: float) -> None:
        """Hold the key until ``until`` (memory only).

        :param until: UNIX time.
        """
        self.block_until(until)

    async def asettle(self, booked: float, answered: float) -> None:
        """Move a slot to its answer's time (memory only).

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the answer came.
        """
        self.settle(booked, answered)


class MachineBudget:
    """A budget shared by every process of this OS user on this machine (workers and triggerer).

    The state lives in the ``rate`` directory of the private state directory (``$CLINIKO_STATE_DIR``,
    see :mod:`~cliniko_provider.utils.private_state`): one 0600 file per key, locked with ``flock``
    while it is read and written in place. What is read is validated; a damaged file is rewritten.
    When the file cannot be used, the budget works for this process alone, logs one warning, and
    tries sharing again a minute later. The async methods run the file work in a thread, so the event
    loop never waits on a lock or a disk.

    :param kid: the key's identifier (see :func:`key_id`).
    :param per_minute: requests allowed in any window of ``WINDOW`` seconds.
    :param max_block: the longest hold after a 429, in seconds.
    :param state_dir: the directory; default ``rate`` in the state directory, read at each use.
    :param clock: the current UNIX time (bounds holds set without a ``now``).
    """

    def __init__(
        self,
        kid: str,
        per_minute: float,
        max_block: float,
        state_dir: Path | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.kid = kid
        self._dir = PrivateDir("Cliniko rate budget", "rate", state_dir)
        self._window = SlidingWindow(per_minute, max_block)
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._share_again_at = -math.inf
        self._warned = False
        self.sharing = True

    @property
    def state_dir(self) -> Path:
        """The directory holding the state files."""
        return self._dir.path

    @property
    def filename(self) -> str:
        """The name of the key's state file in :attr:`state_dir`."""
        return f"cliniko-rate-{self.kid}.json"

    @property
    def path(self) -> Path:
        """The key's state file."""
        return self.state_dir / self.filename

    def reserve(self, now: float) -> float:
        """Book one slot for every process of the machine; return the seconds to wait.

        :param now: the current UNIX time.
        """
        return self._with_state(now, lambda window: window.reserve(now))

    def block_until(self, until: float) -> None:
        """Hold the key for every process of the machine until ``until`` (bounded by ``max_block``).

        :param until: UNIX time.
        """
        now = self._clock()
        self._with_state(now, lambda window: window.block_until(until, now))

    def settle(self, booked: float, answered: float) -> None:
        """Move the slot booked for ``booked`` to ``answered``, for every process of the machine.

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the answer came.
        """
        self._with_state(self._clock(), lambda window: window.settle(booked, answered))

    async def areserve(self, now: float) -> float:
        """:meth:`reserve` in a thread.

        :param now: the current UNIX time.
        """
        return await asyncio.to_thread(self.reserve, now)

    async def ablock_until(self, until: float) -> None:
        """:meth:`block_until` in a thread.

        :param until: UNIX time.
        """
        await asyncio.to_thread(self.block_until, until)

    async def asettle(self, booked: float, answered: float) -> None:
        """:meth:`settle` in a thread.

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the answer came.
        """
        await asyncio.to_thread(self.settle, booked, answered)

    def _with_state(self, now: float, change: Callable[[SlidingWindow], T]) -> T:
        """Apply ``change`` to the shared state (or to this process's own, when it cannot be shared)."""
        with self._lock:
            if now < self._share_again_at:
                return change(self._window)
            try:
                fd = self._open()
            except OSError as error:
                return self._alone(now, error, change)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._read(fd, now)
                result = change(self._window)
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, self._window.dump())
            except OSError as error:
                return self._alone(now, error, change)
            finally:
                os.close(fd)  # releases the lock
            if not self.sharing:
                log.info("Cliniko rate budget: sharing through %s again", self.path)
            self.sharing, self._warned = True, False
            return result

    def _alone(self, now: float, error: OSError, change: Callable[[SlidingWindow], T]) -> T:
        self.sharing = False
        self._share_again_at = now + SHARE_RETRY_AFTER
        if not self._warned:
            self._warned = True
            log.warning(
                "Cliniko rate budget: cannot share the request budget with this machine's other processes "
                "through %s (%s); this process keeps its own budget and tries again in %.0f s. Fix: %s.",
                self.state_dir,
                error,
                SHARE_RETRY_AFTER,
                FIX,
            )
        return change(self._window)

    def _open(self) -> int:
        """Open the key's state file safely (see :mod:`~cliniko_provider.utils.private_state`)."""
        return self._dir.open_shared(self.filename)

    def _read(self, fd: int, now: float) -> None:
        limit = 4096 + 64 * self._window.limit  # the window's slots and those in flight
        raw = os.read(fd, limit + 1)
        if not raw:
            return
        try:
            data = json.loads(raw) if len(raw) <= limit else None
        except ValueError:
            data = None
        if not self._window.load(data, now):
            log.warning("Cliniko rate budget: %s was damaged; rewriting it", self.path)
