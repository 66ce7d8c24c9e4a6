"""OpenLineage in a real ``airflow dags test`` run: an upload that defers, and its COMPLETE event.

The OpenLineage provider's own file transport writes the events; the test reads them back. CI also runs
this test on the oldest and newest Airflow/Python pairings (``make test-compat``) as the one real upload
with a deferred wait there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from tests.conftest import REPO, SANDBOX_KEY, connection_json
from tests.helpers import env_with, sandbox_faults, write_file


def lineage_events(path: Path) -> list[dict[str, Any]]:
    """Every OpenLineage event the file transport appended (one JSON document per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # the Airflow database, then a DAG run whose task defers
def test_upload_that_defers_reports_the_file_in_and_the_attachment_out(
    sandbox: Any, sandbox_conn: str, tmp_path: Path
) -> None:
    home = tmp_path / "airflow-home"
    home.mkdir()
    events_file = tmp_path / "openlineage.jsonl"
    env = env_with(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "tests" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__OPENLINEAGE__NAMESPACE="cliniko-tests",
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        AIRFLOW_CONN_CLINIKO_DEFAULT=connection_json(SANDBOX_KEY, sandbox.base_url),
        PYTHONPATH=str(REPO),
        CLINIKO_STATE_DIR=str(home / "state"),
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    patient = str(ClinikoHook(sandbox_conn).create_patient("Ada", "Lineage")["id"])
    report = write_file(tmp_path, "lineage report.csv", 3000)
    conf = json.dumps({"patient_id": patient, "file_path": str(report)})
    with sandbox_faults(sandbox, processing_delay=3.0):  # still processing when the task defers
        run = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", "cliniko_upload_lineage", "-c", conf],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    output = run.stdout + run.stderr
    (tmp_path / "dags-test.log").write_text(output)
    assert run.returncode == 0, output[-6000:]
    assert SANDBOX_KEY not in output

    [attachment] = ClinikoHook(sandbox_conn).list_attachments(patient_id=patient)
    assert attachment["processing_completed"] is True  # the task returned only once processed...
    assert "new_state=deferred" in output.lower()  # ...after waiting in the trigger

    events = [e for e in lineage_events(events_file) if e["job"]["name"] == "cliniko_upload_lineage.attach"]
    # START when the task starts and again when it resumes after the trigger, then one COMPLETE.
    assert [e["eventType"] for e in events] == ["START", "START", "COMPLETE"], [
        e["eventType"] for e in events
    ]
    complete = events[-1]
    assert complete["job"]["namespace"] == "cliniko-tests"
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [("file", str(report).lstrip("/"))]
    api_host = urlsplit(sandbox.base_url).netloc
    assert [(d["namespace"], d["name"]) for d in complete["outputs"]] == [
        (f"cliniko://{api_host}", f"patients/{patient}/attachments/{attachment['id']}")
    ]
    assert SANDBOX_KEY not in events_file.read_text()
