"""The cluster rate budget against a real redis-server: the Lua window, the shared hold, concurrency,
falling back to the machine budget and coming back, and what is (not) stored in Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cliniko_provider.utils import budget_redis
from cliniko_provider.utils.budget import LONGEST_FLIGHT, WINDOW, ProcessBudget, SlidingWindow
from cliniko_provider.utils.budget_redis import RedisBudget, client_options, redis_keys
from tests.e2e.stack import free_port
from tests.redis_server import RedisServer

REDIS_CONN = "cliniko_rate_redis"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_conn(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> RedisServer:
    monkeypatch.setenv(f"AIRFLOW_CONN_{REDIS_CONN.upper()}", redis_server.connection_json())
    return redis_server


@pytest.fixture
def kid() -> str:
    """A key id of this test only, so tests never share a window."""
    return uuid.uuid4().hex[:16]


class CountingBudget(ProcessBudget):
    """A process budget that counts how often it was used (the fallback's stand-in)."""

    def __init__(self, per_minute: float = 200, max_block: float = 65) -> None:
        super().__init__(per_minute, max_block, clock=lambda: 1000.0)
        self.calls = 0
        self.settled: list[tuple[float, float]] = []

    def reserve(self, now: float) -> float:
        self.calls += 1
        return super().reserve(now)

    def block_until(self, until: float) -> None:
        self.calls += 1
        super().block_until(until)

    def settle(self, booked: float, answered: float) -> None:
        self.calls += 1
        self.settled.append((booked, answered))
        super().settle(booked, answered)


def cluster(kid: str, per_minute: float = 3, max_block: float = 65, now: float = 1000.0) -> RedisBudget:
    """One process's view of the cluster budget (each call makes another process's, own client)."""
    fallback = CountingBudget(per_minute, max_block)
    return RedisBudget(kid, per_minute, max_block, REDIS_CONN, fallback, clock=lambda: now, redis_time=False)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_window_books_exactly_the_limit_then_waits_for_the_oldest(redis_conn: RedisServer, kid: str) -> None:
    budget = cluster(kid, per_minute=3)
    assert [budget.reserve(1000.0), budget.reserve(1000.5), budget.reserve(1001.0)] == [0.0, 0.0, 0.0]
    assert budget.reserve(1002.0) == 1000.0 + WINDOW - 1002.0  # the 4th goes when the 1st leaves
    # At exactly 1000 + WINDOW the first send leaves the window; the 4th (booked then) is in it, so the
    # 5th waits for the second send (1000.5) to leave.
    assert budget.reserve(1000.0 + WINDOW) == 0.5
    assert budget.fallback.calls == 0  # type: ignore[attr-defined]


def test_script_matches_the_machine_window_step_for_step(redis_conn: RedisServer, kid: str) -> None:
    """The Lua script and the machine budget's window are one algorithm: same waits for the same calls."""
    budget, reference = cluster(kid, per_minute=5, max_block=20), SlidingWindow(5, 20)
    times = [1000 + 7.3 * step % 90 + step for step in range(40)]
    for step, now in enumerate(times):
        if step % 9 == 4:
            budget._clock = lambda now=now: now  # type: ignore[misc]
            budget.block_until(now + 3.25)
            reference.block_until(now + 3.25, now)
        assert budget.reserve(now) == pytest.approx(reference.reserve(now), abs=1e-9), step


def test_a_hold_is_shared_by_every_process_and_bounded(redis_conn: RedisServer, kid: str) -> None:
    one, other = cluster(kid, per_minute=100, max_block=65), cluster(kid, per_minute=100, max_block=65)
    one.block_until(1030.0)
    assert other.reserve(1000.0) == 30.0
    one.block_until(1010.0)  # an earlier reset never shortens the hold
    assert other.reserve(1000.0) == 30.0
    one.block_until(1000.0 + 86_400)  # a day ahead: cut to max_block
    assert other.reserve(1000.0) == 65.0
    assert one.fallback.calls == 0  # type: ignore[attr-defined]


def test_a_hold_past_its_time_no_longer_holds(redis_conn: RedisServer, kid: str) -> None:
    one = cluster(kid, per_minute=100, now=1000.0)
    one.block_until(999.0)  # already over: nothing is held
    assert one.reserve(1000.0) == 0.0
    one.block_until(1000.0 + 5)
    assert one.reserve(1004.0) == 1.0
    assert one.reserve(1005.0) == 0.0


def test_a_non_finite_hold_never_reaches_redis(redis_conn: RedisServer, kid: str) -> None:
    budget = cluster(kid, per_minute=100)
    budget.block_until(float("inf"))
    budget.block_until(float("nan"))
    client = redis.Redis.from_url(redis_conn.url)
    assert client.get(redis_keys(kid)[2]) is None
    assert budget.reserve(1000.0) == 0.0


def test_concurrent_reservers_never_exceed_the_limit(redis_conn: RedisServer, kid: str) -> None:
    limit, threads, each = 20, 6, 7  # two windows' worth and a bit: the deepest queue paced exactly
    starts: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def worker() -> None:
        budget = cluster(kid, per_minute=limit)  # own client, as another process would have
        barrier.wait()
        for step in range(each):
            now = 1000.0 + step * 0.01
            wait = budget.reserve(now)
            with lock:
                starts.append(now + wait)
        assert budget.fallback.calls == 0  # type: ignore[attr-defined]

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    starts.sort()
    assert len(starts) == threads * each
    busiest = max(sum(1 for t in starts if first <= t < first + WINDOW) for first in starts)
    assert busiest == limit  # never more than the limit in any window, and the limit is used fully
    assert sum(1 for t in starts if t < 1001.0) == limit


async def test_async_path_shares_the_window_and_the_hold(redis_conn: RedisServer, kid: str) -> None:
    sync_budget, async_budget = cluster(kid, per_minute=2), cluster(kid, per_minute=2)
    assert sync_budget.reserve(1000.0) == 0.0
    assert await async_budget.areserve(1000.0) == 0.0
    assert await async_budget.areserve(1001.0) == 1000.0 + WINDOW - 1001.0
    await async_budget.ablock_until(1030.0)
    assert redis.Redis.from_url(redis_conn.url).get(redis_keys(kid)[2]) == b"1030"
    assert async_budget.fallback.calls == 0  # type: ignore[attr-defined]


def test_a_settled_slot_counts_from_its_answer_for_every_process(redis_conn: RedisServer, kid: str) -> None:
    one, two = cluster(kid, per_minute=1), cluster(kid, per_minute=1)
    assert one.reserve(1000.0) == 0.0
    one.settle(1000.0 + 0.0005, 1010.0)  # found within the tolerance
    assert two.reserve(1020.0) == 1010.0 + WINDOW - 1020.0
    client = redis.Redis.from_url(redis_conn.url)
    window = redis_keys(kid)[0]
    assert client.zrange(window, 0, -1, withscores=True) == [(b"1:a", 1010.0), (b"2", 1010.0 + WINDOW)]
    two.settle(1005.0, 1090.0)  # nothing booked then: no change
    two.settle(1010.0 + WINDOW, 1000.0)  # never earlier than booked
    assert client.zrange(window, 0, -1, withscores=True) == [(b"1:a", 1010.0), (b"2:a", 1010.0 + WINDOW)]
    # The settle of no slot this process booked in Redis goes to the machine budget (which has none).
    assert (one.fallback.calls, two.fallback.calls) == (0, 1)  # type: ignore[attr-defined]


def test_settle_keeps_the_window_in_redis_a_window_long(redis_conn: RedisServer, kid: str) -> None:
    budget = cluster(kid, per_minute=5)
    assert budget.reserve(1000.0) == 0.0
    client = redis.Redis.from_url(redis_conn.url)
    window = redis_keys(kid)[0]
    client.pexpire(window, 1000)
    budget.settle(1000.0, 1003.0)
    lifetime = (WINDOW + LONGEST_FLIGHT) * 1000  # a window past its latest slot, and the longest flight
    assert lifetime - 1000 < client.pttl(window) <= lifetime
    window_ttl, counter_ttl = client.pipeline().pttl(window).pttl(redis_keys(kid)[1]).execute()
    assert window_ttl <= counter_ttl  # the counter outlives the window


async def test_async_settle_is_shared(redis_conn: RedisServer, kid: str) -> None:
    one, two = cluster(kid, per_minute=1), cluster(kid, per_minute=1)
    assert await one.areserve(1000.0) == 0.0
    await one.asettle(1000.0, 1004.0)
    assert await two.areserve(1010.0) == 1004.0 + WINDOW - 1010.0
    assert one.fallback.calls == 0  # type: ignore[attr-defined]


async def test_async_reservations_never_exceed(redis_conn: RedisServer, kid: str) -> None:
    budget = cluster(kid, per_minute=10)
    waits = await asyncio.gather(*(budget.areserve(1000.0) for _ in range(25)))
    assert sorted(waits) == [0.0] * 10 + [WINDOW] * 10 + [2 * WINDOW] * 5


def test_nothing_secret_is_stored(redis_conn: RedisServer, kid: str) -> None:
    api_key = "MS0xLWFiY2RlZmdoaWprbG1ub3BxcnN0-au1"
    key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    budget = cluster(key_id, per_minute=5)
    for step in range(7):
        budget.reserve(1000.0 + step)
    budget.block_until(1020.0)
    client = redis.Redis.from_url(redis_conn.url, decode_responses=True)
    keys = redis_keys(key_id)
    assert sorted(client.scan_iter(f"cliniko:rate:{{{key_id}}}:*")) == sorted(keys)
    sent, seq, blocked = keys
    values: list[str] = [str(client.get(blocked)), str(client.get(seq))]
    values += [
        f"{member.removesuffix(':a')} {score}"
        for member, score in client.zrange(sent, 0, -1, withscores=True)
    ]
    assert client.zcard(sent) == 7  # the window's slots (5 sent, 2 booked ahead)
    for value in values:
        assert api_key not in value
        assert all(float(part) >= 0 for part in value.split())  # numbers only
    longest = (2 * WINDOW + 65 + LONGEST_FLIGHT) * 1000
    assert all(0 < client.pttl(key) <= longest for key in keys)  # nothing is kept forever


@pytest.mark.parametrize(("held", "wait"), [("1e300", 65.0), ("nonsense", 0.0), ("-5", 0.0), ("1030", 30.0)])
def test_damaged_hold_in_redis_is_bounded(redis_conn: RedisServer, kid: str, held: str, wait: float) -> None:
    redis.Redis.from_url(redis_conn.url).set(redis_keys(kid)[2], held)
    assert cluster(kid, per_minute=100).reserve(1000.0) == wait


def test_damaged_window_in_redis_falls_back_without_failing(
    redis_conn: RedisServer, kid: str, caplog: pytest.LogCaptureFixture
) -> None:
    settling = cluster(kid)
    assert settling.reserve(1000.0) == 0.0
    redis.Redis.from_url(redis_conn.url).set(redis_keys(kid)[0], "not a sorted set")
    budget = cluster(kid)
    assert budget.reserve(1000.0) == 0.0
    assert budget.fallback.calls == 1  # type: ignore[attr-defined]
    assert len(warnings(caplog)) == 1
    assert "WRONGTYPE" in warnings(caplog)[0]
    settling.settle(1000.0, 1001.0)
    assert settling.fallback.settled == [(1000.0, 1001.0)]  # type: ignore[attr-defined]
    assert settling.shared is False
    assert len(warnings(caplog)) == 2 and "WRONGTYPE" in warnings(caplog)[1]  # each process warns once


def test_unreachable_redis_falls_back_warns_once_and_comes_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, kid: str
) -> None:
    port = free_port()  # nothing listens there yet
    server = RedisServer(tmp_path / "redis", port=port)
    monkeypatch.setenv(f"AIRFLOW_CONN_{REDIS_CONN.upper()}", server.connection_json())
    caplog.set_level(logging.INFO, logger=budget_redis.__name__)
    budget = cluster(kid, per_minute=2)
    fallback = budget.fallback
    assert [budget.reserve(1000.0), budget.reserve(1001.0)] == [0.0, 0.0]
    assert budget.reserve(1002.0) == 1000.0 + WINDOW - 1002.0  # the machine budget paces meanwhile
    budget.settle(1000.0, 1001.5)  # settles where it booked: on the machine budget
    assert fallback.calls == 4  # type: ignore[attr-defined]
    fallback_sent = fallback._window.sent  # type: ignore[attr-defined]
    assert fallback_sent == [1001.0, 1001.5, 1000.0 + WINDOW]
    assert budget.shared is False
    (warning,) = warnings(caplog)
    assert REDIS_CONN in warning
    assert "ConnectionError" in warning
    with server:
        # Redis is up again, but the budget rests on the machine budget until its retry time...
        assert budget.reserve(1000.0 + budget_redis.RETRY_REDIS_AFTER - 0.001) > 0
        assert fallback.calls == 5  # type: ignore[attr-defined]
        # ...then the cluster budget is back (an empty window: the machine's bookings stayed local).
        assert budget.reserve(1000.0 + budget_redis.RETRY_REDIS_AFTER) == 0.0
        assert fallback.calls == 5  # type: ignore[attr-defined]
        assert budget.shared is True
        assert any("sharing resumed" in r.getMessage() for r in caplog.records)
        server.kill()
        # Down again: the machine budget serves; still the one warning of this process.
        budget.reserve(2000.0)
        assert fallback.calls == 6  # type: ignore[attr-defined]
    assert len(warnings(caplog)) == 1


