"""One key across a cluster: what the Redis budget costs and what it holds.

1. Added latency per request: ``reserve()`` in a full 200-a-minute window, of the Redis budget (one Lua
   script round trip to a local redis-server) next to the machine budget (a flock'd file), sync and async.
2. Rate held: four "machines" (processes with their own HOME and temp dir, sharing only Redis) call one
   key as fast as they can for ``BENCH_CLUSTER_SECONDS`` against the sandbox at Cliniko's 200 a minute;
   prints the busiest 60 s the sandbox saw against the limit, and the 429 answers.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import requests

SECONDS = float(os.environ.get("BENCH_CLUSTER_SECONDS", "90"))
MACHINES = 4
LIMIT = 200
KEY = "bench-cluster-key-au1"


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    return f"median {p50:.3f} ms, p99 {p99:.3f} ms"


def latency(work: Path, redis_conn: str) -> None:
    from cliniko_provider.utils.budget import MachineBudget
    from cliniko_provider.utils.budget_redis import RedisBudget

    os.environ["AIRFLOW_CONN_BENCH_REDIS"] = redis_conn
    calls = 2000
    machine = MachineBudget("bench", LIMIT, 65, state_dir=work / "state")
    fallback = MachineBudget("bench2", LIMIT, 65, state_dir=work / "state")
    cluster = RedisBudget("bench", LIMIT, 65, "bench_redis", fallback)
    cluster.reserve(time.time())  # connect and load the script first
    for name, budget in (("machine (file + flock)", machine), ("redis (Lua script)", cluster)):
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            budget.reserve(time.time())
            samples.append(time.perf_counter() - started)
        print(f"reserve(), {name}: {_percentiles(samples)} over {calls} calls")

    async def async_samples() -> list[float]:
        await cluster.areserve(time.time())
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            await cluster.areserve(time.time())
            samples.append(time.perf_counter() - started)
        return samples

    print(
        f"areserve(), redis (redis.asyncio): {_percentiles(asyncio.run(async_samples()))} over {calls} calls"
    )
    assert cluster.shared, "the Redis budget fell back during the bench"


def rate(work: Path, redis_conn: str) -> None:
    from cliniko_provider.sandbox.process import SandboxProcess
    from tests.cluster.machine import finish_times, spawn, wait_until_ready
    from tests.conftest import connection_json

    with SandboxProcess(
        "--api-key", KEY, "--rate-limit", f"{LIMIT}/60", data_dir=work / "sandbox"
    ) as sandbox:
        env = {
            "AIRFLOW_CONN_CLINIKO_DEFAULT": connection_json(
                KEY, sandbox.base_url, redis_conn_id="bench_redis"
            ),
            "AIRFLOW_CONN_BENCH_REDIS": redis_conn,
        }
        directories = [work / f"machine{number}" for number in range(MACHINES)]
        machines = [spawn(directory, 0, work / "go", env, SECONDS) for directory in directories]
        wait_until_ready(directories, machines, work / "go")
        for machine in machines:
            machine.wait()
        stats = requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json()
    finished = finish_times(directories)
    busiest = max(sum(1 for other in finished if first <= other < first + 60) for first in finished)
    span = finished[-1] - finished[0]
    print(
        f"{MACHINES} machines, {SECONDS:.0f} s, sandbox at {LIMIT}/min: {len(finished)} calls, "
        f"{len(finished) / span * 60:.0f}/min overall, busiest 60 s: {busiest} (limit {LIMIT}); "
        f"429 answers: {stats['rate_limited']}"
    )


def main() -> None:
    from tests.redis_server import RedisServer

    work = Path(tempfile.mkdtemp(prefix="cliniko-bench-cluster-"))
    with RedisServer(work / "redis") as redis:
        latency(work, redis.connection_json())
        rate(work, redis.connection_json())


if __name__ == "__main__":
    main()
