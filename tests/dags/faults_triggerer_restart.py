"""Test DAG: 100 (or any number of) deferrable ``ProcessingCompletedSensor``s, one per attachment id.

Run by ``tests/faults/test_scenarios.py`` on a real Airflow deployment (``tests/e2e/stack.py``): the
triggerer is killed and restarted while every sensor is deferred, and all of them must still complete.
Trigger it with ``--conf '{"attachment_ids": ["1", "2", ...]}'``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, task

from cliniko_provider.sensors.cliniko import ProcessingCompletedSensor

with DAG(
    dag_id="faults_triggerer_restart",
    schedule=None,
    params={"attachment_ids": []},
    max_active_tasks=500,
    tags=["cliniko", "test"],
) as dag:

    @task
    def attachment_ids(params: Any = None) -> list[str]:
        """The attachments to wait for, from the run's conf."""
        return [str(item) for item in params["attachment_ids"]]

    ProcessingCompletedSensor.partial(
        task_id="wait",
        deferrable=True,
        poke_interval=2,
        timeout=900,
    ).expand(attachment_id=attachment_ids())
