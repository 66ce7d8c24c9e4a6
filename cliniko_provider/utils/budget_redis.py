"""The cluster rate budget: one sliding window per Cliniko user in Redis, shared by every machine.

Every worker on every machine and every triggerer that names the same Airflow Redis connection
(``redis_conn_id`` in the Cliniko connection's extras) books its requests in one window per key, kept
in Redis and changed atomically by a Lua script; a 429's reset holds the key for all of them at once.
Nothing secret goes into Redis: the keys are named by a hash of the API key (or of the Cliniko user
behind it), the values are times (the window's members are sequence numbers, scored by their send
times, then by their answers) and, under ``...:owner``, the hash naming the user's budget.

Redis is a helper, never a dependency of an upload: every call is bounded by short timeouts, and when
Redis cannot be reached (or answers nonsense) the budget falls back to the machine budget, logs one
warning per process, and tries Redis again a little later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cliniko_provider.utils.budget import (
    LONGEST_FLIGHT,
    OWNER_TTL,
    SETTLE_TOLERANCE,
    WINDOW,
    OwnerMemory,
    RateBudget,
    is_owner,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.commands.core import AsyncScript, Script

log = logging.getLogger(__name__)

REDIS_TIMEOUT = 2.0  # seconds, for connecting and for each command: a slower Redis counts as down
RETRY_REDIS_AFTER = 10.0  # seconds on the machine budget before Redis is tried again
KEY_PREFIX = "cliniko:rate"
MAX_FLYING = 10_000  # slots in flight this process remembers (more means settles are not being called)

# Every script starts with this. KEYS: the window (a sorted set of slots, named by the counter, scored
# by their send times, then by their answers; a settled slot's name ends in ":a"), the counter, the
# hold. ARGV: window length, longest hold, LONGEST_FLIGHT, and the time to use (empty: Redis's TIME,
# one clock for every machine; tests pin it), then the script's own arguments. Lua numbers come back
# truncated to integers, so times and waits go back as strings.
PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 5: allows TIME, then writes
local sent, counter, held = KEYS[1], KEYS[2], KEYS[3]
local window, max_block, longest_flight = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local function clock()
  if ARGV[4] ~= '' then
    return tonumber(ARGV[4])
  end
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local now = clock()
local latest = now + window + max_block  -- no slot, hold or wait goes past this

local function number(raw)  -- a finite number, or nil
  local value = tonumber(raw)
  if value and value == value and value > -math.huge and value < math.huge then
    return value
  end
end

local function time(value)
  return string.format('%.17g', value)
end

local function settled(slot)
  return string.sub(slot, -2) == ':a'
end

-- Forget the slots that left the window, but not one still in flight (its settle moves it to its
-- answer) unless it left the window LONGEST_FLIGHT ago: then its process died.
local function forget()
  local left = now - window
  local old = redis.call('ZRANGEBYSCORE', sent, '-inf', time(left), 'WITHSCORES')
  for i = 1, #old, 2 do
    if settled(old[i]) or tonumber(old[i + 1]) <= left - longest_flight then
      redis.call('ZREM', sent, old[i])
    end
  end
end

-- Keep the window as long as its latest slot may matter, and the counter at least as long (a counter
-- that expired first would name a new slot like a live one).
local function keep()
  local last = redis.call('ZRANGE', sent, -1, -1, 'WITHSCORES')
  local until_ = now
  if last[2] then
    until_ = math.max(now, math.min(tonumber(last[2]), latest))
  end
  local ttl = math.ceil((until_ - now + window + longest_flight) * 1000)
  for _, key in ipairs({sent, counter}) do
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
"""

# SlidingWindow.reserve. ARGV[5]: requests per window. Returns "<wait> <slot>".
RESERVE_SCRIPT = (
    PRELUDE
    + """
local limit = tonumber(ARGV[5])
forget()
local start = now
local blocked = number(redis.call('GET', held))
if blocked then
  start = math.max(start, math.min(blocked, now + max_block))
end
local count = redis.call('ZCARD', sent)
if count >= limit then
  local oldest = redis.call('ZRANGE', sent, count - limit, count - limit, 'WITHSCORES')
  start = math.max(start, tonumber(oldest[2]) + window)
end
start = math.min(start, latest)
local slot = tostring(redis.call('INCR', counter))
redis.call('ZADD', sent, time(start), slot)
keep()
return time(start - now) .. ' ' .. slot
"""
)

# SlidingWindow.settle. ARGV[5]: the slot. With a pinned clock, ARGV[4] is the answer's time.
SETTLE_SCRIPT = (
    PRELUDE
    + """
local slot = ARGV[5]
local booked = number(redis.call('ZSCORE', sent, slot))
if not booked then
  return 0
end
redis.call('ZREM', sent, slot)
redis.call('ZADD', sent, time(math.max(math.min(booked, latest), now)), slot .. ':a')
keep()
return 1
"""
)

