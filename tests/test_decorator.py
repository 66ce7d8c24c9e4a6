"""``@task.cliniko_upload``: registered with Airflow, the batch operator's arguments passed through, the
function's uploads attached (the real DAG run is in tests/test_batch_dag.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pendulum
import pytest
from airflow.sdk import DAG, task

from cliniko_provider.decorators.cliniko import _ClinikoUploadDecoratedOperator, cliniko_upload_task
from cliniko_provider.exceptions import ClinikoBatchFinalError, ClinikoInputError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator
from tests.helpers import fake_context, write_file


def decorated(**kwargs: Any) -> Any:
    """Build a one-task DAG with the decorator; return the task."""
    with DAG("decorated", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):

        @task.cliniko_upload(**kwargs)
        def upload(uploads: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return uploads

        return upload([]).operator


def test_airflow_finds_the_decorator_in_the_provider_metadata() -> None:
    assert task.cliniko_upload is cliniko_upload_task


def test_the_task_is_a_batch_upload_with_the_given_arguments() -> None:
    op = decorated(cliniko_conn_id="cliniko_prod", max_concurrency=2, wait_for_completion=True, retries=3)
    assert isinstance(op, _ClinikoUploadDecoratedOperator)
    assert isinstance(op, ClinikoBatchUploadOperator)
    assert (op.cliniko_conn_id, op.max_concurrency, op.wait_for_completion, op.retries) == (
        "cliniko_prod",
        2,
        True,
        3,
    )
    assert op.custom_operator_name == "@task.cliniko_upload"
    assert "uploads" not in op.template_fields  # what the function returns is not rendered again
    assert "audit_path" in op.template_fields  # the batch operator's own templated arguments are


def test_bad_arguments_fail_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be from 1 to 10"):
        decorated(max_concurrency=11)
    with pytest.raises(TypeError, match="takes no 'uploads'"):
        decorated(uploads=[])


def test_the_function_returns_the_uploads_and_each_failure_is_named(
    sandbox_conn: str, tmp_path: Path
) -> None:
    patient = str(ClinikoHook(sandbox_conn).create_patient("Deco", "Rated")["id"])
    good = write_file(tmp_path, "good.csv", 120)

    def uploads(folder: str) -> list[dict[str, Any]]:
        return [
            {"patient_id": patient, "file_path": f"{folder}/good.csv", "description": "{{ kept }}"},
            {"patient_id": patient, "file_path": f"{folder}/missing.csv"},
        ]

    op = _ClinikoUploadDecoratedOperator(
        task_id="upload", python_callable=uploads, op_args=[str(tmp_path)], cliniko_conn_id=sandbox_conn
    )
    context = fake_context()
    with pytest.raises(ClinikoBatchFinalError, match=r"1 of 2 upload\(s\) failed") as failure:
        op.execute(context)
    assert "#1 patient" in str(failure.value) and "missing.csv" in str(failure.value)
    good_result, bad_result = context["ti"].pushed["return_value"]
    assert good_result["file_path"] == str(good) and good_result["attachment_id"]
    assert "error" in bad_result
    [record] = ClinikoHook(sandbox_conn).list_attachments(patient_id=patient)
    assert record["description"] == "{{ kept }}"


def test_a_function_that_returns_no_list_fails_clearly(sandbox_conn: str) -> None:
    op = _ClinikoUploadDecoratedOperator(
        task_id="upload", python_callable=lambda: "a.pdf", cliniko_conn_id=sandbox_conn
    )
    with pytest.raises(ClinikoInputError, match="uploads must be a list of dicts, got str"):
        op.execute(fake_context())
