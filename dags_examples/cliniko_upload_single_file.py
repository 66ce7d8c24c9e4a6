"""The smallest useful Cliniko DAG: attach one file to one patient and wait until Cliniko has processed it.

Trigger it with a config such as ``{"patient_id": "1234567890", "file_path": "/data/report.pdf"}``.
``file_path`` may also be an object-storage URI (``s3://bucket/report.pdf``, ``file:///data/report.pdf``).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"patient_id": "", "file_path": "", "description": "Uploaded by Airflow"},
    tags=["cliniko", "example"],
)
def cliniko_upload_single_file() -> None:
    """Upload ``params.file_path`` to patient ``params.patient_id``; the task returns the processed record."""
    ClinikoAttachmentUploadOperator(
        task_id="upload",
        patient_id="{{ params.patient_id }}",
        file_path="{{ params.file_path }}",
        description="{{ params.description }}",
        wait_for_completion=True,
    )


cliniko_upload_single_file()
