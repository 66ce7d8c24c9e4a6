"""The nightly export on a real Airflow deployment (API server, scheduler, DAG processor, triggerer as
processes; LocalExecutor on SQLite) against the sandbox: 20 reports in 4 batch tasks, each report
attached exactly once, and the summary naming every report."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from tests.conftest import REPO, connection_json
from tests.e2e.stack import AirflowStack

pytestmark = pytest.mark.slow

DAG_ID = "cliniko_nightly_report_export"
KEY = "e2e-sandbox-key-uk1"
PATIENTS = 20
BATCH_SIZE = 5
BATCHES = PATIENTS // BATCH_SIZE


def test_nightly_export_attaches_every_report_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SandboxProcess(
        "--api-key", KEY, "--processing-delay", "1", data_dir=tmp_path / "sandbox"
    ) as sandbox:
        connection = connection_json(KEY, sandbox.base_url)
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection)
        hook = ClinikoHook()
        rows, patient_ids = [], {}
        for number in range(1, PATIENTS + 1):
            reference = f"E2E-{number:03d}"
            email = f"patient{number}@e2e.example"
            # Half are found by reference, half only by email (the DAG's fallback).
            extra = {"old_reference_id": reference} if number % 2 else {}
            patient = hook.create_patient("Patient", f"Number {number}", email=email, **extra)
            patient_ids[reference] = str(patient["id"])
            rows.append({"reference": reference, "email": email, "name": f"Patient Number {number}"})
        rows.append({"reference": "E2E-404", "email": "nobody@e2e.example", "name": "Not In Cliniko"})
        requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()

        stack = AirflowStack(
            tmp_path / "airflow", REPO / "dags_examples", env={"AIRFLOW_CONN_CLINIKO_DEFAULT": connection}
        )
        with stack:
            stack.wait_for(
                lambda: stack.check_alive() or stack.dag_is_parsed(DAG_ID), 180, f"{DAG_ID} to be parsed"
            )
            conf = {
                "patients": rows,
                "report_root": (tmp_path / "reports").as_uri(),
                "batch_size": BATCH_SIZE,
            }
            started = time.monotonic()
            stack.cli("dags", "trigger", DAG_ID, "--run-id", "e2e", "--conf", json.dumps(conf))
            try:
                stack.wait_for(
                    lambda: stack.check_alive() or stack.run_state(DAG_ID, "e2e") in ("success", "failed"),
                    600,
                    "the DAG run to finish",
                    interval=2,
                )
            finally:
                states = stack.task_states(DAG_ID, "e2e")
                took = time.monotonic() - started
                print(f"DAG run e2e took {took:.0f} s; task states: {Counter(s for *_, s in states)}")
            if stack.run_state(DAG_ID, "e2e") != "success":
                pytest.fail(
                    f"run ended {stack.run_state(DAG_ID, 'e2e')}; states {states}\n"
                    f"scheduler:\n{stack.log_tail('scheduler')}\ntriggerer:\n{stack.log_tail('triggerer')}"
                )
            deferred_ever = stack.query(
                "SELECT COUNT(*) FROM task_instance WHERE dag_id = ? AND run_id = ? "
                "AND task_id = 'upload_reports' AND next_method IS NULL AND trigger_id IS NULL",
                DAG_ID,
                "e2e",
            )
            summary_rows = stack.query(
                "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'summarize' "
                "AND key = 'return_value'",
                DAG_ID,
                "e2e",
            )

        stats = requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json()
        by_route = stats["requests_by_route"]
        api_requests = sum(count for route, count in by_route.items() if " /v1/" in route)
        print(
            f"Cliniko API requests: {api_requests} for {PATIENTS} reports; by route: {json.dumps(by_route)}"
        )
        assert Counter(task for task, _, _ in states)["upload_reports"] == BATCHES
        assert {state for *_, state in states} == {"success"}
        assert deferred_ever[0][0] == BATCHES  # all finished and cleaned up their deferral
        summary = json.loads(str(summary_rows[0][0]))
        assert sorted(item["reference"] for item in summary["uploaded"]) == sorted(patient_ids)
        assert [item["reference"] for item in summary["skipped"]] == ["E2E-404"]
        assert summary["failed"] == []
        for reference, patient_id in patient_ids.items():
            records = list(hook.list_attachments(patient_id=patient_id, include_archived=True))
            assert len(records) == 1, f"{reference}: {len(records)} attachments"
            (record,) = records
            assert record["processing_completed"] is True
            assert record["filename"].startswith(f"report-{reference}-")
        # Every batch deferred once, and the waiting was done by the triggerer's shared poller: list
        # requests for many ids at once, never a request per attachment.
        logs = tmp_path / "airflow" / "logs" / f"dag_id={DAG_ID}" / "run_id=e2e" / "task_id=upload_reports"
        deferred = [
            path for path in logs.glob("*/attempt=1.log") if "Pausing task as DEFERRED" in path.read_text()
        ]
        assert len(deferred) == BATCHES
        assert by_route.get("GET /v1/patient_attachments/{id}", 0) == 0
        assert 1 <= by_route["GET /v1/patient_attachments"] <= 10
        assert api_requests <= 2.5 * PATIENTS  # presign + create each, a few shared lookups and polls
