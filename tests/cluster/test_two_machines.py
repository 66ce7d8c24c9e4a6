"""Two "machines" (processes with their own HOME, temp dir and machine budget, sharing only Redis) call
one API key against a sandbox limited to 30 requests a minute: with ``redis_conn_id`` they share one
budget and get no 429; without it each paces itself to 30 a minute and together they get 429s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.sandbox.process import SandboxProcess
from tests.cluster.machine import finish_times, spawn, wait_until_ready
from tests.conftest import connection_json
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

LIMIT = 30  # requests a minute, for the sandbox and the connection alike
EACH = 20  # requests per machine: 40 together, more than one minute's worth
KEY = "two-machines-key-au1"


def busiest_minute(moments: list[float]) -> int:
    return max(sum(1 for other in moments if first <= other < first + 60) for first in moments)


def run_two_machines(work: Path, redis: RedisServer, **extra: str) -> dict[str, Any]:
    """Two machines on one key against a fresh sandbox, started together; return the sandbox's stats."""
    with SandboxProcess(
        "--api-key", KEY, "--rate-limit", f"{LIMIT}/60", data_dir=work / "sandbox"
    ) as sandbox:
        env = {
            "AIRFLOW_CONN_CLINIKO_DEFAULT": connection_json(
                KEY, sandbox.base_url, requests_per_minute=LIMIT, **extra
            ),
            "AIRFLOW_CONN_RATE_REDIS": redis.connection_json(),
        }
        directories = [work / name for name in ("m1", "m2")]
        machines = [spawn(directory, EACH, work / "go", env) for directory in directories]
        wait_until_ready(directories, machines, work / "go")
        for machine in machines:
            assert machine.wait(timeout=300) == 0
        return sandbox_stats(sandbox)


@pytest.mark.timeout(500)
def test_two_machines_share_one_budget_through_redis_and_collide_without(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        shared = run_two_machines(tmp_path / "with-redis", redis, redis_conn_id="rate_redis")
        alone = run_two_machines(tmp_path / "alone", redis)
    print(f"with redis_conn_id: {shared['rate_limited']} answers 429; without: {alone['rate_limited']}")
    shared_finished = finish_times([tmp_path / "with-redis" / name for name in ("m1", "m2")])
    assert len(shared_finished) == 2 * EACH
    assert shared["rate_limited"] == 0
    assert shared["requests_total"] == 2 * EACH + look_ups(shared)  # no request was repeated
    assert busiest_minute(shared_finished) <= LIMIT
    # The same two machines without Redis: each keeps to 30 a minute, so together they burst 40 and
    # Cliniko answers 429 (each machine then waits for the reset the 429 names).
    assert alone["rate_limited"] >= 1
    assert alone["requests_total"] == 2 * EACH + alone["rate_limited"] + look_ups(alone)


def look_ups(stats: dict[str, Any]) -> int:
    """The ``GET /user`` the machines sent to learn the key's user: one per machine at most (with Redis,
    a machine may find it remembered there)."""
    count = int(stats["requests_by_route"].get("GET /v1/user", 0))
    assert 1 <= count <= 2, stats
    return count


def sandbox_stats(sandbox: SandboxProcess) -> dict[str, Any]:
    return dict(requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json())
