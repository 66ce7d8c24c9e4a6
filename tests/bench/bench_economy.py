"""Nightly economy: 200 reports through the real nightly DAG (scheduler, triggerer...) against the
sandbox at Cliniko's real limit of 200 requests per 60 s. Prints Cliniko API requests per attachment
(waiting included; target <= 2.2), the 429 answers received, and wall time against the bound the rate
limit sets (requests / 200 per minute)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import requests

REPORTS = int(os.environ.get("BENCH_ECONOMY_REPORTS", "200"))
KEY = "bench-economy-key-au1"
DAG_ID = "cliniko_nightly_report_export"


def main() -> None:
    from cliniko_provider.hooks.cliniko import ClinikoHook
    from cliniko_provider.sandbox.process import SandboxProcess
    from tests.conftest import REPO, connection_json
    from tests.e2e.stack import AirflowStack

    work = Path(tempfile.mkdtemp(prefix="cliniko-bench-economy-"))
    os.environ["CLINIKO_RATE_STATE_DIR"] = str(work)
    with SandboxProcess("--api-key", KEY, "--processing-delay", "2", "--rate-limit", "100000/60") as sandbox:
        connection = connection_json(KEY, sandbox.base_url)
        os.environ["AIRFLOW_CONN_CLINIKO_DEFAULT"] = connection
        hook = ClinikoHook()
        rows = []
        for number in range(REPORTS):
            reference = f"ECO-{number:04d}"
            hook.create_patient("Bench", f"Patient {number}", old_reference_id=reference)
            rows.append(
                {"reference": reference, "email": f"eco{number}@bench.example", "name": f"P {number}"}
            )
        faults = requests.post(
            f"{sandbox.root_url}/_sandbox/faults", json={"rate_limit": "200/60"}, timeout=10
        )
        faults.raise_for_status()
        stack = AirflowStack(
            work / "airflow", REPO / "dags_examples", env={"AIRFLOW_CONN_CLINIKO_DEFAULT": connection}
        )
        with stack:
            stack.cli("pools", "set", "cliniko_api", "4", "Cliniko API")
            stack.wait_for(
                lambda: stack.check_alive() or stack.dag_is_parsed(DAG_ID), 180, "the DAG to be parsed"
            )
            time.sleep(61)  # let the sandbox's window forget the set-up requests
            requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
            conf = {"patients": rows, "report_root": (work / "reports").as_uri()}
            started = time.monotonic()
            stack.cli("dags", "trigger", DAG_ID, "--run-id", "economy", "--conf", json.dumps(conf))
            stack.wait_for(
                lambda: stack.check_alive() or stack.run_state(DAG_ID, "economy") in ("success", "failed"),
                3600,
                "the run to finish",
                interval=5,
            )
            wall = time.monotonic() - started
            state = stack.run_state(DAG_ID, "economy")
            retried = stack.query(
                "SELECT COUNT(*) FROM task_instance WHERE run_id = 'economy' AND try_number > 1"
            )[0][0]
        stats = requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json()
    by_route = stats.get("requests_by_route", {})
    total = sum(int(count) for route, count in by_route.items() if " /v1/" in route)  # S3 POSTs are not API
    bound = total / 200 * 60
    print(f"reports: {REPORTS}; run state: {state}; task retries: {retried}")
    print(f"Cliniko API requests: {total} -> {total / REPORTS:.2f} per attachment (target <= 2.2)")
    print(f"  by route: {json.dumps(by_route, sort_keys=True)}")
    print(f"429 answers: {stats.get('rate_limited')}")
    print(
        f"wall time: {wall:.0f} s; rate-limit bound for {total} requests: {bound:.0f} s ({wall / bound:.2f}x)"
    )


if __name__ == "__main__":
    main()
