"""The budget of the Cliniko user behind a key: learned once per key (GET /user), remembered where the key's
budget lives (Redis, the machine's private state), the key's own budget while it cannot be learned."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from cliniko_provider.exceptions import ClinikoConnectionError, ClinikoPermissionError
from cliniko_provider.utils.budget import (
    OWNER_RETRY_AFTER,
    OWNER_TTL,
    WINDOW,
    Budgets,
    MachineBudget,
    ProcessBudget,
    auser_budget,
    budget_for,
    key_id,
    owner_record,
    read_owner_record,
    user_budget,
    user_budget_id,
    user_id_of,
)
from cliniko_provider.utils.budget_redis import RedisBudget, owner_key
from tests.fake_http import FakeClock
from tests.redis_server import RedisServer
from tests.test_budget_redis import REDIS_CONN, redis_conn, redis_server  # noqa: F401 (fixtures)

BASE = "https://api.au1.cliniko.com/v1"


@dataclass
class Settings:
    api_key: str
    requests_per_minute: float = 3
    max_rate_limit_wait: float = 65.0
    redis_conn_id: str | None = None
    base_url: str = BASE


class LookUp:
    """A scripted GET /user: answers (or raises) each in turn, counting the calls."""

    def __init__(self, *answers: dict[str, Any] | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def acall(self) -> dict[str, Any]:
        return self()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_two_keys_of_one_user_get_one_budget_and_another_user_another() -> None:
    budgets, clock = Budgets(), FakeClock()
    one = user_budget(Settings("key-one-au1"), LookUp({"id": 7}), budgets, clock)
    two = user_budget(Settings("key-two-au1"), LookUp({"id": "7"}), budgets, clock)
    other = user_budget(Settings("key-three-au1"), LookUp({"id": 8}), budgets, clock)
    assert one is two and one is not other
    assert one is budget_for(Settings("x"), budgets, user_budget_id(BASE, "7"))
    # the same user id on another API (another shard or a sandbox) is another user
    assert user_budget_id(BASE, "7") != user_budget_id("http://127.0.0.1:8765/v1", "7")


def test_each_look_up_is_counted_on_the_users_budget() -> None:
    budgets, clock = Budgets(), FakeClock(time.time())  # the machine budget settles on the real clock
    budget = user_budget(Settings("key-one-au1", requests_per_minute=3), LookUp({"id": 7}), budgets, clock)
    user_budget(Settings("key-two-au1", requests_per_minute=3), LookUp({"id": 7}), budgets, clock)
    # two GET /user went out (one per key, each paced on its key's budget): 1 of the user's 3 slots left
    assert budget.reserve(clock()) == 0.0
    assert budget.reserve(clock()) == WINDOW


def test_a_key_is_looked_up_once_and_remembered_until_its_time() -> None:
    budgets, clock = Budgets(), FakeClock()
    settings = Settings("key-au1")
    look_up = LookUp({"id": 7}, {"id": 7})
    first = user_budget(settings, look_up, budgets, clock)
    clock.now += OWNER_TTL - 1
    assert user_budget(settings, look_up, budgets, clock) is first and look_up.calls == 1
    os.environ["CLINIKO_STATE_DIR"] = str(Path(os.environ["CLINIKO_STATE_DIR"]) / "elsewhere")  # no memory
    clock.now += 1
    assert user_budget(settings, look_up, budgets, clock) is first and look_up.calls == 2


@pytest.mark.parametrize(
    "failure",
    [
        ClinikoPermissionError(403, "Forbidden", request="GET /user"),
        ClinikoConnectionError("Could not reach Cliniko"),
        {"id": None},
        {"id": "12; DROP"},
        {"id": True},
        {"first_name": "no id"},
        {"id": "1" * 33},
    ],
    ids=["403", "network", "null", "not-digits", "bool", "missing", "too-long"],
)
def test_a_failed_look_up_falls_back_to_the_keys_budget_with_one_warning(
    failure: Any, caplog: pytest.LogCaptureFixture
) -> None:
    budgets, clock = Budgets(), FakeClock()
    settings = Settings("key-au1")
    look_up = LookUp(failure, failure, {"id": 7})
    key_budget = budget_for(settings, budgets)
    assert user_budget(settings, look_up, budgets, clock) is key_budget
    clock.now += OWNER_RETRY_AFTER - 1
    assert user_budget(settings, look_up, budgets, clock) is key_budget and look_up.calls == 1
    clock.now += 1  # asked again: fails again, no second warning
    assert user_budget(settings, look_up, budgets, clock) is key_budget and look_up.calls == 2
    (warning,) = warnings(caplog)
    assert "cannot learn which Cliniko user this API key belongs to" in warning and "600 s" in warning
    clock.now += OWNER_RETRY_AFTER  # learned at last
    assert user_budget(settings, look_up, budgets, clock) is not key_budget and look_up.calls == 3


def test_user_id_of_takes_digits_only() -> None:
    assert [user_id_of({"id": v}) for v in (7, "7", "0" * 32)] == ["7", "7", "0" * 32]
    assert [user_id_of({"id": v}) for v in (-7, 7.0, "٣", "", None, [7], "0" * 33)] == [None] * 7


def test_the_machine_remembers_the_user_by_the_keys_hash_and_never_the_key(tmp_path: Path) -> None:
    key = "MaChInEsEcReTkEy-au1"
    settings = Settings(key)
    user_budget(settings, LookUp({"id": 7}), Budgets(), FakeClock())
    other_process = LookUp()  # would fail if asked
    assert user_budget(settings, other_process, Budgets(), FakeClock()) is not None
    assert other_process.calls == 0
    root = Path(os.environ["CLINIKO_STATE_DIR"])
    stored = all_files(root)
    assert f"rate/cliniko-owner-{key_id(key)}.json" in stored
    assert all(key.encode() not in data and "MaChInE" not in name for name, data in stored.items())


def test_a_remembered_user_expires_and_damage_is_ignored(tmp_path: Path) -> None:
    machine = MachineBudget(key_id("k"), 3, 65.0, state_dir=tmp_path)
    owner = user_budget_id(BASE, "7")
    machine.remember_owner(owner, 1000.0)
    assert machine.recall_owner(1000.0 + OWNER_TTL - 1) == owner
    assert machine.recall_owner(1000.0 + OWNER_TTL) is None
    assert machine.recall_owner(1000.0 - 1) is None  # a record from the future (a clock set back) is not
    record = json.loads(owner_record(owner, 1000.0))
    for damaged in (
        b"not json",
        b"[]",
        json.dumps({**record, "owner": "ABCDEF0123456789"}).encode(),
        json.dumps({**record, "owner": owner[:-1]}).encode(),
        json.dumps({**record, "until": "soon"}).encode(),
        json.dumps({**record, "until": float("nan")}).encode(),
        json.dumps({**record, "until": True}).encode(),
        json.dumps({**record, "pad": "x" * 256}).encode(),
        None,
        b"",
    ):
        assert read_owner_record(damaged, 1000.0) is None, damaged
    assert read_owner_record(owner_record(owner, 1000.0), 1000.0) == owner
    exact = owner_record(owner, 1000.0)[:-1] + b" " * (256 - len(owner_record(owner, 1000.0))) + b"}"
    assert len(exact) == 256 and read_owner_record(exact, 1000.0) == owner  # at most 256 bytes are read
    assert read_owner_record(exact[:-1] + b" }", 1000.0) is None


def test_redis_remembers_the_user_for_the_cluster_by_the_keys_hash(redis_conn: RedisServer) -> None:  # noqa: F811
    key = "ReDiSsEcReTkEy-au1"
    settings = Settings(key, redis_conn_id=REDIS_CONN)
    look_up = LookUp({"id": 7})
    budget = user_budget(settings, look_up, Budgets(), FakeClock())
    assert isinstance(budget, RedisBudget)
    client = redis.Redis.from_url(redis_conn.url)
    assert client.get(owner_key(key_id(key))) == user_budget_id(BASE, "7").encode()
    assert 0 < client.ttl(owner_key(key_id(key))) <= OWNER_TTL
    assert all(
        key.encode() not in name and key.encode() not in (client.dump(name) or b"")
        for name in client.scan_iter()
    )
    # another machine (its own private state) finds it in Redis and asks nothing
    os.environ["CLINIKO_STATE_DIR"] = str(Path(os.environ["CLINIKO_STATE_DIR"]) / "machine-2")
    asked, budgets = LookUp(), Budgets()
    found = user_budget(settings, asked, budgets, FakeClock())
    assert found is budget_for(settings, budgets, user_budget_id(BASE, "7")) and asked.calls == 0
    # what is not a budget id in Redis is not taken
    client.set(owner_key(key_id(key)), b"../../etc/passwd")
    os.environ["CLINIKO_STATE_DIR"] = str(Path(os.environ["CLINIKO_STATE_DIR"]) / "machine-3")
    again = LookUp({"id": 7})
    user_budget(settings, again, Budgets(), FakeClock())
    assert again.calls == 1


@pytest.mark.parametrize("stored", [b"\xff\xfe not ascii", b"0123456789abcdeg", b""])
def test_what_redis_holds_that_is_no_budget_id_is_asked_again(
    redis_conn: RedisServer,  # noqa: F811
    stored: bytes,
) -> None:
    key = "DaMaGeDkEy-au1"
    redis.Redis.from_url(redis_conn.url).set(owner_key(key_id(key)), stored)
    settings, budgets, look_up = Settings(key, redis_conn_id=REDIS_CONN), Budgets(), LookUp({"id": 7})
    assert user_budget(settings, look_up, budgets, FakeClock()) is budget_for(
        settings, budgets, user_budget_id(BASE, "7")
    )
    assert look_up.calls == 1


def test_redis_that_fails_to_remember_warns_once_and_rests(
    redis_conn: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = "ReAdOnLyKeY-au1"
    budget = budget_for(Settings(key, redis_conn_id=REDIS_CONN), Budgets())
    assert isinstance(budget, RedisBudget)
    now = time.time()
    assert budget.recall_owner(now) is None  # Redis reached: nothing there yet
    client = budget._sync_client()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise redis.ReadOnlyError("You can't write against a read only replica.")

    client.set = refuse  # type: ignore[method-assign]
    budget.remember_owner(user_budget_id(BASE, "7"), now)
    assert budget.shared is False
    (warning,) = warnings(caplog)
    assert "ReadOnlyError: You can't write against a read only replica." in warning
    # the machine remembered it; Redis rests, so the machine answers meanwhile
    assert budget.recall_owner(now + 1) == user_budget_id(BASE, "7")


def test_redis_down_recalls_from_a_machine_budget_and_not_from_a_process_budget(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{REDIS_CONN.upper()}", '{"conn_type": "redis", "host": "127.0.0.1", "port": 1}'
    )
    owner, now = user_budget_id(BASE, "7"), time.time()
    machine = MachineBudget(key_id("down-key-au1"), 3, 65.0)
    machine.remember_owner(owner, now)
    assert RedisBudget(key_id("down-key-au1"), 3, 65.0, REDIS_CONN, machine).recall_owner(now) == owner
    (warning,) = warnings(caplog)
    assert "cannot be used (ConnectionError: " in warning  # the reason Redis could not be asked
    alone = RedisBudget(key_id("down-key-au1"), 3, 65.0, REDIS_CONN, ProcessBudget(3, 65.0))
    assert alone.recall_owner(now) is None
    alone.remember_owner(owner, now)  # nowhere to keep it: nothing happens
    assert alone.recall_owner(now) is None


def test_redis_down_remembers_on_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{REDIS_CONN.upper()}", '{"conn_type": "redis", "host": "127.0.0.1", "port": 1}'
    )
    settings = Settings("down-key-au1", redis_conn_id=REDIS_CONN)
    budget = user_budget(settings, LookUp({"id": 7}), Budgets(), FakeClock())
    assert isinstance(budget, RedisBudget)
    machine = MachineBudget(key_id("down-key-au1"), 3, 65.0)
    assert machine.recall_owner(FakeClock()()) == user_budget_id(BASE, "7")


def test_threads_wait_for_one_look_up() -> None:
    budgets, clock = Budgets(), FakeClock()
    settings = Settings("key-au1")
    release = threading.Event()
    calls: list[int] = []

    def slow_look_up() -> dict[str, Any]:
        calls.append(1)
        release.wait(5)
        return {"id": 7}

    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(user_budget(settings, slow_look_up, budgets, clock)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1 and len(got) == 4 and len({id(b) for b in got}) == 1
    assert got[0] is budget_for(settings, budgets, user_budget_id(BASE, "7"))


async def test_the_async_way_learns_once_and_falls_back_alike(caplog: pytest.LogCaptureFixture) -> None:
    budgets, clock = Budgets(), FakeClock()
    settings = Settings("async-key-au1")
    look_up = LookUp({"id": 7})
    got = await asyncio.gather(*(auser_budget(settings, look_up.acall, budgets, clock) for _ in range(3)))
    assert look_up.calls == 1 and got[0] is got[1] is got[2]
    assert got[0] is budget_for(settings, budgets, user_budget_id(BASE, "7"))
    failing = LookUp(ClinikoConnectionError("Could not reach Cliniko"))
    other = Settings("async-other-au1")
    assert await auser_budget(other, failing.acall, budgets, clock) is budget_for(other, budgets)
    assert len(warnings(caplog)) == 1


async def test_the_async_way_remembers_recalls_and_counts_like_the_sync_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(time.time())  # the machine budget settles on the real clock
    settings, budgets = Settings("async-memory-au1", requests_per_minute=2), Budgets()
    budget = await auser_budget(settings, LookUp({"id": 7}).acall, budgets, clock)
    assert budget is budget_for(settings, budgets, user_budget_id(BASE, "7"))
    assert budget.reserve(clock()) == 0.0  # the look-up took one of the user's 2 slots
    assert budget.reserve(clock()) == WINDOW
    other_process, asked = Budgets(), LookUp()  # remembered on the machine: nothing asked
    found = await auser_budget(settings, asked.acall, other_process, clock)
    assert found is budget_for(settings, other_process, user_budget_id(BASE, "7")) and asked.calls == 0
    # a key whose user cannot be learned leaves nothing remembered, and each such key warns once
    rate = Path(os.environ["CLINIKO_STATE_DIR"]) / "rate"
    for name in ("async-fails-1-au1", "async-fails-2-au1"):
        failing = Settings(name)
        for _ in range(2):
            got = await auser_budget(failing, LookUp(ClinikoConnectionError("down")).acall, budgets, clock)
            assert got is budget_for(failing, budgets)
        assert not (rate / f"cliniko-owner-{key_id(name)}.json").exists()
    assert len(warnings(caplog)) == 2


def test_a_key_whose_user_cannot_be_learned_leaves_nothing_remembered() -> None:
    settings = Settings("sync-fails-au1")
    assert user_budget(settings, LookUp({"id": None}), Budgets(), FakeClock()) is not None
    rate = Path(os.environ["CLINIKO_STATE_DIR"]) / "rate"
    assert not (rate / f"cliniko-owner-{key_id('sync-fails-au1')}.json").exists()


def test_a_process_warns_once_about_its_redis_however_many_keys_and_users_it_paces(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path))
    budgets = Budgets()
    missing = Settings("key-au1", redis_conn_id="no_such_redis_conn")
    other = Settings("key-au1", redis_conn_id="another_missing_redis")
    the_key = budget_for(missing, budgets)
    the_user = budget_for(missing, budgets, owner=user_budget_id(BASE, "7"))
    elsewhere = budget_for(other, budgets)
    for budget in (the_key, the_user, the_key):
        budget.reserve(1000.0)
    assert [m for m in warnings(caplog) if "no_such_redis_conn" in m] == [warnings(caplog)[0]]
    elsewhere.reserve(1000.0)  # another Redis connection: its own warning
    assert len(warnings(caplog)) == 2 and "another_missing_redis" in warnings(caplog)[1]
    assert the_user.problem is not None and "no_such_redis_conn" in the_user.problem  # type: ignore[attr-defined]
