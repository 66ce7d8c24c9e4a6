"""Machines whose clocks disagree, sharing one key's budget through a real Redis (libfaketime).

Three "machines" call one key against a sandbox limited to 30 requests a minute: the first, its clock an
hour fast, spends the minute (30 calls); then one on time and one 30 s fast make 5 calls each. On
Redis's clock the two wait for the real window, a minute, not an hour, and Cliniko answers no 429. On the
machines' own clocks the fast one's slots would hold the others an hour ("waiting 3658 s"), and the one
30 s fast would see the minute's slots 30 s older than they are and go early (429s).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.utils.budget import WINDOW
from tests.cluster.machine import spawn
from tests.cluster.test_two_machines import busiest_minute, sandbox_stats
from tests.conftest import connection_json
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
LIMIT = 30  # requests a minute, for the sandbox and the connection alike
KEY = "clock-skew-key-au1"
SKEWS = {"hour-fast": 3600.0, "on-time": 0.0, "30s-fast": 30.0}
CALLS = {"hour-fast": LIMIT, "on-time": 5, "30s-fast": 5}


def faked(offset: float) -> dict[str, str]:
    """Environment that moves a process's clocks by ``offset`` seconds.

    The monotonic clock moves too (``FAKETIME_FORCE_MONOTONIC_FIX``): with it left alone, libfaketime
    0.9.10 answers Python's ``time.sleep`` (an absolute ``clock_nanosleep``) with EINVAL.
    """
    if not offset:
        return {}
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": f"+{offset:g}s",
        "FAKETIME_FORCE_MONOTONIC_FIX": "1",
    }


@pytest.mark.skipif(not FAKETIME_LIB.exists(), reason="needs libfaketime: make faketime (Debian's faketime)")
@pytest.mark.timeout(400)
def test_machines_with_skewed_clocks_keep_to_the_real_minute(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        SandboxProcess(
            "--api-key", KEY, "--rate-limit", f"{LIMIT}/60", data_dir=tmp_path / "sandbox"
        ) as sandbox,
    ):
        conn = {
            "AIRFLOW_CONN_CLINIKO_DEFAULT": connection_json(
                KEY, sandbox.base_url, requests_per_minute=LIMIT, redis_conn_id="rate_redis"
            ),
            "AIRFLOW_CONN_RATE_REDIS": redis.connection_json(),
        }
        go = {name: tmp_path / f"go-{name}" for name in ("first", "then")}
        machines = {
            name: spawn(
                tmp_path / name,
                CALLS[name],
                go["first" if name == "hour-fast" else "then"],
                {**conn, **faked(skew)},
            )
            for name, skew in SKEWS.items()
        }
        try:
            deadline = time.monotonic() + 180
            while not all((tmp_path / name / "finished.ready").exists() for name in SKEWS):
                assert all(machine.poll() is None for machine in machines.values()), "a machine exited early"
                assert time.monotonic() < deadline, "the machines did not get ready within 180 s"
                time.sleep(0.2)
            started = time.time()
            go["first"].touch()
            assert machines["hour-fast"].wait(timeout=120) == 0, log_tail(tmp_path / "hour-fast")
            go["then"].touch()
            for name in ("on-time", "30s-fast"):
                assert machines[name].wait(timeout=WINDOW + 60) == 0, log_tail(tmp_path / name)
            took = time.time() - started
        finally:
            for machine in machines.values():  # none is left waiting for its go file
                if machine.poll() is None:
                    machine.kill()
        stats = sandbox_stats(sandbox)
    finished = {
        name: [float(line) - SKEWS[name] for line in (tmp_path / name / "finished.txt").read_text().split()]
        for name in SKEWS
    }
    print(
        f"clock skew: {stats['rate_limited']} answers 429, {stats['requests_total']} requests, {took:.1f} s"
    )
    assert stats["rate_limited"] == 0
    user_look_ups = stats["requests_by_route"].get("GET /v1/user", 0)  # each machine's key's user, once
    assert 1 <= user_look_ups <= len(CALLS)
    assert stats["requests_total"] == sum(CALLS.values()) + user_look_ups  # 40 calls: none repeated
    assert busiest_minute(sorted(moment for moments in finished.values() for moment in moments)) <= LIMIT
    # The minute was spent, so the last ten waited for the window: a minute, never an hour.
    assert WINDOW - 5 < max(finished["on-time"] + finished["30s-fast"]) - started < WINDOW + 20
    assert took < WINDOW + 20


def log_tail(directory: Path) -> str:
    return (directory / "machine.log").read_text(errors="replace")[-3000:]
