"""The rate budget of one Cliniko user: one small interface, and backends for a process or a machine.

Cliniko allows 200 requests a minute per user: the API keys of one user share them. So a budget is
keyed by the user behind the key (learned with one ``GET /user`` per key, remembered for a day; the
key's own hash while it cannot be learned, see :func:`user_budget`). Every request first books a slot
in the budget (``reserve``) and, once answered, moves the slot to the time of its answer (``settle``):
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
from collections.abc import Awaitable, Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from cliniko_provider.exceptions import ClinikoError
from cliniko_provider.utils.private_state import FIX, PrivateDir

log = logging.getLogger(__name__)

WINDOW = 60.5  # Cliniko's minute, and half a second for a request booked before an older one was answered
SETTLE_TOLERANCE = 1e-3  # seconds: a booked time handed back to settle matches its slot within this
OWNER_TTL = 86_400.0  # seconds a key's user is remembered where the key's budget lives
OWNER_RETRY_AFTER = 600.0  # seconds before a key whose user could not be learned is asked again
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

    @property
    def base_url(self) -> str: ...


def user_budget_id(base_url: str, user_id: str) -> str:
    """Return the identifier of a Cliniko user's budget (a hash of the API's URL and the user's id).

    :param base_url: the API's base URL.
    :param user_id: the user's id, as ``GET /user`` answers it.
    """
    return hashlib.sha256(f"{base_url}/users/{user_id}".encode()).hexdigest()[:16]


def key_id(api_key: str) -> str:
    """Return a short identifier of an API key (a hash; never the key itself).

    :param api_key: the API key.
    """
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


T = TypeVar("T")


class Budgets:
    """The budgets of one process: one per key or user (and the settings that shape it), made on first
    use; and which user each key belongs to, once learned."""

    def __init__(self) -> None:
        self._budgets: dict[Hashable, RateBudget] = {}
        self._owners: dict[str, tuple[str | None, float]] = {}  # key id -> (user budget id, good until)
        self._looking: dict[str, threading.Event] = {}  # key ids whose user is being learned right now
        self._warned: set[str] = set()  # key ids whose failed look-up was warned about
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

    def owner_of(self, kid: str, now: float) -> str | None:
        """Return the user budget id learned for a key, if any (never starts learning it).

        :param kid: the key's id.
        :param now: the current UNIX time.
        """
        with self._lock:
            owner, until = self._owners.get(kid, (None, -math.inf))
            return owner if until > now else None

    def claim_owner(self, kid: str, now: float) -> tuple[bool, str | None, threading.Event | None]:
        """Return (known, user budget id, event) for a key. Known: the id (None: not learnable lately).
        Not known, with an event: another caller is learning it (wait for the event). Not known, no
        event: the caller learns it now and must call :meth:`learned`.

        :param kid: the key's id.
        :param now: the current UNIX time.
        """
        with self._lock:
            owner, until = self._owners.get(kid, (None, -math.inf))
            if until > now:
                return True, owner, None
            if kid in self._looking:
                return False, None, self._looking[kid]
            self._looking[kid] = threading.Event()
            return False, None, None

    def learned(self, kid: str, owner: str | None, now: float) -> None:
        """Record a key's user budget id (None: not learned, asked again ``OWNER_RETRY_AFTER`` later).

        :param kid: the key's id.
        :param owner: the user budget id, or None.
        :param now: the current UNIX time.
        """
        with self._lock:
            self._owners[kid] = (owner, now + (OWNER_TTL if owner else OWNER_RETRY_AFTER))
            event = self._looking.pop(kid, None)
        if event is not None:
            event.set()

    def first_warning(self, kid: str) -> bool:
        """Return True the first time it is asked for a name (one warning per key, or Redis, and process).

        :param kid: the key's id, or what else is warned about (``redis:<connection id>``).
        """
        with self._lock:
            first = kid not in self._warned
            self._warned.add(kid)
            return first

    def clear(self) -> None:
        """Forget every budget and owner (tests use this to start each test afresh)."""
        with self._lock:
            self._budgets.clear()
            self._owners.clear()
            self._looking.clear()
            self._warned.clear()


@runtime_checkable
class OwnerMemory(Protocol):
    """A budget that remembers, where it lives, which user its key belongs to."""

    def recall_owner(self, now: float) -> str | None:
        """Return the user budget id remembered for the key, if still good."""
        ...

    def remember_owner(self, owner: str, now: float) -> None:
        """Remember the key's user budget id for ``OWNER_TTL`` seconds."""
        ...