# SlidingWindow.block_until. ARGV[5]: seconds from now to hold for. Keeps the later of two holds.
BLOCK_SCRIPT = (
    PRELUDE
    + """
local hold = now + math.min(tonumber(ARGV[5]), max_block)
if not (hold > now) then
  return 0
end
local current = number(redis.call('GET', held))
if current and current >= hold and current <= now + max_block then
  return 0
end
redis.call('SET', held, time(hold), 'PX', math.ceil((hold - now) * 1000))
return 1
"""
)


def redis_keys(kid: str) -> list[str]:
    """Return the Redis keys of one API key's budget: window, sequence counter, hold.

    The ``{...}`` hash tag keeps the three in one slot, as a script's keys must be.

    :param kid: the key's identifier (a hash of the API key, never the key).
    """
    base = f"{KEY_PREFIX}:{{{kid}}}"
    return [f"{base}:sent", f"{base}:seq", f"{base}:blocked"]


def owner_key(kid: str) -> str:
    """Return the Redis key remembering which user's budget an API key shares (see
    :func:`~cliniko_provider.utils.budget.user_budget`).

    :param kid: the key's identifier (a hash of the API key, never the key).
    """
    return f"{KEY_PREFIX}:{{{kid}}}:owner"


def client_options(conn: Any) -> dict[str, Any]:
    """Return redis-py client options for an Airflow Redis connection, with short timeouts.

    The fields are read as ``RedisHook.get_conn`` reads them (host, port, login, password, extras
    ``db`` and ``ssl*``); the client is built here because that hook sets no timeouts and has no
    async client, and a budget must never wait long on Redis. Cluster mode is not supported.

    :param conn: an Airflow connection of type ``redis``.
    """
    extra = conn.extra_dejson
    password = None if str(conn.password).lower() in ("none", "false", "") else conn.password
    ssl_names = ("ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_keyfile", "ssl_certfile", "ssl_check_hostname")
    return {
        "host": conn.host or "localhost",
        "port": int(conn.port or 6379),
        "username": conn.login or None,
        "password": password,
        "db": int(extra.get("db") or 0),
        "socket_timeout": REDIS_TIMEOUT,
        "socket_connect_timeout": REDIS_TIMEOUT,
        **{name: extra[name] for name in ssl_names if name in extra},
    }


