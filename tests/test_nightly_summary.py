"""The nightly example's summary counts as uploaded only what Cliniko confirmed processed."""

from __future__ import annotations

from typing import Any

import pytest

from dags_examples.cliniko_nightly_report_export import cliniko_nightly_report_export


class SummaryTI:
    """What ``summarize`` pulls: the batches, the skipped reports and each batch's results."""

    def __init__(self, batches: list[list[dict[str, str]]], results: dict[int, Any]) -> None:
        self.batches = batches
        self.results = results

    def xcom_pull(self, task_ids: str, key: str = "return_value", map_indexes: int | None = None) -> Any:
        if task_ids == "resolve_patients":
            return self.batches if key == "return_value" else []
        return self.results.get(map_indexes) if key == "return_value" else None


def summarize(ti: SummaryTI, reports: list[dict[str, str]]) -> Any:
    task = cliniko_nightly_report_export().get_task("summarize")
    return task.python_callable(reports, ti=ti)  # type: ignore[attr-defined]


REPORTS = [{"file_path": f"/r/{n}.pdf", "reference": f"R{n}"} for n in range(2)]
BATCH = [{"patient_id": "1", "file_path": f"/r/{n}.pdf", "reference": f"R{n}"} for n in range(2)]


def test_results_still_waiting_when_the_deferral_was_abandoned_are_not_uploaded() -> None:
    results = [
        {"attachment_id": "10", "status": "processed", "processed_at": "2026-01-01T00:00:00Z"},
        {"attachment_id": "11", "status": "waiting"},  # pushed before deferring; the wait never returned
    ]
    with pytest.raises(RuntimeError, match="1 report"):
        summarize(SummaryTI([BATCH], {0: results}), REPORTS)


def test_processed_results_are_uploaded() -> None:
    results = [{"attachment_id": str(10 + n), "status": "processed", "processed_at": "t"} for n in range(2)]
    summary = summarize(SummaryTI([BATCH], {0: results}), REPORTS)
    assert [item["attachment_id"] for item in summary["uploaded"]] == ["10", "11"] and not summary["failed"]


def test_the_upload_task_verifies_as_the_run_param_says() -> None:
    dag = cliniko_nightly_report_export()
    param = dag.params.get_param("verify")
    assert (param.value, param.schema["enum"]) == ("size", ["size", "content"])  # free by default
    assert "a request and the file's bytes each" in str(param.description)
    task = dag.get_task("upload_reports")
    assert task.partial_kwargs["verify"] == "{{ params.verify }}"  # type: ignore[attr-defined]