async def test_unreachable_redis_async_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kid: str
) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{REDIS_CONN.upper()}", RedisServer(Path("unused"), port=free_port()).connection_json()
    )
    budget = cluster(kid, per_minute=1)
    assert await budget.areserve(1000.0) == 0.0
    await budget.ablock_until(1010.0)
    assert await budget.areserve(1001.0) == 1000.0 + WINDOW - 1001.0  # the machine's window, held too
    await budget.asettle(1000.0, 1002.0)
    assert budget.fallback.calls == 4  # type: ignore[attr-defined]
    assert budget.fallback._window.sent == [1002.0, 1000.0 + WINDOW]  # type: ignore[attr-defined]
    assert len(warnings(caplog)) == 1


def test_missing_redis_connection_falls_back(caplog: pytest.LogCaptureFixture, kid: str) -> None:
    budget = RedisBudget(kid, 3, 65, "no_such_redis_conn", CountingBudget())
    assert budget.reserve(1000.0) == 0.0
    assert budget.fallback.calls == 1  # type: ignore[attr-defined]
    assert "no_such_redis_conn" in warnings(caplog)[0]


def test_a_redis_that_never_answers_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kid: str
) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{REDIS_CONN.upper()}", RedisServer(Path("unused"), port=port).connection_json()
        )
        budget = cluster(kid)
        assert budget.reserve(1000.0) == 0.0
    assert budget.fallback.calls == 1  # type: ignore[attr-defined]
    assert "Timeout" in warnings(caplog)[0]


