"""Two API keys of one Cliniko user, each used by its own "machine" (a process sharing only Redis), against a
sandbox that counts both keys in one window (``--same-user-key``), as Cliniko counts a user's requests: the
keys draw on one budget, so together they send the user's minute and no more (no 429), and the next call
of each is held back for the rest of the window; a key of another user keeps a budget of its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.sandbox.traffic import mask_key
from tests.cluster.machine import spawn, wait_until_ready
from tests.conftest import connection_json
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

LIMIT = 10  # requests a minute, for the sandbox (per user) and the connections alike
KEY_A, KEY_B, KEY_OTHER = "user-budget-a-au1", "user-budget-b-au1", "user-budget-other-au1"
LONGEST_WAIT = 5.0  # seconds: a machine asked to wait longer stops there (and says how long)


@pytest.mark.timeout(120)
def test_two_keys_of_one_user_share_one_budget_and_another_users_key_does_not(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        SandboxProcess(
            *("--api-key", KEY_A, "--api-key", KEY_OTHER, "--same-user-key", f"{KEY_B}={KEY_A}"),
            *("--rate-limit", f"{LIMIT}/60"),
            data_dir=tmp_path / "sandbox",
        ) as sandbox,
    ):
        calls = {KEY_A: LIMIT, KEY_B: LIMIT, KEY_OTHER: LIMIT - 1}  # one user asks twice its minute
        directories = {key: tmp_path / key for key in calls}
        machines = [
            spawn(
                directories[key],
                count,
                tmp_path / "go",
                {
                    "AIRFLOW_CONN_CLINIKO_DEFAULT": connection_json(
                        key, sandbox.base_url, requests_per_minute=LIMIT, redis_conn_id="rate_redis"
                    ),
                    "AIRFLOW_CONN_RATE_REDIS": redis.connection_json(),
                    "MACHINE_LEARN_USER": "1",
                    "MACHINE_LONGEST_WAIT": str(LONGEST_WAIT),
                },
            )
            for key, count in calls.items()
        ]
        wait_until_ready(list(directories.values()), machines, tmp_path / "go")
        started = time.monotonic()
        for machine, directory in zip(machines, directories.values(), strict=True):
            assert machine.wait(timeout=60) == 0, (directory / "machine.log").read_text()[-3000:]
        took = time.monotonic() - started
        stats: dict[str, Any] = requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json()

    made = {
        key: len((directory / "finished.txt").read_text().split()) for key, directory in directories.items()
    }
    held = {
        key: float(wait.read_text())
        for key, directory in directories.items()
        if (wait := directory / "finished.wait").exists()
    }
    sent = {key: stats["requests_by_key"].get(mask_key(key), 0) for key in calls}
    print(f"user budget: calls made {made}, requests sent {sent}, held back {held}, {took:.1f} s, {stats}")
    assert stats["rate_limited"] == 0
    # One user's two keys: each learned its user (one GET /user each, counted on the user's budget), then
    # their calls filled the rest of the user's minute, and no more went out.
    assert stats["requests_by_route"]["GET /v1/user"] == 3  # one per key
    assert sent[KEY_A] + sent[KEY_B] == LIMIT
    assert made[KEY_A] + made[KEY_B] == LIMIT - 2
    # Both were then held back for the rest of the window (each alone had 9 more calls in its own budget).
    assert set(held) == {KEY_A, KEY_B}
    assert all(LONGEST_WAIT < wait <= 60.5 for wait in held.values()), held
    # Another user's key paced on its own budget: all its calls went at once.
    assert made[KEY_OTHER] == LIMIT - 1 and sent[KEY_OTHER] == LIMIT
    assert took < 20
