"""Nightly economy: the real nightly DAG (API server, scheduler, DAG processor, triggerer; LocalExecutor)
against the sandbox, uploading in batch tasks of 100 reports.

Runs, from ``BENCH_ECONOMY_RUNS`` (default ``200,1000,5000x``): N reports at Cliniko's real limit of 200
requests per 60 s, or, with an ``x``, at a raised limit (sandbox and connection at 100,000 a minute), to
show what each report costs the machine when the limit is not what paces the night. Each run prints the
Cliniko API requests per attachment (waiting included; target <= 2.03), the 429 answers (target 0), the
wall time against the bound the rate limit sets (requests / 200 per minute; target <= 1.10x), and the CPU
seconds per report of the task processes (LocalExecutor's workers), the scheduler, the triggerer and the
sandbox, sampled every half second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import requests

KEY = "bench-economy-key-au1"
DAG_ID = "cliniko_nightly_report_export"
RAISED = 100_000  # requests a minute, sandbox and connection, for the runs marked "x"
RUNS = os.environ.get("BENCH_ECONOMY_RUNS", "200,1000,5000x")


class CpuSampler:
    """Sums the CPU seconds of process trees while a run lasts (each process's last sample counts).

    :param roots: name -> root process id; ``"name/children"`` counts the root's descendants apart.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.5) -> None:
        self.roots = {name: psutil.Process(pid) for name, pid in roots.items()}
        self.interval = interval
        self.seen: dict[str, dict[tuple[int, float], float]] = {}
        self.base: dict[str, dict[tuple[int, float], float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[str, dict[tuple[int, float], float]]:
        sample: dict[str, dict[tuple[int, float], float]] = {}
        for name, root in self.roots.items():
            groups = {name: [root], f"{name}/children": self._children(root)}
            for group, processes in groups.items():
                for process in processes:
                    try:
                        times = process.cpu_times()
                        key = (process.pid, process.create_time())
                    except psutil.Error:
                        continue
                    sample.setdefault(group, {})[key] = times.user + times.system
        return sample

    @staticmethod
    def _children(root: psutil.Process) -> list[psutil.Process]:
        try:
            return list(root.children(recursive=True))
        except psutil.Error:
            return []

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for group, values in self._sample().items():
                self.seen.setdefault(group, {}).update(values)

    def __enter__(self) -> CpuSampler:
        self.base = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for group, values in self._sample().items():
            self.seen.setdefault(group, {}).update(values)

    def seconds(self, group: str) -> float:
        """CPU seconds the group's processes used during the run."""
        base = self.base.get(group, {})
        return sum(value - base.get(key, 0.0) for key, value in self.seen.get(group, {}).items())


class RequestTimeline:
    """Samples the sandbox's request counts every second while a run lasts, to show where time goes.

    :param stats_url: the sandbox's ``/_sandbox/stats``.
    """

    def __init__(self, stats_url: str, interval: float = 1.0) -> None:
        self.stats_url = stats_url
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []  # (time, API requests, creates, 429s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                stats = requests.get(self.stats_url, timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            by_route = stats.get("requests_by_route", {})
            api = sum(int(count) for route, count in by_route.items() if " /v1/" in route)
            creates = int(by_route.get("POST /v1/patient_attachments", 0))
            self.samples.append((time.monotonic(), api, creates, int(stats.get("rate_limited") or 0)))

    def __enter__(self) -> RequestTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def phases(self, started: float) -> dict[str, float]:
        """Seconds from the trigger to the first uploads and to the last create; the request rate between."""
        if not self.samples:
            return {}
        uploading = [sample for sample in self.samples if sample[2] > 0]
        if not uploading:
            return {}
        last_create = max(self.samples, key=lambda sample: sample[2])[2]
        done = next(sample for sample in self.samples if sample[2] == last_create)
        first = uploading[0]
        span = max(done[0] - first[0], 1e-9)
        return {
            "first_uploads": first[0] - started,
            "last_create": done[0] - started,
            "per_minute": (done[1] - first[1]) / span * 60,
        }


def trigger_with_conf(stack: Any, run_id: str, conf: dict[str, Any], work: Path) -> None:
    """Trigger the DAG with a conf too large for one command-line argument (as ``airflow dags trigger``)."""
    conf_file = work / f"{run_id}-conf.json"
    conf_file.write_text(json.dumps(conf))
    script = (
        "import sys; from airflow.api.client import get_current_api_client; "
        "get_current_api_client().trigger_dag(dag_id=sys.argv[1], run_id=sys.argv[2], "
        "conf=open(sys.argv[3]).read())"
    )
    subprocess.run(
        [sys.executable, "-c", script, DAG_ID, run_id, str(conf_file)],
        env=stack.env,
        check=True,
        capture_output=True,
        timeout=300,
    )


def run(reports: int, raised: bool) -> dict[str, Any]:
    """One nightly run of ``reports`` reports; return its figures."""
    from cliniko_provider.hooks.cliniko import ClinikoHook
    from cliniko_provider.sandbox.process import SandboxProcess
    from tests.conftest import REPO, connection_json
    from tests.e2e.stack import AirflowStack

    work = Path(tempfile.mkdtemp(prefix=f"cliniko-bench-economy-{reports}-"))
    os.environ["CLINIKO_STATE_DIR"] = str(work)
    limit = f"{RAISED}/60" if raised else "200/60"
    extra: dict[str, Any] = {"requests_per_minute": RAISED} if raised else {}
    with SandboxProcess(
        "--api-key", KEY, "--processing-delay", "2", "--rate-limit", f"{RAISED}/60"
    ) as sandbox:
        setup = connection_json(KEY, sandbox.base_url, requests_per_minute=RAISED)
        os.environ["AIRFLOW_CONN_CLINIKO_DEFAULT"] = setup
        hook = ClinikoHook()
        rows = []
        for number in range(reports):
            reference = f"ECO-{number:05d}"
            hook.create_patient("Bench", f"Patient {number}", old_reference_id=reference)
            rows.append(
                {"reference": reference, "email": f"eco{number}@bench.example", "name": f"P {number}"}
            )
        requests.post(
            f"{sandbox.root_url}/_sandbox/faults", json={"rate_limit": limit}, timeout=10
        ).raise_for_status()
        connection = connection_json(KEY, sandbox.base_url, **extra)
        stack = AirflowStack(
            work / "airflow", REPO / "dags_examples", env={"AIRFLOW_CONN_CLINIKO_DEFAULT": connection}
        )
        with stack:
            stack.wait_for(
                lambda: stack.check_alive() or stack.dag_is_parsed(DAG_ID), 180, "the DAG to be parsed"
            )
            if not raised:
                time.sleep(61)  # let the sandbox's window forget the set-up requests
            requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
            conf = {"patients": rows, "report_root": (work / "reports").as_uri()}
            roots = {name: stack.processes[name].pid for name in ("scheduler", "triggerer")}
            roots["sandbox"] = sandbox.pid
            timeline = RequestTimeline(f"{sandbox.root_url}/_sandbox/stats")
            with CpuSampler(roots) as cpu, timeline:
                started = time.monotonic()
                trigger_with_conf(stack, "economy", conf, work)
                stack.wait_for(
                    lambda: (
                        stack.check_alive() or stack.run_state(DAG_ID, "economy") in ("success", "failed")
                    ),
                    7200,
                    "the run to finish",
                    interval=2,
                )
                wall = time.monotonic() - started
            state = stack.run_state(DAG_ID, "economy")
            tasks = stack.query("SELECT COUNT(*) FROM task_instance WHERE run_id = 'economy'")[0][0]
            retried = stack.query(
                "SELECT COUNT(*) FROM task_instance WHERE run_id = 'economy' AND try_number > 1"
            )[0][0]
            summary_rows = stack.query(
                "SELECT value FROM xcom WHERE run_id = 'economy' AND task_id = 'summarize' "
                "AND key = 'return_value'"
            )
        stats = requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json()
    summary = json.loads(str(summary_rows[0][0])) if summary_rows else {}
    by_route = stats.get("requests_by_route", {})
    total = sum(int(count) for route, count in by_route.items() if " /v1/" in route)  # not S3's POSTs
    return {
        "reports": reports,
        "limit": limit,
        "state": state,
        "tasks": tasks,
        "retried": retried,
        "uploaded": len(summary.get("uploaded", [])),
        "failed": len(summary.get("failed", [])),
        "api_requests": total,
        "by_route": by_route,
        "rate_limited": stats.get("rate_limited"),
        "wall": wall,
        "bound": total / 200 * 60,
        "phases": timeline.phases(started),
        "cpu": {
            "workers": cpu.seconds("scheduler/children"),
            "scheduler": cpu.seconds("scheduler"),
            "triggerer": cpu.seconds("triggerer") + cpu.seconds("triggerer/children"),
            "sandbox": cpu.seconds("sandbox"),
        },
    }


def report(result: dict[str, Any]) -> None:
    """Print one run's figures."""
    reports = result["reports"]
    print(
        f"-- {reports} reports at {result['limit']} requests: run {result['state']}, "
        f"{result['tasks']} task instances ({result['retried']} retried), "
        f"{result['uploaded']} uploaded, {result['failed']} failed"
    )
    print(
        f"   Cliniko API requests: {result['api_requests']} -> {result['api_requests'] / reports:.3f} "
        f"per attachment (target <= 2.03); 429 answers: {result['rate_limited']} (target 0)"
    )
    print(f"   by route: {json.dumps(result['by_route'], sort_keys=True)}")
    ratio = result["wall"] / result["bound"]
    print(
        f"   wall time {result['wall']:.0f} s; rate-limit bound {result['bound']:.0f} s ({ratio:.2f}x"
        + (", target <= 1.10x)" if result["limit"] == "200/60" else "; the limit is raised, so no target)")
    )
    phases = result.get("phases") or {}
    if phases:
        print(
            f"   first upload requests {phases['first_uploads']:.0f} s after the trigger; last create at "
            f"{phases['last_create']:.0f} s; {phases['per_minute']:.0f} API requests a minute in between"
        )
    cpu = result["cpu"]
    print(
        "   CPU per report: "
        + ", ".join(f"{name} {seconds / reports * 1000:.0f} ms" for name, seconds in cpu.items())
        + f" (total {sum(cpu.values()):.0f} s)"
    )


def parse_runs(text: str) -> Iterable[tuple[int, bool]]:
    """``"200,1000,5000x"`` -> (200, False), (1000, False), (5000, True)."""
    for item in text.split(","):
        item = item.strip()
        if item:
            yield int(item.rstrip("x")), item.endswith("x")


def main() -> None:
    for reports, raised in parse_runs(RUNS):
        report(run(reports, raised))


if __name__ == "__main__":
    main()