PROCESS_BUDGETS = Budgets()


def budget_for(
    settings: BudgetSettings, budgets: Budgets = PROCESS_BUDGETS, owner: str | None = None
) -> RateBudget:
    """Return this process's budget for the key (or the user) of a connection.

    The cluster budget in Redis when the connection names a ``redis_conn_id`` (the machine budget
    standing in while Redis cannot be reached), else the machine-wide budget.

    :param settings: the connection settings (key, requests a minute, longest 429 wait, Redis).
    :param budgets: where the process keeps its budgets.
    :param owner: the key's user budget id (:func:`user_budget_id`); None: the key's own budget.
    """
    kid = owner or key_id(settings.api_key)
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
        lambda: RedisBudget(
            kid,
            per_minute,
            max_block,
            redis_conn_id,
            machine,
            first_warning=lambda: budgets.first_warning(f"redis:{redis_conn_id}"),
        ),
    )


def user_id_of(user: Mapping[str, object]) -> str | None:
    """Return the id in a ``GET /user`` answer when it is one (digits, at most 32), else None.

    :param user: the decoded answer.
    """
    text = str(user.get("id"))  # None, True, 7.0, [7]... are not digits
    return text if text.isdigit() and text.isascii() and len(text) <= 32 else None


def _patience(settings: BudgetSettings) -> float:
    """How long a caller waits for another's look-up of the key's user: its longest pacing, and a
    minute for the one request."""
    return WINDOW + settings.max_rate_limit_wait + 60.0


def user_budget(
    settings: BudgetSettings,
    look_up: Callable[[], Mapping[str, object]],
    budgets: Budgets = PROCESS_BUDGETS,
    clock: Callable[[], float] = time.time,
) -> RateBudget:
    """Return the budget of the Cliniko user behind the connection's key: Cliniko counts requests per
    user, so the keys of one user share one budget.

    The user is learned once per key with ``look_up`` (one ``GET /user``, paced on the key's own budget
    and then counted on the user's) and remembered for ``OWNER_TTL`` where the key's budget lives
    (Redis, or the machine's private state, named by the key's hash), so other processes and machines
    need not ask. While another thread learns it, this one waits. When it cannot be learned (the call
    fails, or answers no id), the key's own budget serves, one warning says so, and it is asked again
    ``OWNER_RETRY_AFTER`` later.

    :param settings: the connection settings.
    :param look_up: sends ``GET /user`` once and returns its answer; raises :class:`ClinikoError`.
    :param budgets: where the process keeps its budgets.
    :param clock: the current UNIX time.
    """
    kid, key_budget = key_id(settings.api_key), budget_for(settings, budgets)
    known, owner, event = budgets.claim_owner(kid, clock())
    if event is not None:
        event.wait(_patience(settings))
        owner = budgets.owner_of(kid, clock())
    elif not known:
        owner = None
        try:
            owner = _recall_owner(key_budget, clock())
            if owner is None:
                owner = _learn(settings, kid, budgets, _answer_or_error(look_up))
                if owner is not None:
                    _remember_owner(key_budget, owner, clock())
                    _count_look_up(budget_for(settings, budgets, owner), clock())
        finally:
            budgets.learned(kid, owner, clock())
    return budget_for(settings, budgets, owner) if owner else key_budget


