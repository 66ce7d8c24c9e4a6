"""One suite for every rate budget backend: the process's, the machine file's and Redis's Lua window are one
algorithm, so the same calls give the same waits. The Redis budget runs against a real redis-server with
its clock pinned to the test's (``redis_time=False``); the tests at the end run it on Redis's own clock."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cliniko_provider.utils.budget import LONGEST_FLIGHT, WINDOW, MachineBudget, ProcessBudget, RateBudget
from cliniko_provider.utils.budget_redis import RedisBudget, redis_keys
from tests.fake_http import FakeClock
from tests.redis_server import RedisServer
from tests.test_budget_redis import REDIS_CONN, redis_conn, redis_server  # noqa: F401 (fixtures)

NOW = 1_000.0
Make = Callable[..., RateBudget]


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the Redis the budgets' connection names."""
    server: RedisServer = request.getfixturevalue("redis_conn")
    return server.url


def redis_budget(
    kid: str, per_minute: float, max_block: float, clock: FakeClock, redis_time: bool
) -> RedisBudget:
    fallback = ProcessBudget(per_minute, max_block, clock=clock)
    return RedisBudget(kid, per_minute, max_block, REDIS_CONN, fallback, clock=clock, redis_time=redis_time)


@pytest.fixture(params=["process", "machine", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """Builds a budget of the backend under test: ``make(per_minute, max_block=65, clock=...)``; every
    budget one test makes shares one window (one key)."""
    kid = uuid.uuid4().hex[:16]
    if request.param == "redis":
        request.getfixturevalue("redis_conn")

    def build(per_minute: float, max_block: float = 65.0, clock: FakeClock | None = None) -> RateBudget:
        clock = clock or FakeClock(NOW)
        if request.param == "process":
            return ProcessBudget(per_minute, max_block, clock=clock)
        if request.param == "machine":
            return MachineBudget(kid, per_minute, max_block, state_dir=tmp_path / "state", clock=clock)
        budget = redis_budget(kid, per_minute, max_block, clock, redis_time=False)
        return budget

    return build


def test_the_window_books_exactly_the_limit_then_waits_for_the_oldest_to_leave(make: Make) -> None:
    budget = make(3)
    assert [budget.reserve(NOW), budget.reserve(NOW + 0.5), budget.reserve(NOW + 1)] == [0, 0, 0]
    assert budget.reserve(NOW + 2) == pytest.approx(WINDOW - 2)
    # At exactly NOW + WINDOW the first send leaves the window; the 5th waits for the second to leave.
    assert budget.reserve(NOW + WINDOW) == pytest.approx(0.5)
    assert _shared(budget)


def test_a_settled_slot_counts_from_its_answer(make: Make) -> None:
    budget = make(1)
    assert budget.reserve(NOW) == 0
    budget.settle(NOW + 0.0005, NOW + 10)  # found within the tolerance, moved to its answer
    assert budget.reserve(NOW + 20) == pytest.approx(10 + WINDOW - 20)
    budget.settle(NOW + 5, NOW + 40)  # nothing booked then: no change
    budget.settle(NOW + 10 + WINDOW, NOW + 9)  # an answer "before" its booking (a clock step): kept there
    assert budget.reserve(NOW + 10 + WINDOW) == pytest.approx(WINDOW)
    assert _shared(budget)


def test_a_slot_in_flight_is_kept_until_settled_past_the_limit(make: Make) -> None:
    """A slow request's slot is not dropped when more than the limit are booked after it: its settle
    still moves it to its answer, and the window counts it there."""
    budget = make(2)
    assert budget.reserve(NOW) == 0  # slow: answered 30 s later
    assert budget.reserve(NOW + 1) == 0
    budget.settle(NOW + 1, NOW + 1.5)
    assert budget.reserve(NOW + 2) == pytest.approx(WINDOW - 2)  # booked for NOW + WINDOW
    budget.settle(NOW, NOW + 30)
    # The latest two slots are now the slow one (answered at +30) and the one booked for +WINDOW.
    assert budget.reserve(NOW + WINDOW + 1) == pytest.approx(30 + WINDOW - (WINDOW + 1))
    assert _shared(budget)


@pytest.mark.parametrize(("late", "kept"), [(-0.001, True), (0.0, False)])
def test_a_slot_never_settled_is_forgotten_longest_flight_after_the_window(
    make: Make, late: float, kept: bool
) -> None:
    clock = FakeClock(NOW)
    budget = make(1, clock=clock)
    assert budget.reserve(NOW) == 0  # its process dies: never settled
    later = NOW + WINDOW + LONGEST_FLIGHT + late
    assert budget.reserve(later) == 0
    clock.now = later
    budget.settle(NOW, later + 1)  # a settle that comes after all, answered a second later
    assert budget.reserve(later + 2) == pytest.approx((later + 1 if kept else later) + WINDOW - (later + 2))


def test_a_wait_is_never_longer_than_the_window_and_the_longest_hold(make: Make) -> None:
    clock = FakeClock(NOW)
    budget = make(2, max_block=10, clock=clock)
    budget.block_until(NOW + 86_400)  # a day ahead: cut to max_block
    assert [budget.reserve(NOW) for _ in range(5)] == [10, 10] + [WINDOW + 10] * 3
    assert _shared(budget)


def test_a_queue_deeper_than_the_bound_is_cut_to_it(make: Make) -> None:
    budget = make(2, max_block=10)
    assert [budget.reserve(NOW) for _ in range(7)] == [0, 0, WINDOW, WINDOW] + [WINDOW + 10] * 3
    assert _shared(budget)


def test_a_hold_is_bounded_and_never_shortened(make: Make) -> None:
    clock = FakeClock(NOW)
    budget = make(100, clock=clock)
    budget.block_until(NOW - 1)  # over already
    assert budget.reserve(NOW) == 0
    budget.block_until(NOW + 30)
    budget.block_until(NOW + 10)  # an earlier reset never shortens the hold
    assert budget.reserve(NOW) == 30
    budget.block_until(NOW + 86_400)
    assert budget.reserve(NOW) == 65
    budget.block_until(float("inf"))
    budget.block_until(float("nan"))
    assert budget.reserve(NOW + 64) == 1
    assert budget.reserve(NOW + 65) == 0
    assert _shared(budget)


async def test_the_async_twins_share_the_window(make: Make) -> None:
    clock = FakeClock(NOW)
    budget = make(1, clock=clock)
    assert await budget.areserve(NOW) == 0
    await budget.asettle(NOW, NOW + 4)
    await budget.ablock_until(NOW + 100)
    assert await budget.areserve(NOW + 10) == pytest.approx(55)  # held until NOW + 65
    assert budget.reserve(NOW + 75) == pytest.approx(WINDOW - 10)  # from the held slot, in flight
    assert _shared(budget)


def _shared(budget: RateBudget) -> bool:
    """True unless the budget worked alone (a machine budget without its file, Redis on its fallback)."""
    return getattr(budget, "sharing", True) and getattr(budget, "shared", True)


# --- Redis's own clock ------------------------------------------------------------------------------------


def test_redis_time_makes_a_fast_clock_harmless(redis_url: str) -> None:
    """A process whose clock is an hour fast books, settles and holds on Redis's clock: the others' waits
    are those of the real window, never an hour."""
    kid = uuid.uuid4().hex[:16]
    fast, on_time = FakeClock(time.time() + 3600), FakeClock(time.time())
    ahead = redis_budget(kid, 2, 65, fast, redis_time=True)
    other = redis_budget(kid, 2, 65, on_time, redis_time=True)
    assert [ahead.reserve(fast()), ahead.reserve(fast())] == [0, 0]
    ahead.settle(fast(), fast() + 1)
    wait = other.reserve(on_time())
    assert WINDOW - 5 < wait <= WINDOW  # the real window, from the fast one's sends
    client = redis.Redis.from_url(redis_url)
    scores = [score for _, score in client.zrange(redis_keys(kid)[0], 0, -1, withscores=True)]
    assert all(abs(score - time.time()) < WINDOW + 5 for score in scores)  # Redis's time, not the fast one
    ahead.block_until(fast() + 20)  # a 429's reset, 20 s ahead on the fast clock: a 20 s hold for all
    held = float(client.get(redis_keys(kid)[2]) or 0)
    assert 15 < held - time.time() <= 20
    assert (ahead.shared, other.shared) == (True, True)


def test_redis_clamps_scores_no_clock_of_ours_wrote(redis_url: str) -> None:
    """Slots scored a day ahead (an older version on a skewed machine, or any writer) never make a wait
    longer than a window and the longest hold, and a settle of one lands at the latest within that."""
    kid = uuid.uuid4().hex[:16]
    client = redis.Redis.from_url(redis_url)
    window = redis_keys(kid)[0]
    client.zadd(window, {"old-version-1": time.time() + 86_400, "old-version-2": float("inf")})
    budget = redis_budget(kid, 2, 10, FakeClock(time.time()), redis_time=True)
    assert WINDOW + 10 - 2 < budget.reserve(time.time()) <= WINDOW + 10
    assert 0 < client.pttl(window) <= (2 * WINDOW + 10 + LONGEST_FLIGHT) * 1000
    window_ttl, counter_ttl = client.pipeline().pttl(window).pttl(redis_keys(kid)[1]).execute()
    assert 0 < window_ttl <= counter_ttl  # the counter never expires first
