"""The cluster rate budget: one sliding window per API key in Redis, shared by every machine.

Every worker on every machine and every triggerer that names the same Airflow Redis connection
(``redis_conn_id`` in the Cliniko connection's extras) books its requests in one window per key, kept
in Redis and changed atomically by a Lua script; a 429's reset holds the key for all of them at once.
Nothing secret goes into Redis: the keys are named by a hash of the API key, the values are times
(the window's members are sequence numbers, scored by their send times, then by their answers).

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

from cliniko_provider.utils.budget import SETTLE_TOLERANCE, WINDOW, RateBudget

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.commands.core import AsyncScript, Script

log = logging.getLogger(__name__)

REDIS_TIMEOUT = 2.0  # seconds, for connecting and for each command: a slower Redis counts as down
RETRY_REDIS_AFTER = 10.0  # seconds on the machine budget before Redis is tried again
KEY_PREFIX = "cliniko:rate"

# KEYS: the window (sorted set: sequence numbers scored by send time), the hold, the sequence counter.
# ARGV: now, requests per window, window length, longest hold (all seconds; times are UNIX times).
# Returns the seconds to wait before sending, as a string (Redis truncates Lua numbers to integers).
RESERVE_SCRIPT = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max_block = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local start = now
local blocked = tonumber(redis.call('GET', KEYS[2]))
if blocked then
  start = math.max(start, math.min(blocked, now + max_block))
end
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
  start = math.max(start, tonumber(oldest[2]) + window)
end
local seq = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], string.format('%.17g', start), seq)
if count + 1 > limit then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, count - limit)
end
local ttl = math.ceil((start - now + window) * 1000)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
return string.format('%.17g', start - now)
"""

# KEYS: the hold. ARGV: until, now, longest hold. Keeps the later of the held and the new time.
BLOCK_SCRIPT = """
local now = tonumber(ARGV[2])
local hold = math.min(tonumber(ARGV[1]), now + tonumber(ARGV[3]))
if hold <= now then
  return 0
end
local current = tonumber(redis.call('GET', KEYS[1]))
if current and current >= hold and current <= now + tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], string.format('%.17g', hold), 'PX', math.ceil((hold - now) * 1000))
return 1
"""


# KEYS: the window. ARGV: booked, answered, tolerance, window length. Moves the slot booked for
# `booked` to `answered` (never earlier); keeps the window at least one window length longer.
SETTLE_SCRIPT = """
local booked = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[3])
local found = redis.call('ZRANGEBYSCORE', KEYS[1], booked - tolerance, booked + tolerance, 'LIMIT', 0, 1)
if not found[1] then
  return 0
end
local moved = math.max(booked, tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], 'XX', string.format('%.17g', moved), found[1])
local ttl = math.ceil(tonumber(ARGV[4]) * 1000)
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""


def redis_keys(kid: str) -> list[str]:
    """Return the Redis keys of one API key's budget: window, hold, sequence counter.

    The ``{...}`` hash tag keeps the three in one slot, as a script's keys must be.

    :param kid: the key's identifier (a hash of the API key, never the key).
    """
    base = f"{KEY_PREFIX}:{{{kid}}}"
    return [f"{base}:sent", f"{base}:blocked", f"{base}:seq"]


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

    :param kid: the key's identifier (a hash of the API key).
    :param per_minute: requests allowed in any window of ``WINDOW`` seconds.
    :param max_block: the longest hold after a 429, in seconds (a longer one is cut to this).
    :param redis_conn_id: the Airflow connection (type ``redis``) of the shared Redis.
    :param fallback: the budget used while Redis cannot be reached (the machine budget).
    :param clock: the current UNIX time (for holds, and for when to try Redis again).
    """

    def __init__(
        self,
        kid: str,
        per_minute: float,
        max_block: float,
        redis_conn_id: str,
        fallback: RateBudget,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis_conn_id = redis_conn_id
        self.fallback = fallback
        self._keys = redis_keys(kid)
        self._limit = max(1, int(per_minute))
        self._max_block = max_block
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: tuple[Script, Script, Script] | None = None
        self._async: tuple[asyncio.AbstractEventLoop, AsyncScript, AsyncScript, AsyncScript] | None = None
        self._try_again_at = -math.inf
        self._warned = False
        self.shared = True

    # --- sync -----------------------------------------------------------------------------------------

    def reserve(self, now: float) -> float:
        """Book one slot in the cluster's window; return the seconds to wait before sending.

        :param now: the current UNIX time.
        """
        if self._resting(now):
            return self.fallback.reserve(now)
        try:
            reserve, _, _ = self._sync_scripts()
            wait = _seconds(reserve(keys=self._keys, args=self._reserve_args(now)))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            return self.fallback.reserve(now)
        self._reached()
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
            block(keys=self._keys[1:2], args=self._block_args(until, now))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            self.fallback.block_until(until)
            return
        self._reached()

    def settle(self, booked: float, answered: float) -> None:
        """Move the slot booked for ``booked`` to ``answered``, for the whole cluster.

        :param booked: the time the slot was booked for.
        :param answered: the UNIX time the answer came.
        """
        now = self._clock()
        if self._resting(now):
            self.fallback.settle(booked, answered)
            return
        try:
            _, _, settle = self._sync_scripts()
            settle(keys=self._keys[:1], args=self._settle_args(booked, answered))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            self.fallback.settle(booked, answered)
            return
        self._reached()

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
            wait = _seconds(await reserve(keys=self._keys, args=self._reserve_args(now)))
        except Exception as error:  # whatever Redis does, the upload goes on
            self._fell_back(now, error)
            return await self.fallback.areserve(now)
        self._reached()
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
            await block(keys=self._keys[1:2], args=self._block_args(until, now))
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
        if self._resting(now):
            await self.fallback.asettle(booked, answered)
            return
        try:
            _, _, settle = await self._async_scripts()
            await settle(keys=self._keys[:1], args=self._settle_args(booked, answered))
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

    # --- falling back and coming back -----------------------------------------------------------------

    def _reserve_args(self, now: float) -> list[str]:
        return [repr(float(now)), str(self._limit), repr(WINDOW), repr(float(self._max_block))]

    def _settle_args(self, booked: float, answered: float) -> list[str]:
        return [repr(float(booked)), repr(float(answered)), repr(SETTLE_TOLERANCE), repr(WINDOW)]

    def _block_args(self, until: float, now: float) -> list[str]:
        return [repr(float(until)), repr(float(now)), repr(float(self._max_block))]

    def _resting(self, now: float) -> bool:
        """True while Redis failed lately: the machine budget serves until the time to try again."""
        return now < self._try_again_at

    def _fell_back(self, now: float, error: Exception) -> None:
        with self._lock:
            self.shared = False
            self._try_again_at = now + RETRY_REDIS_AFTER
            warn, self._warned = not self._warned, True
        reason = f"{type(error).__name__}: {error}"[:300]
        fix = (
            "install the provider's redis extra: pip install 'airflow-provider-cliniko[redis]'"
            if isinstance(error, ImportError)
            else "check that Redis is up and that this machine reaches it through that connection"
        )
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
                self.shared = True
            log.info("Cliniko rate budget: Redis %r reachable again, sharing resumed", self.redis_conn_id)


def _seconds(raw: object) -> float:
    """The script's answer as a wait in seconds, refusing anything that is not a finite number."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    wait = float(text)
    if not math.isfinite(wait):
        raise ValueError(f"Redis answered a wait of {text!r}")
    return max(0.0, wait)