def test_client_options_read_the_redis_connection_with_short_timeouts() -> None:
    from airflow.sdk import Connection

    conn = Connection(
        conn_id="r",
        conn_type="redis",
        host="redis.internal",
        port=6380,
        login="app",
        password="s3cret",
        extra='{"db": 2, "ssl": true, "ssl_cert_reqs": "required", "unrelated": 1}',
    )
    options = client_options(conn)
    assert options == {
        "host": "redis.internal",
        "port": 6380,
        "username": "app",
        "password": "s3cret",
        "db": 2,
        "socket_timeout": budget_redis.REDIS_TIMEOUT,
        "socket_connect_timeout": budget_redis.REDIS_TIMEOUT,
        "ssl": True,
        "ssl_cert_reqs": "required",
    }
    bare = client_options(Connection(conn_id="r", conn_type="redis", password="None"))
    assert (bare["host"], bare["port"], bare["password"], bare["db"]) == ("localhost", 6379, None, 0)


def test_budget_for_gives_the_cluster_budget_when_redis_is_named(redis_conn: RedisServer) -> None:
    from cliniko_provider.utils.budget import MachineBudget, budget_for
    from cliniko_provider.utils.settings import ClinikoSettings

    def settings(key: str, redis_conn_id: str | None) -> ClinikoSettings:
        return ClinikoSettings(
            conn_id="c",
            api_key=key,
            base_url="http://x/v1",
            user_agent="A (a@b.c)",
            redis_conn_id=redis_conn_id,
        )

    machine = budget_for(settings("k1-au1", None))
    assert isinstance(machine, MachineBudget)
    clustered = budget_for(settings("k1-au1", REDIS_CONN))
    assert isinstance(clustered, RedisBudget)
    assert clustered.fallback is machine  # the same key's machine budget stands in for Redis
    assert budget_for(settings("k1-au1", REDIS_CONN)) is clustered
    assert budget_for(settings("k2-au1", REDIS_CONN)) is not clustered
    assert clustered.reserve(1000.0) == 0.0
    assert clustered.shared is True


