"""Benchmark: 1000 (or 10,000) ProcessingCompletedTriggers waiting at once in one event loop, against
the sandbox.

Prints the requests per polling round (target: one per 100 waiting attachments, plus one: <= 11 for
1,000, <= 101 for 10,000), the RSS the waiting triggers add (target <= 64 MiB for 1,000, <= 128 MiB for
10,000) and the delay from "processed" to the trigger's event (target <= poll interval + 1 s).

Attachments are created through the real API (presign, S3 POST, create) while the triggers already
wait: each trigger starts as soon as its attachment exists. The sandbox holds their processing while
they are created (a processing delay of an hour), then releases all of them at once
(``/_sandbox/processing/finish``) to finish ``--processing-delay`` seconds after the last one was
created: every trigger waits at once, however long the creating took.

    .venv/bin/python -m tests.bench.bench_triggers [--count 1000] [--poll-interval 5] [--processing-delay 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from calendar import timegm
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

KEY = "bench-triggers-key-au1"
MIB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def iso_to_unix(text: str) -> float:
    """``2025-01-02T03:04:05Z`` as a UNIX time."""
    return float(timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


class Bench:
    """Creates attachments in threads and waits on each with its own trigger in the event loop."""

    def __init__(self, sandbox: Any, count: int, poll_interval: float, finish_after: float) -> None:
        from cliniko_provider.hooks.cliniko import ClinikoHook

        self.sandbox = sandbox
        self.count = count
        self.poll_interval = poll_interval
        self.hook = ClinikoHook()
        self.patient_id = str(self.hook.create_patient("Bench", "Triggers")["id"])
        self.local = threading.local()
        self.event_times: dict[str, float] = {}
        self.events: list[dict[str, Any]] = []
        self.peak_rss = 0
        self.finish_after = finish_after

    def create_one(self, number: int) -> str:
        from cliniko_provider.hooks.cliniko import ClinikoHook
        from tests.helpers import create_attachment_via_api

        if not hasattr(self.local, "hook"):
            self.local.hook = ClinikoHook()
        return str(create_attachment_via_api(self.local.hook, self.patient_id)["id"])

    async def wait_one(self, attachment_id: str) -> None:
        from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger

        trigger = ProcessingCompletedTrigger(
            attachment_id, poll_interval=self.poll_interval, deadline=time.time() + 3600
        )
        async for event in trigger.run():
            self.event_times[attachment_id] = time.time()
            self.events.append(event.payload)

    async def sample_rss(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, rss_bytes())
            await asyncio.sleep(0.2)

    async def run(self) -> tuple[float, float]:
        """Return (seconds to create all, seconds from the last creation to the last event)."""
        loop = asyncio.get_running_loop()
        sampler = asyncio.ensure_future(self.sample_rss())
        waits: list[asyncio.Future[None]] = []
        from tests.helpers import sandbox_control

        sandbox_control(self.sandbox, "faults", processing_delay=3600)  # held until all are created
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            for future in asyncio.as_completed(
                [loop.run_in_executor(pool, self.create_one, n) for n in range(self.count)]
            ):
                waits.append(asyncio.ensure_future(self.wait_one(await future)))
        created = time.monotonic()
        released = await loop.run_in_executor(
            None, lambda: sandbox_control(self.sandbox, "processing/finish", after=self.finish_after)
        )
        assert released["rescheduled"] == self.count, released
        await asyncio.gather(*waits)
        sampler.cancel()
        return created - started, time.monotonic() - created


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--processing-delay", type=float, default=20.0)
    args = parser.parse_args(argv)

    from cliniko_provider.sandbox.process import SandboxProcess
    from cliniko_provider.triggers.poller import REGISTRY, AttachmentPoller
    from tests.conftest import connection_json

    work = Path(tempfile.mkdtemp(prefix="cliniko-bench-triggers-"))
    os.environ["CLINIKO_STATE_DIR"] = str(work)
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")  # not a line per event
    sandbox_args = ("--api-key", KEY, "--rate-limit", "100000/60")
    with SandboxProcess(*sandbox_args, data_dir=work / "sandbox") as sandbox:
        # The creation needs far more than 200 requests a minute; the triggers stay far below it.
        os.environ["AIRFLOW_CONN_CLINIKO_DEFAULT"] = connection_json(
            KEY, sandbox.base_url, requests_per_minute=100_000
        )
        pollers: list[AttachmentPoller] = []

        def factory(conn_id: str, **kwargs: Any) -> AttachmentPoller:
            pollers.append(AttachmentPoller(conn_id, **kwargs))
            return pollers[-1]

        REGISTRY.factory = factory
        bench = Bench(sandbox, args.count, args.poll_interval, args.processing_delay)
        requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
        baseline = rss_bytes()
        create_seconds, wait_seconds = asyncio.run(bench.run())
        stats = requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json()

    successes = [event for event in bench.events if event["status"] == "success"]
    delays = [
        bench.event_times[event["attachment_id"]] - iso_to_unix(event["attachment"]["processed_at"])
        for event in successes
    ]
    per_round = [n for poller in pollers for n in poller.stats.requests_per_round]
    naive = sum(n for poller in pollers for n in poller.stats.waiting_per_round)
    polls = stats["requests_by_route"].get("GET /v1/patient_attachments", 0)
    print(f"attachments: {args.count} (created in {create_seconds:.1f} s through the API, 4 threads)")
    print(f"events: {len(successes)} success, {len(bench.events) - len(successes)} other")
    print(
        f"poll interval {args.poll_interval:.0f} s; processing aimed at {args.processing_delay:.0f} s after "
        f"the last creation; last event {wait_seconds:.1f} s after the last creation; most waiting at once "
        f"{max(n for poller in pollers for n in poller.stats.waiting_per_round)}"
    )
    print(
        f"requests per round: max {max(per_round)}, mean {statistics.mean(per_round):.1f} over "
        f"{len(per_round)} rounds (target <= {-(-args.count // 100) + 1}); sandbox saw {polls} status "
        f"requests, the poller sent "
        f"{sum(per_round)}; one request per attachment per round would have been {naive}"
    )
    rss_target = 64 if args.count <= 1000 else 128
    print(f"added RSS: {(bench.peak_rss - baseline) / MIB:.1f} MiB at peak (target <= {rss_target} MiB)")
    print(
        f"processed -> event: median {statistics.median(delays):.2f} s, max {max(delays):.2f} s "
        f"(upper bounds: processed_at has 1 s resolution; target <= {args.poll_interval + 1:.0f} s)"
    )


if __name__ == "__main__":
    main()
