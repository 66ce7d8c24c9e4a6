"""Many files in one task, in a real ``airflow dags test`` run: 50 reports in 5 mapped
``@task.cliniko_upload`` batch tasks, bad files among them, each batch deferring once (trigger in-process),
against the sandbox; then each batch's OpenLineage event (file transport) and the asset event of the batch
that succeeded (the metadata database)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import REPO, SANDBOX_KEY, connection_json
from tests.helpers import env_with, sandbox_faults, write_file
from tests.test_lineage_dag import lineage_events

REPORTS = 50
BATCH = 10
# The function's argument is templated ("{{ params.label }}"); what it returns is not rendered again.
LABEL = "night {{ not rendered }}"


@pytest.mark.slow  # about a minute and a half: the Airflow database, then 5 batch tasks each deferring once
def test_50_reports_in_batches_with_bad_files_among_them_lineage_and_asset_events(
    sandbox: Any, sandbox_conn: str, tmp_path: Path
) -> None:
    hook = ClinikoHook(sandbox_conn)
    patients = [str(hook.create_patient("Batch", f"Dag {uuid.uuid4().hex[:6]}")["id"]) for _ in range(5)]
    uploads: list[dict[str, Any]] = []
    bad: dict[int, str] = {}
    for number in range(REPORTS):
        path = write_file(tmp_path, f"report-{number:02d}.csv", 200 + number, seed=number)
        upload = {
            "patient_id": patients[number % 5],
            "file_path": str(path),
            "description": f"Report {number}",
        }
        if number in (3, 17):
            path.unlink()
            bad[number] = "no such file"
        elif number in (8, 31):
            path.write_bytes(b"")
            bad[number] = "empty (0 bytes)"
        elif number == 25:
            upload["patient_id"] = "999999999"
            bad[number] = "no such patient"
        uploads.append(upload)
    batches = [uploads[start : start + BATCH] for start in range(0, REPORTS, BATCH)]
    home = tmp_path / "airflow-home"
    events_file = tmp_path / "openlineage.jsonl"
    env = env_with(
        AIRFLOW__OPENLINEAGE__NAMESPACE="cliniko-tests",
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "tests" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=str(REPO),
        CLINIKO_STATE_DIR=str(home / "state"),
        AIRFLOW_CONN_CLINIKO_DEFAULT=connection_json(SANDBOX_KEY, sandbox.base_url),
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    with sandbox_faults(sandbox, processing_delay=2.0):  # still processing when each batch defers
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "airflow",
                "dags",
                "test",
                "cliniko_batch_upload",
                "-c",
                json.dumps({"batches": batches, "label": LABEL}),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    output = run.stdout + run.stderr
    line = next((row for row in output.splitlines() if "BATCH RESULTS " in row), None)
    assert line is not None, output[-6000:]
    report = json.loads(line.split("BATCH RESULTS ", 1)[1])
    results = [result for batch in report["results"] for result in batch]
    assert len(results) == REPORTS
    for number, result in enumerate(results):
        assert result["index"] == number % BATCH
        assert result["file_path"] == uploads[number]["file_path"]
        if number in bad:
            assert bad[number] in result["error"], result
        else:
            assert "error" not in result, (number, result.get("error"))
            assert result["processed_at"], result  # waited for in the triggerer, through the deferral
    # batches 0, 1, 2 and 3 hold bad files: their tasks failed, naming them; batch 4 succeeded
    assert [error is None for error in report["errors"]] == [False, False, False, False, True]
    assert report["errors"][0].startswith("2 of 10 upload(s) failed:")
    assert output.count("Deferring until Cliniko has processed") == 5
    if AIRFLOW_V_3_3_PLUS:  # every thread's progress went to the task state store, none to the journal
        assert "task state store could not record" not in output
        assert not list((home / "state" / "uploads").glob("*"))
    # in Cliniko: one attachment per good report, each with its own bytes' size
    attached = {
        str(record["id"]): record
        for patient in patients
        for record in hook.list_attachments(patient_id=patient, include_archived=True)
    }
    good = [result for number, result in enumerate(results) if number not in bad]
    assert sorted(attached) == sorted(str(result["attachment_id"]) for result in good)
    for number, result in enumerate(results):
        if number not in bad:
            record = attached[str(result["attachment_id"])]
            assert record["size"] == 200 + number
            assert record["description"] == f"Report {number} ({LABEL})"
    assert SANDBOX_KEY not in output

    # OpenLineage: one event per batch task, naming every file read and every attachment made.
    api_host = urlsplit(sandbox.base_url).netloc
    events = [e for e in lineage_events(events_file) if e["job"]["name"] == "cliniko_batch_upload.upload"]
    finished = [e for e in events if e["eventType"] in ("COMPLETE", "FAIL")]
    assert sorted(e["eventType"] for e in finished) == ["COMPLETE"] + ["FAIL"] * 4

    def named(batch: list[dict[str, Any]]) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
        made = [r for r in batch if "error" not in r]  # a file that failed before Cliniko had it: not named
        return frozenset(("file", r["file_path"].lstrip("/")) for r in made), frozenset(
            (f"cliniko://{api_host}", f"patients/{r['patient_id']}/attachments/{r['attachment_id']}")
            for r in made
        )

    reported = {
        (frozenset((d["namespace"], d["name"]) for d in e["inputs"]), frozenset(
            (d["namespace"], d["name"]) for d in e["outputs"]
        ))
        for e in finished
    }  # fmt: skip
    assert reported == {named(batch) for batch in report["results"]}
    complete = next(e for e in finished if e["eventType"] == "COMPLETE")
    print(f"COMPLETE event of a {BATCH}-file batch: {len(json.dumps(complete))} bytes")

    # Assets: the batch that succeeded emitted one event on cliniko://cliniko_default/attachments (counts)
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute(
            "SELECT asset.uri, asset_event.extra, asset_event.source_map_index FROM asset_event "
            "JOIN asset ON asset.id = asset_event.asset_id"
        ).fetchall()
    [(uri, extra, map_index)] = rows
    assert (uri, map_index) == ("cliniko://cliniko_default/attachments", 4)
    extra = json.loads(extra)
    assert extra.pop("run_id").startswith("manual__")
    assert extra == {
        "files": 10, "attached": 10, "reused": 0, "processed": 10, "failed": 0,
        "cliniko_conn_id": "cliniko_default",
    }  # fmt: skip
