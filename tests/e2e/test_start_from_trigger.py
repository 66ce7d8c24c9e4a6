"""The sensor starts in the triggerer on Airflow 3.3+: a real scheduler, DAG processor and triggerer
(LocalExecutor) wait for an attachment whose id is known when the DAG is parsed, and the task never
reaches a worker: it is never queued to the executor, no worker host or process ever ran it, and the
triggerer ends it with the processed record as its return value."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import connection_json
from tests.e2e.stack import AirflowStack
from tests.helpers import create_attachment_via_api

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not AIRFLOW_V_3_3_PLUS, reason="start_from_trigger needs Airflow 3.3"),
]

DAG_ID = "cliniko_wait_in_triggerer"
KEY = "e2e-trigger-key-au1"
# The downstream task proves the record arrives as an ordinary return value (a dict, not its JSON text).
DAG = """
from airflow.sdk import DAG, task
from cliniko_provider.sensors.cliniko import ProcessingCompletedSensor

with DAG(dag_id="{dag_id}", schedule=None):
    waited = ProcessingCompletedSensor(
        task_id="wait_processed", attachment_id="{attachment_id}", deferrable=True, poke_interval=1,
        timeout=300,
    )

    @task
    def read_record(record):
        assert isinstance(record, dict) and record["processing_completed"] is True, record
        assert str(record["id"]) == "{attachment_id}", record

    read_record(waited.output)
"""


def test_a_known_attachment_is_waited_for_without_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SandboxProcess(
        "--api-key", KEY, "--processing-delay", "4", data_dir=tmp_path / "sandbox"
    ) as sandbox:
        connection = connection_json(KEY, sandbox.base_url)
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection)
        hook = ClinikoHook()
        patient = hook.create_patient("Trigger", "Only")
        attachment = create_attachment_via_api(hook, str(patient["id"]))
        dags = tmp_path / "dags"
        dags.mkdir()
        (dags / "wait.py").write_text(DAG.format(dag_id=DAG_ID, attachment_id=attachment["id"]))

        with AirflowStack(
            tmp_path / "airflow", dags, env={"AIRFLOW_CONN_CLINIKO_DEFAULT": connection}
        ) as stack:
            stack.wait_for(
                lambda: stack.check_alive() or stack.dag_is_parsed(DAG_ID), 180, "the DAG to be parsed"
            )
            started = time.monotonic()
            stack.cli("dags", "trigger", DAG_ID, "--run-id", "t")
            stack.wait_for(
                lambda: stack.check_alive() or stack.run_state(DAG_ID, "t") in ("success", "failed"),
                300,
                "the DAG run to finish",
            )
            print(f"run took {time.monotonic() - started:.1f} s")
            assert stack.run_state(DAG_ID, "t") == "success", stack.log_tail("triggerer")
            [(state, hostname, pid, queued)] = stack.query(
                "SELECT state, hostname, pid, queued_dttm FROM task_instance "
                "WHERE dag_id = ? AND run_id = 't' AND task_id = 'wait_processed'",
                DAG_ID,
            )
            assert state == "success"
            reached = "the task reached a worker:\n" + stack.log_tail("triggerer", 200)
            assert (hostname or None, pid, queued) == (None, None, None), reached
            assert stack.task_states(DAG_ID, "t") == [
                ("read_record", -1, "success"),
                ("wait_processed", -1, "success"),
            ]
            assert not stack.query("SELECT 1 FROM task_instance_history WHERE dag_id = ?", DAG_ID)
            assert "Start from trigger enabled for task wait_processed" in stack.log_tail("triggerer", 400)
