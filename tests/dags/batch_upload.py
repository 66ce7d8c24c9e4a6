"""Test DAG: uploads in batches with ``@task.cliniko_upload`` (one mapped task per batch, each deferring
once), then a report of every batch's results and errors as one JSON line.

The decorated function adds a templated label (``params.label``) to each description; each batch task
names the ``cliniko://cliniko_default/attachments`` asset as its outlet. Run by
``tests/test_batch_dag.py`` with ``airflow dags test cliniko_batch_upload -c '{"batches": [...], "label":
...}'`` against the sandbox, with OpenLineage's file transport configured.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import DAG, task

from cliniko_provider.assets.cliniko import cliniko_attachments

with DAG(
    dag_id="cliniko_batch_upload",
    schedule=None,
    params={"batches": [], "label": ""},
    tags=["cliniko", "test"],
) as dag:

    @task
    def batches(params: dict[str, Any]) -> list[list[dict[str, Any]]]:
        return list(params["batches"])

    @task.cliniko_upload(
        max_concurrency=4,
        wait_for_completion=True,
        deferrable=True,
        poll_interval=1,
        timeout=300,
        retries=0,
        outlets=[cliniko_attachments()],
    )
    def upload(batch: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        return [{**item, "description": f"{item['description']} ({label})"} for item in batch]

    uploaded = upload.partial(label="{{ params.label }}").expand(batch=batches())

    @task(trigger_rule="all_done")
    def report(params: dict[str, Any], ti: Any = None) -> None:
        count = len(params["batches"])
        results = [ti.xcom_pull(task_ids="upload", map_indexes=index) for index in range(count)]
        errors = [
            ti.xcom_pull(task_ids="upload", key="cliniko_error", map_indexes=index) for index in range(count)
        ]
        print("BATCH RESULTS " + json.dumps({"results": results, "errors": errors}))

    uploaded >> report()
