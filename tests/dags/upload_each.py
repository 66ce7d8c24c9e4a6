"""Test DAGs: upload each of the given files (with an optional name) into one patient's record, one
mapped task per file, all with one description.

Run by ``tests/test_idempotency_dags.py`` with ``airflow dags test <dag> <date> -c '{"patient_id": ...,
"description": ..., "uploads": [{"file_path": ..., "filename": ...}, ...]}'`` against the sandbox.
``upload_each`` is the usual DAG (a first try asks Cliniko nothing extra). ``airflow dags test`` replaces
an earlier run of the same date with a new one whose tries start at 1, so ``upload_each_again`` looks
for earlier uploads on first tries too (``look_for_existing="always"``): a second run of a date then
takes the path a cleared task takes.
"""

from __future__ import annotations

from typing import Any, Literal

from airflow.sdk import DAG, task

from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator


def upload_dag(dag_id: str, look_for_existing: Literal["always", "on_retry"]) -> DAG:
    """One mapped upload per item of ``params.uploads``."""
    with DAG(
        dag_id=dag_id,
        schedule=None,
        params={"patient_id": "", "description": "", "uploads": []},
        tags=["cliniko", "test"],
    ) as dag:

        @task
        def uploads(params: dict[str, Any]) -> list[dict[str, str]]:
            """One set of arguments per file, exactly as given."""
            return [dict(item) for item in params["uploads"]]

        ClinikoAttachmentUploadOperator.partial(
            task_id="upload",
            patient_id="{{ params.patient_id }}",
            description="{{ params.description }}",
            look_for_existing=look_for_existing,
            wait_for_completion=True,
            deferrable=False,
            poll_interval=0.2,
            timeout=60,
        ).expand_kwargs(uploads())
    return dag


upload_each = upload_dag("upload_each", "on_retry")
upload_each_again = upload_dag("upload_each_again", "always")
