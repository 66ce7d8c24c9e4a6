"""The first night, as the README tells it, on a real Airflow deployment (API server, scheduler, DAG
processor, triggerer as processes; LocalExecutor on SQLite) in a fresh AIRFLOW_HOME, against the sandbox.

1. The sandbox starts with ``--seed-example-patients``; the connection is made in the metadata database
   (as the web UI makes it), with no pool and nothing else created; the examples are copied into the
   DAG folder; ``airflow cliniko check`` (3.3+, else ``cliniko check``) finds the connection; the nightly
   DAG, triggered from the CLI with its defaults, attaches every example patient's report and logs its
   summary as plain lines.
2. 20 reports in 4 batch tasks, with ``verify="content"``: each attached exactly once and read back
   once, the summary naming every report and how it was verified, the waits coalesced in the
   triggerer, and each task's "Cliniko attachments" link served by the UI's API.

Each step's time is printed (``pytest -s``) for the README's "Your first night".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.config import DEFAULT_API_KEY
from cliniko_provider.sandbox.examples import EXAMPLE_PATIENTS
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.utils.audit import read_manifest
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import REPO, USER_AGENT, connection_json
from tests.e2e.stack import AirflowStack

pytestmark = pytest.mark.slow

DAG_ID = "cliniko_nightly_report_export"
KEY = DEFAULT_API_KEY  # as the README's first night: the sandbox's default key
PATIENTS = 20
BATCH_SIZE = 5
BATCHES = PATIENTS // BATCH_SIZE
FIRST_NIGHT_BOUND = 240  # seconds from the trigger to a green run (measured: see the printed timings)


def summary_lines(home: Path, run_id: str) -> list[str]:
    """The events of the summarize task's log, one per line as the UI shows them."""
    logs = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=summarize"
    events = []
    for line in next(logs.glob("attempt=1.log")).read_text().splitlines():
        try:
            events.append(str(json.loads(line).get("event", "")))
        except json.JSONDecodeError:
            events.append(line)
    return events