def test_missing_redis_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kid: str
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # as if the redis extra were not installed
    budget = cluster(kid)
    assert budget.reserve(1000.0) == 0.0
    assert budget.fallback.calls == 1  # type: ignore[attr-defined]
    assert "airflow-provider-cliniko[redis]" in warnings(caplog)[0]


def test_connect_reads_the_redis_connection_before_any_request(
    redis_conn: RedisServer, kid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = cluster(kid)
    budget.connect()
    monkeypatch.delenv(f"AIRFLOW_CONN_{REDIS_CONN.upper()}")  # a later look-up would no longer find it
    assert budget.reserve(1000.0) == 0.0
    assert budget.fallback.calls == 0  # type: ignore[attr-defined]


def test_connect_leaves_a_missing_connection_to_the_first_request(
    caplog: pytest.LogCaptureFixture, kid: str
) -> None:
    budget = RedisBudget(kid, 3, 65, "no_such_redis_conn", CountingBudget())
    budget.connect()  # no error and no warning yet
    assert warnings(caplog) == []
    assert budget.reserve(1000.0) == 0.0
    assert budget.fallback.calls == 1  # type: ignore[attr-defined]
    assert "no_such_redis_conn" in warnings(caplog)[0]


def test_a_hold_while_redis_cannot_be_used_goes_to_the_fallback(
    caplog: pytest.LogCaptureFixture, kid: str
) -> None:
    budget = RedisBudget(kid, 3, 65, "no_such_redis_conn", CountingBudget(), clock=lambda: 1000.0)
    budget.block_until(1030.0)
    assert budget.fallback.calls == 1  # type: ignore[attr-defined]
    assert budget.fallback.reserve(1000.0) == pytest.approx(30.0)
    assert len(warnings(caplog)) == 1 and "no_such_redis_conn" in warnings(caplog)[0]
    budget.block_until(1040.0)  # resting from Redis: straight to the fallback, no second warning
    assert budget.fallback.reserve(1000.0) == pytest.approx(40.0)
    assert len(warnings(caplog)) == 1
