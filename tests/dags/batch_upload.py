"""Test DAG: uploads in batches with ``ClinikoBatchUploadOperator`` (one mapped task per batch, each
deferring once), then a report of every batch's results and errors as one JSON line.

Run by ``tests/test_batch_dag.py`` with ``airflow dags test cliniko_batch_upload -c '{"batches": [...]}'``
against the sandbox.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import DAG, task

from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator

with DAG(
    dag_id="cliniko_batch_upload",
    schedule=None,
    params={"batches": []},
    tags=["cliniko", "test"],
) as dag:

    @task
    def batches(params: dict[str, Any]) -> list[list[dict[str, Any]]]:
        return list(params["batches"])

    uploaded = ClinikoBatchUploadOperator.partial(
        task_id="upload",
        max_concurrency=4,
        wait_for_completion=True,
        deferrable=True,
        look_for_existing="on_retry",
        poll_interval=1,
        timeout=300,
        retries=0,
    ).expand(uploads=batches())

    @task(trigger_rule="all_done")
    def report(params: dict[str, Any], ti: Any = None) -> None:
        count = len(params["batches"])
        results = [ti.xcom_pull(task_ids="upload", map_indexes=index) for index in range(count)]
        errors = [
            ti.xcom_pull(task_ids="upload", key="cliniko_error", map_indexes=index) for index in range(count)
        ]
        print("BATCH RESULTS " + json.dumps({"results": results, "errors": errors}))

    uploaded >> report()
