"""Test DAG: upload every file of a directory into one patient's record, one mapped task per file.

Run by ``tests/test_upload_sandbox.py`` with ``airflow dags test upload_expand -c '{"patient_id": ...,
"directory": ...}'`` against the sandbox.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import DAG, task

from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator

with DAG(
    dag_id="upload_expand",
    schedule=None,
    params={"patient_id": "", "directory": ""},
    tags=["cliniko", "test"],
) as dag:

    @task
    def list_files(params: dict[str, str]) -> list[str]:
        """Local paths, and every other file as a ``file://`` URI, so both kinds of source are mapped."""
        files = sorted(Path(params["directory"]).iterdir())
        return [path.as_uri() if index % 2 else str(path) for index, path in enumerate(files)]

    ClinikoAttachmentUploadOperator.partial(
        task_id="upload",
        patient_id="{{ params.patient_id }}",
        description="Nightly export {{ run_id }}",
        wait_for_completion=True,
        deferrable=False,
        poll_interval=0.2,
        timeout=60,
    ).expand(file_path=list_files())