class RedisBudget:
    """A budget shared by every process that reaches the same Redis: workers on any machine, triggerers.

    The scripts take the time from Redis (``TIME``), so the machines' clocks never meet: a process
    hands Redis only durations (a hold's length) and gets back durations (a wait, at most a window and
    the longest hold), and it settles a slot by its name, remembered from the booking.

    :param kid: the key's identifier (a hash of the API key).
    :param per_minute: requests allowed in any window of ``WINDOW`` seconds.
    :param max_block: the longest hold after a 429, in seconds (a longer one is cut to this).
    :param redis_conn_id: the Airflow connection (type ``redis``) of the shared Redis.
    :param fallback: the budget used while Redis cannot be reached (the machine budget).
    :param clock: the current UNIX time (for holds, and for when to try Redis again).
    :param redis_time: take the time from Redis (the default); False hands the scripts this process's
        times instead (tests pin the clock with it).
    :param first_warning: returns True only the first time a budget of this process asks, so a process
        warns once about its Redis connection whatever number of keys and users it paces (None: this
        budget's first fall-back warns).
    """

    def __init__(
        self,
        kid: str,
        per_minute: float,
        max_block: float,
        redis_conn_id: str,
        fallback: RateBudget,
        clock: Callable[[], float] | None = None,
        redis_time: bool = True,
        first_warning: Callable[[], bool] | None = None,
    ) -> None:
        self.redis_conn_id = redis_conn_id
        self.fallback = fallback
        self._keys = redis_keys(kid)
        self._owner_key = owner_key(kid)
        self._limit = max(1, int(per_minute))
        self._max_block = max_block
        self._clock = clock or time.time
        self._redis_time = redis_time
        self._lock = threading.Lock()
        self._flying: list[tuple[float, str]] = []  # (booked, slot name) of this process's slots in flight
        self._client: redis.Redis | None = None
        self._scripts: tuple[Script, Script, Script] | None = None
        self._async: tuple[asyncio.AbstractEventLoop, AsyncScript, AsyncScript, AsyncScript] | None = None
        self._try_again_at = -math.inf
        self._warned = False
        self._first_warning = first_warning or (lambda: True)
        self.shared = True
        self.problem: str | None = None  # why Redis could not be used last, with the fix (None: it could)

    # --- sync -----------------------------------------------------------------------------------------

    def reserve(self, now: float) -> float:
        """Book one slot in the cluster's window; return the seconds to wait before sending.

        :param now: the current UNIX time.
        """
        if self._resting(now):
            return self.fallback.reserve(now)
        try:
            reserve, _, _ = self._sync_scripts()
            wait, slot = self._booking(reserve(keys=self._keys, args=self._args(now, self._limit)))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            return self.fallback.reserve(now)
        self._reached()
        self._fly(now + wait, slot)
        return wait

    def block_until(self, until: float) -> None:
        """Hold the key for the whole cluster until ``until`` (at most ``max_block`` from now).

        :param until: UNIX time.
        """
        now = self._clock()
        if not math.isfinite(until) or self._resting(now):
            self.fallback.block_until(until)
            return
        try:
            _, block, _ = self._sync_scripts()
            block(keys=self._keys, args=self._args(now, until - now))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            self.fallback.block_until(until)
            return
        self._reached()

    def settle(self, booked: float, answered: float) -> None:
        """Move the slot booked for ``booked`` to the time of the answer, for the whole cluster.

        :param booked: the time the slot was booked for (``now`` + the wait :meth:`reserve` gave).
        :param answered: the UNIX time the answer came (Redis's own time is taken instead).
        """
        now = self._clock()
        slot = self._land(booked)
        if slot is None or self._resting(now):  # booked on the machine budget, or Redis is down
            self.fallback.settle(booked, answered)
            return
        try:
            _, _, settle = self._sync_scripts()
            settle(keys=self._keys, args=self._args(answered, slot))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            self.fallback.settle(booked, answered)
            return
        self._reached()

    def recall_owner(self, now: float) -> str | None:
        """Return the user budget id the cluster remembers for the key (Redis expires it), else the
        machine's.

        :param now: the current UNIX time.
        """
        if not self._resting(now):
            try:
                raw = self._sync_client().get(self._owner_key)
            except Exception as error:  # whatever Redis does, the upload goes on
                self._fell_back(now, error)
            else:
                self._reached()
                owner = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
                if is_owner(owner):
                    return str(owner)
        return self.fallback.recall_owner(now) if isinstance(self.fallback, OwnerMemory) else None

    def remember_owner(self, owner: str, now: float) -> None:
        """Remember the key's user budget id for the cluster and this machine for ``OWNER_TTL`` seconds.

        :param owner: the user budget id.
        :param now: the current UNIX time.
        """
        if isinstance(self.fallback, OwnerMemory):
            self.fallback.remember_owner(owner, now)
        if not self._resting(now):
            try:
                self._sync_client().set(self._owner_key, owner, ex=int(OWNER_TTL))
            except Exception as error:  # whatever Redis does, the upload goes on
                self._fell_back(now, error)
            else:
                self._reached()

    def connect(self) -> None:
        """Read the Redis connection now, so that the threads sharing this budget later make no Airflow call.

        A connection that cannot be read is left for the first request, which then uses the fallback.
        """
        try:
            self._sync_scripts()
        except Exception as error:  # reserve() meets it again and falls back, with its warning
            log.debug(
                "Cliniko rate budget: Redis %r not read yet (%s)", self.redis_conn_id, type(error).__name__
            )

    def _sync_client(self) -> redis.Redis:
        self._sync_scripts()
        assert self._client is not None
        return self._client

    def _sync_scripts(self) -> tuple[Script, Script, Script]:
        with self._lock:
            if self._scripts is None:
                import redis
                from airflow.providers.redis.hooks.redis import RedisHook
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                conn = RedisHook.get_connection(self.redis_conn_id)
                self._client = redis.Redis(**client_options(conn), retry=Retry(NoBackoff(), 0))
                self._scripts = (
                    self._client.register_script(RESERVE_SCRIPT),
                    self._client.register_script(BLOCK_SCRIPT),
                    self._client.register_script(SETTLE_SCRIPT),
                )
            return self._scripts

    # --- async ----------------------------------------------------------------------------------------

    async def areserve(self, now: float) -> float:
        """:meth:`reserve` with the async Redis client: the event loop never waits on a socket.

        :param now: the current UNIX time.
        """
        if self._resting(now):
            return await self.fallback.areserve(now)
        try:
            reserve, _, _ = await self._async_scripts()
            wait, slot = self._booking(await reserve(keys=self._keys, args=self._args(now, self._limit)))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            return await self.fallback.areserve(now)
        self._reached()
        self._fly(now + wait, slot)
        return wait

    async def ablock_until(self, until: float) -> None:
        """:meth:`block_until` with the async Redis client.

        :param until: UNIX time.
        """
        now = self._clock()
        if not math.isfinite(until) or self._resting(now):
            await self.fallback.ablock_until(until)
            return
        try:
            _, block, _ = await self._async_scripts()
            await block(keys=self._keys, args=self._args(now, until - now))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            await self.fallback.ablock_until(until)
            return
        self._reached()

    async def asettle(self, booked: float, answered: float) -> None:
        """:meth:`settle` with the async Redis client.

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the answer came.
        """
        now = self._clock()
        slot = self._land(booked)
        if slot is None or self._resting(now):
            await self.fallback.asettle(booked, answered)
            return
        try:
            _, _, settle = await self._async_scripts()
            await settle(keys=self._keys, args=self._args(answered, slot))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            await self.fallback.asettle(booked, answered)
            return
        self._reached()

    async def _async_scripts(self) -> tuple[AsyncScript, AsyncScript, AsyncScript]:
        # An asyncio client belongs to the event loop it was made in: make one per loop.
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            import redis.asyncio
            from airflow.providers.redis.hooks.redis import RedisHook
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            conn = await RedisHook.aget_connection(self.redis_conn_id)
            client = redis.asyncio.Redis(**client_options(conn), retry=Retry(NoBackoff(), 0))
            self._async = (
                loop,
                client.register_script(RESERVE_SCRIPT),
                client.register_script(BLOCK_SCRIPT),
                client.register_script(SETTLE_SCRIPT),
            )
        return self._async[1], self._async[2], self._async[3]

    # --- the scripts' arguments and answers, the slots in flight --------------------------------------

    def _args(self, now: float, arg: float | str) -> list[str]:
        pinned = repr(float(now)) if not self._redis_time else ""
        own = repr(float(arg)) if isinstance(arg, float) else str(arg)
        return [repr(WINDOW), repr(float(self._max_block)), repr(LONGEST_FLIGHT), pinned, own]

    def _booking(self, raw: object) -> tuple[float, str]:
        """The reserve script's answer: a wait (refused unless finite, cut to the window and the
        longest hold) and the slot's name."""
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        wait_text, _, slot = text.partition(" ")
        wait = float(wait_text)
        if not math.isfinite(wait) or not slot.isdigit():
            raise ValueError(f"Redis answered a booking of {text[:100]!r}")
        return min(max(0.0, wait), WINDOW + self._max_block), slot

    def _fly(self, booked: float, slot: str) -> None:
        with self._lock:
            self._flying.append((booked, slot))
            del self._flying[:-MAX_FLYING]

    def _land(self, booked: float) -> str | None:
        """The name of this process's slot in flight booked for ``booked``, no longer in flight."""
        with self._lock:
            for index, (at, slot) in enumerate(self._flying):
                if abs(at - booked) <= SETTLE_TOLERANCE:
                    del self._flying[index]
                    return slot
        return None

    def _resting(self, now: float) -> bool:
        """True while Redis failed lately: the machine budget serves until the time to try again."""
        return now < self._try_again_at

    def _fell_back(self, now: float, error: Exception) -> None:
        with self._lock:
            self.shared = False
            self._try_again_at = now + RETRY_REDIS_AFTER
            warn, self._warned = not self._warned and self._first_warning(), True
        reason = f"{type(error).__name__}: {error}"[:300]
        if isinstance(error, ImportError):
            fix = "install the provider's redis extra: pip install 'airflow-provider-cliniko[redis]'"
        elif type(error).__name__ == "AirflowNotFoundException":
            fix = (
                f"create the Airflow connection {self.redis_conn_id!r} (type redis), or correct redis_conn_id"
            )
        else:
            fix = "check that Redis is up and that this machine reaches it through that connection"
        self.problem = f"Redis connection {self.redis_conn_id!r} cannot be used ({reason}). Fix: {fix}."
        if warn:
            log.warning(
                "Cliniko rate budget: Redis connection %r cannot be used (%s); this process paces the key "
                "with the machine budget and tries Redis again every %.0f s. Uploads go on; processes on "
                "other machines no longer share this budget, so Cliniko may answer 429 (which is waited "
                "out). Fix: %s.",
                self.redis_conn_id,
                reason,
                RETRY_REDIS_AFTER,
                fix,
            )
        else:
            log.debug("Cliniko rate budget: Redis %r still cannot be used (%s)", self.redis_conn_id, reason)

    def _reached(self) -> None:
        if not self.shared:
            with self._lock:
                self.shared, self.problem = True, None
            log.info("Cliniko rate budget: Redis %r reachable again, sharing resumed", self.redis_conn_id)
