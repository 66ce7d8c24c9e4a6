"""Test DAG: upload one file with hook calls, then wait for Cliniko with the deferrable sensor.

Run by ``tests/test_sensor_dag.py`` with ``airflow dags test cliniko_sensor_deferrable`` against the
sandbox (``airflow dags test`` runs the trigger in-process). ``PYTHONPATH`` must hold the repository.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, task

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sensors.cliniko import ProcessingCompletedSensor

with DAG(dag_id="cliniko_sensor_deferrable", schedule=None, tags=["cliniko", "test"]) as dag:

    @task
    def upload() -> str:
        """Create a patient and one attachment through the API; return the attachment id."""
        from tests.helpers import create_attachment_via_api

        hook = ClinikoHook()
        patient = hook.create_patient("Dag", "Sensor")
        return str(create_attachment_via_api(hook, patient["id"], filename="dag report.pdf")["id"])

    wait = ProcessingCompletedSensor(
        task_id="wait",
        attachment_id="{{ ti.xcom_pull(task_ids='upload') }}",
        deferrable=True,
        poke_interval=1,
        timeout=120,
    )

    @task
    def check(record: dict[str, Any]) -> None:
        """Fail unless the sensor's XCom is the processed record."""
        assert record["processing_completed"] is True, record
        assert record["filename"] == "dag report.pdf", record
        print(f"PROCESSED RECORD {record['id']} {record['filename']}")

    upload() >> wait
    check(wait.output)
