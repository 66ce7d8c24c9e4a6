"""Test DAG: upload one file with the operator, wait for processing in the trigger, report lineage.

Run by ``tests/test_lineage_dag.py`` with ``airflow dags test cliniko_upload_lineage -c '{"patient_id":
..., "file_path": ...}'`` against the sandbox, with OpenLineage's file transport configured.
"""

from __future__ import annotations

from airflow.sdk import DAG

from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator

with DAG(
    dag_id="cliniko_upload_lineage",
    schedule=None,
    params={"patient_id": "", "file_path": ""},
    tags=["cliniko", "test"],
) as dag:
    ClinikoAttachmentUploadOperator(
        task_id="attach",
        patient_id="{{ params.patient_id }}",
        file_path="{{ params.file_path }}",
        description="Lineage run {{ run_id }}",
        wait_for_completion=True,
        deferrable=True,
        poll_interval=1,
        timeout=120,
    )