def test_nightly_export_attaches_every_report_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    with SandboxProcess(
        "--seed-example-patients", "--processing-delay", "1", data_dir=tmp_path / "sandbox"
    ) as sandbox:
        timings["sandbox started, example patients seeded"] = time.monotonic() - started
        # The test's own hook reads another connection id: the deployment's cliniko_default lives in its
        # metadata database only, as one made in the web UI does.
        monkeypatch.delenv("AIRFLOW_CONN_CLINIKO_DEFAULT", raising=False)
        monkeypatch.setenv("AIRFLOW_CONN_E2E_TEST", connection_json(KEY, sandbox.base_url))
        hook = ClinikoHook("e2e_test")
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

        home = tmp_path / "airflow"
        dags = home / "dags"  # the README: copy the examples into the DAG folder
        dags.mkdir(parents=True)
        for example in (REPO / "dags_examples").glob("cliniko_*.py"):
            shutil.copy(example, dags)
        stack = AirflowStack(home, dags)
        started = time.monotonic()
        with stack:
            timings["airflow db migrate, then API server, scheduler, DAG processor, triggerer up"] = (
                time.monotonic() - started
            )
            step = time.monotonic()
            stack.cli(
                "connections", "add", "cliniko_default", "--conn-type", "cliniko", "--conn-password", KEY,
                "--conn-host", sandbox.base_url, "--conn-extra", json.dumps({"user_agent": USER_AGENT}),
            )  # fmt: skip
            timings["airflow connections add"] = time.monotonic() - step
            step = time.monotonic()
            if AIRFLOW_V_3_3_PLUS:
                checked = stack.cli("cliniko", "check")
            else:
                checked = subprocess.run(
                    [str(Path(sys.executable).with_name("cliniko")), "check"],
                    env=stack.env, capture_output=True, text=True, timeout=180, check=True,
                ).stdout  # fmt: skip
            timings["airflow cliniko check"] = time.monotonic() - step
            assert "ok    Reachable: GET /user answered 200" in checked and checked.endswith("All good.\n")
            stack.wait_for(
                lambda: stack.check_alive() or stack.dag_is_parsed(DAG_ID), 180, f"{DAG_ID} to be parsed"
            )
            timings["DAG parsed (since the components started)"] = time.monotonic() - started

            # The first night: the DAG's defaults, no conf, no pool.
            step = time.monotonic()
            stack.cli("dags", "unpause", DAG_ID)  # the README's step (the stack also creates DAGs unpaused)
            stack.cli("dags", "trigger", DAG_ID, "--run-id", "first-night")
            stack.wait_for(
                lambda: (
                    stack.check_alive() or stack.run_state(DAG_ID, "first-night") in ("success", "failed")
                ),
                FIRST_NIGHT_BOUND,
                "the first night's run to finish",
                interval=2,
            )
            timings["first night: trigger to a green run"] = time.monotonic() - step
            if stack.run_state(DAG_ID, "first-night") != "success":
                pytest.fail(
                    f"first night ended {stack.run_state(DAG_ID, 'first-night')}; "
                    f"states {stack.task_states(DAG_ID, 'first-night')}\n"
                    f"scheduler:\n{stack.log_tail('scheduler')}\ntriggerer:\n{stack.log_tail('triggerer')}"
                )
            lines = summary_lines(home, "first-night")
            assert "Cliniko nightly export: 4 uploaded, 1 skipped, 0 failed" in lines
            for row in EXAMPLE_PATIENTS:
                (patient,) = hook.find_patients(old_reference_id=row["reference"])
                (record,) = hook.list_attachments(patient_id=patient["id"])
                assert record["processing_completed"] is True
                assert any(
                    line.startswith(f"  uploaded {row['reference']}: patient {patient['id']}, attachment ")
                    for line in lines
                )
            assert any(line.startswith("  skipped WH-9999: no Cliniko patient") for line in lines)
            assert len(list((home / "cliniko-reports").glob("*/report-WH-*.csv"))) == 5  # under AIRFLOW_HOME

            requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
            conf = {
                "patients": rows,
                "report_root": (tmp_path / "reports").as_uri(),
                "batch_size": BATCH_SIZE,
                "verify": "content",  # each processed file read back and hashed
            }
            started = time.monotonic()
            step = time.monotonic()
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
            timings[f"{PATIENTS} reports in {BATCHES} batch tasks: trigger to a green run"] = (
                time.monotonic() - step
            )
            # Each batch task's link, as the UI asks for it, lists exactly that task's attachments.
            links = [
                requests.get(
                    f"http://127.0.0.1:{stack.port}/api/v2/dags/{DAG_ID}/dagRuns/e2e/taskInstances/"
                    f"upload_reports/links",
                    params={"map_index": index},
                    timeout=30,
                ).json()["extra_links"]["Cliniko attachments"]
                for index in range(BATCHES)
            ]
            summary_rows = stack.query(
                "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'summarize' "
                "AND key = 'return_value'",
                DAG_ID,
                "e2e",
            )

        print("First night, step by step (seconds on this machine):")
        for what, seconds in timings.items():
            print(f"  {seconds:6.1f}  {what}")
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
        assert {item["verification"] for item in summary["uploaded"]} == {"content"}
        night = read_manifest(summary["manifest"])
        assert len(night) == PATIENTS and {
            (line.verification, line.verification_outcome) for line in night
        } == {("content", "passed")}
        linked = [
            {str(record["id"]) for record in hook.get_json(link)["patient_attachments"]} for link in links
        ]
        assert all(len(ids) == BATCH_SIZE for ids in linked)
        assert set().union(*linked) == {item["attachment_id"] for item in summary["uploaded"]}
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
        assert by_route["GET /v1/patient_attachments/{id}/content"] == PATIENTS  # verify="content": one each
        assert api_requests - PATIENTS <= 2.5 * PATIENTS  # presign + create each, a few lookups and polls