async def auser_budget(
    settings: BudgetSettings,
    alook_up: Callable[[], Awaitable[Mapping[str, object]]],
    budgets: Budgets = PROCESS_BUDGETS,
    clock: Callable[[], float] = time.time,
) -> RateBudget:
    """:func:`user_budget` for the event loop: what is remembered is read and written in a thread.

    :param settings: the connection settings.
    :param alook_up: sends ``GET /user`` once and returns its answer; raises :class:`ClinikoError`.
    :param budgets: where the process keeps its budgets.
    :param clock: the current UNIX time.
    """
    kid, key_budget = key_id(settings.api_key), budget_for(settings, budgets)
    known, owner, event = budgets.claim_owner(kid, clock())
    if event is not None:
        await asyncio.to_thread(event.wait, _patience(settings))
        owner = budgets.owner_of(kid, clock())
    elif not known:
        owner = None
        try:
            owner = await asyncio.to_thread(_recall_owner, key_budget, clock())
            if owner is None:
                try:
                    answer: Mapping[str, object] | ClinikoError = await alook_up()
                except ClinikoError as error:
                    answer = error
                owner = _learn(settings, kid, budgets, answer)
                if owner is not None:
                    await asyncio.to_thread(_remember_owner, key_budget, owner, clock())
                    await _acount_look_up(budget_for(settings, budgets, owner), clock())
        finally:
            budgets.learned(kid, owner, clock())
    return budget_for(settings, budgets, owner) if owner else key_budget


def _answer_or_error(look_up: Callable[[], Mapping[str, object]]) -> Mapping[str, object] | ClinikoError:
    try:
        return look_up()
    except ClinikoError as error:
        return error


def _learn(
    settings: BudgetSettings, kid: str, budgets: Budgets, answer: Mapping[str, object] | ClinikoError
) -> str | None:
    """The user budget id from a look-up's answer; None (and one warning per key) when there is none."""
    user = None if isinstance(answer, ClinikoError) else user_id_of(answer)
    if user is not None:
        return user_budget_id(settings.base_url, user)
    reason = str(answer) if isinstance(answer, ClinikoError) else "GET /user answered no user id"
    (log.warning if budgets.first_warning(kid) else log.debug)(
        "Cliniko rate budget: cannot learn which Cliniko user this API key belongs to (%s); it keeps a "
        "budget of its own (keys of one user then pace apart) and asks again in %.0f s.",
        reason[:300],
        OWNER_RETRY_AFTER,
    )
    return None


def _count_look_up(budget: RateBudget, now: float) -> None:
    """Book the ``GET /user`` just answered (paced on the key's own budget) on the user's budget too:
    Cliniko counted it there."""
    booked = now + budget.reserve(now)
    budget.settle(booked, now)


async def _acount_look_up(budget: RateBudget, now: float) -> None:
    booked = now + await budget.areserve(now)
    await budget.asettle(booked, now)


def _recall_owner(budget: RateBudget, now: float) -> str | None:
    return budget.recall_owner(now) if isinstance(budget, OwnerMemory) else None


def _remember_owner(budget: RateBudget, owner: str, now: float) -> None:
    if isinstance(budget, OwnerMemory):
        budget.remember_owner(owner, now)


def is_owner(text: object) -> bool:
    """True for a user budget id as :func:`user_budget_id` makes them (16 lowercase hex digits).

    :param text: what was read back.
    """
    return isinstance(text, str) and len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def owner_record(owner: str, now: float) -> bytes:
    """A remembered owner as the machine stores it (JSON: the user budget id, and until when it holds).

    :param owner: the user budget id.
    :param now: the current UNIX time.
    """
    return json.dumps({"owner": owner, "until": now + OWNER_TTL}).encode()


def read_owner_record(raw: bytes | None, now: float) -> str | None:
    """The user budget id of a stored record, or None when it is missing, damaged or out of date.

    :param raw: the record as stored.
    :param now: the current UNIX time.
    """
    try:
        data = json.loads(raw) if raw and len(raw) <= 256 else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    owner, until = data.get("owner"), data.get("until")
    if not is_owner(owner) or not isinstance(until, int | float) or not _is_number(until):
        return None
    if not now < until <= now + OWNER_TTL:
        return None
    return str(owner)


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

    def recall_owner(self, now: float) -> str | None:
        """Return the user budget id this machine remembers for the key, if still good.

        :param now: the current UNIX time.
        """
        try:
            return read_owner_record(self._dir.read(f"cliniko-owner-{self.kid}.json", 256), now)
        except OSError:
            return None

    def remember_owner(self, owner: str, now: float) -> None:
        """Remember the key's user budget id on this machine for ``OWNER_TTL`` seconds.

        :param owner: the user budget id.
        :param now: the current UNIX time.
        """
        try:
            self._dir.write(f"cliniko-owner-{self.kid}.json", owner_record(owner, now))
        except OSError as error:
            log.debug("Cliniko rate budget: cannot remember the key's user (%s)", error)

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
