"""The nightly export's wiring (cliniko_provider.nightly): resolving, batching and the summary."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cliniko_provider.nightly import (
    BATCH_DIED,
    NO_PATIENT,
    NOT_CONFIRMED,
    in_batches,
    resolve_reports,
    run_date,
    summarize_batches,
    summarize_night,
    uploads_of,
)
from cliniko_provider.utils.audit import manifest_location, read_manifest, write_manifest
from tests.test_audit import record

ADA = {"id": 11, "old_reference_id": "R1", "email": "ada@example.com"}
ALAN = {"id": 12, "old_reference_id": None, "email": "alan@example.com"}


class FakeHook:
    """Answers ``match_patients`` and ``list_attachments`` from lists, recording the calls."""

    def __init__(self, patients: dict[str, Any], attachments: list[dict[str, Any]] | None = None) -> None:
        self.patients = patients
        self.attachments = attachments or []
        self.calls: list[tuple[str, Any]] = []

    def match_patients(self, references: list[str], emails: list[str]) -> dict[str, Any]:
        self.calls.append(("match_patients", (references, emails)))
        return self.patients

    def list_attachments(self, *filters: str) -> Iterator[dict[str, Any]]:
        self.calls.append(("list_attachments", filters))
        return iter(self.attachments)


def attachment(patient_id: int, description: str) -> dict[str, Any]:
    link = f"https://api.au1.cliniko.com/v1/patients/{patient_id}"
    return {"patient": {"links": {"self": link}}, "description": description}


def describe(report: Any) -> str:
    return f"Nightly report 2026-01-01 ({report['reference']})"


def report(reference: str, email: str = "") -> dict[str, str]:
    return {"reference": reference, "email": email, "file_path": f"/r/{reference}.csv"}


def resolve(hook: FakeHook, reports: list[dict[str, str]], **kwargs: Any) -> Any:
    return resolve_reports(hook, reports, describe, **kwargs)  # type: ignore[arg-type]


def test_reports_resolve_by_reference_then_by_email_in_one_bulk_match() -> None:
    hook = FakeHook({"R1": ADA, "alan@example.com": ALAN})
    resolved, skipped = resolve(hook, [report("R1", "other@example.com"), report("R2", "Alan@Example.com")])
    assert [(r["reference"], r["patient_id"]) for r in resolved] == [("R1", "11"), ("R2", "12")]
    assert resolved[0]["description"] == "Nightly report 2026-01-01 (R1)" and not skipped
    assert hook.calls == [
        ("match_patients", (["R1", "R2"], ["other@example.com", "Alan@Example.com"]))
    ]  # no attached_filter: nothing listed


def test_a_report_without_a_patient_is_skipped_with_the_reason() -> None:
    resolved, skipped = resolve(FakeHook({"R1": ADA}), [report("R1"), report("R9", "nobody@example.com")])
    assert [r["reference"] for r in resolved] == ["R1"]
    assert skipped == [{**report("R9", "nobody@example.com"), "reason": NO_PATIENT}]


def test_only_the_same_description_on_the_same_patient_counts_as_already_attached() -> None:
    attached = [
        attachment(11, "Nightly report 2026-01-01 (R1)"),  # this report: skipped
        attachment(11, "Nightly report 2026-01-01 (R2)"),  # another patient's description: not this one
        attachment(12, "Nightly report 2026-01-01 (R1) draft"),  # not the exact description
    ]
    hook = FakeHook({"R1": ADA, "R2": ALAN}, attached)
    resolved, skipped = resolve(
        hook, [report("R1"), report("R2")], attached_filter="description:~Nightly report 2026-01-01 ("
    )
    assert [r["reference"] for r in resolved] == ["R2"]
    assert [(s["reference"], s["reason"]) for s in skipped] == [("R1", "already attached to patient 11")]
    assert hook.calls[1] == ("list_attachments", ("description:~Nightly report 2026-01-01 (",))


def test_no_reports_make_no_requests() -> None:
    hook = FakeHook({})
    assert resolve(hook, [], attached_filter="description:~x") == ([], []) and not hook.calls


@pytest.mark.parametrize(
    ("count", "size", "sizes"),
    [(0, 2, []), (4, 2, [2, 2]), (5, 2, [2, 2, 1]), (2, 2, [2]), (1, 2, [1]), (3, 0, [1, 1, 1])],
)
def test_batches_hold_at_most_size_items_in_order(count: int, size: int, sizes: list[int]) -> None:
    batches = in_batches([{"n": n} for n in range(count)], size)
    assert [len(batch) for batch in batches] == sizes
    assert [item["n"] for batch in batches for item in batch] == list(range(count))


def test_uploads_keep_only_the_keys_an_upload_takes() -> None:
    resolved = [{**report("R1"), "name": "Ada", "patient_id": "11", "description": "d"}]
    assert uploads_of(resolved) == [{"patient_id": "11", "file_path": "/r/R1.csv", "description": "d"}]


def test_a_run_without_a_logical_date_reports_on_the_day_it_ran_for() -> None:
    day = datetime(2026, 3, 4, 2, tzinfo=timezone.utc)
    assert run_date(SimpleNamespace(logical_date=day, run_after=None)) == "2026-03-04"
    assert run_date(SimpleNamespace(logical_date=None, run_after=day)) == "2026-03-04"


BATCH = [{"reference": f"R{n}", "patient_id": "11", "file_path": f"/r/R{n}.csv"} for n in range(2)]


def processed(n: int) -> dict[str, Any]:
    return {"attachment_id": str(100 + n), "status": "processed", "processed_at": "2026-01-01T00:00:00Z"}


def test_only_processed_results_count_as_uploaded() -> None:
    results = [[processed(0), {"attachment_id": "101", "status": "waiting"}]]
    uploaded, failed = summarize_batches([BATCH], results)
    assert uploaded == [
        {
            "reference": "R0",
            "patient_id": "11",
            "attachment_id": "100",
            "processed_at": "2026-01-01T00:00:00Z",
            "verification": None,
        }
    ]
    assert failed == [
        {
            "reference": "R1",
            "patient_id": "11",
            "attachment_id": "101",
            "file_path": "/r/R1.csv",
            "reason": NOT_CONFIRMED,
        }
    ]


def test_an_items_error_is_its_reason() -> None:
    _, failed = summarize_batches([BATCH], [[processed(0), {"error": "file too large", "status": "error"}]])
    assert [(f["reference"], f["reason"]) for f in failed] == [("R1", "file too large")]


@pytest.mark.parametrize("results", [None, [processed(0)], "not a list"])
def test_a_batch_without_one_result_per_report_failed_whole_with_its_error(results: Any) -> None:
    uploaded, failed = summarize_batches([BATCH, BATCH[:1]], [results, [processed(0)]], ["boom", None])
    assert [(f["reference"], f["reason"]) for f in failed] == [("R0", "boom"), ("R1", "boom")]
    assert [u["reference"] for u in uploaded] == ["R0"]  # the second batch is untouched
    _, failed = summarize_batches([BATCH], [results])  # no error in XCom either
    assert {f["reason"] for f in failed} == {BATCH_DIED}


class NightTI:
    """What ``summarize_night`` pulls, from dicts keyed by (task, key, map index); records each pull."""

    def __init__(self, values: dict[tuple[str, str, int | None], Any]) -> None:
        self.values = values
        self.pulls: list[tuple[str, str, int | None]] = []

    def xcom_pull(self, task_ids: str, key: str = "return_value", map_indexes: int | None = None) -> Any:
        self.pulls.append((task_ids, key, map_indexes))
        return self.values.get((task_ids, key, map_indexes))


def test_the_night_is_summarised_logged_and_its_manifests_merged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = SimpleNamespace(dag_id="nightly", run_id="scheduled__2026-01-01T02:00:00+00:00")
    write_manifest(
        manifest_location(tmp_path, run.dag_id, run.run_id, "up", 0),
        [record(run_id=run.run_id, index=0)],
    )
    ti = NightTI(
        {
            ("resolve", "return_value", None): [BATCH],
            ("resolve", "skipped", None): [{"reference": "R9", "reason": NO_PATIENT}],
            ("up", "return_value", 0): [{**processed(0), "verification": "content"}, processed(1)],
        }
    )
    logger = logging.getLogger("test_nightly")
    with caplog.at_level(logging.INFO, logger="test_nightly"):
        summary = summarize_night(
            ti,
            [1, 2, 3],
            resolve_task_id="resolve",
            upload_task_id="up",
            audit_path=str(tmp_path),
            dag_run=run,
            logger=logger,
        )
    assert list(summary) == ["reports", "uploaded", "skipped", "failed", "manifest"]
    assert summary["reports"] == 3 and len(summary["uploaded"]) == 2 and not summary["failed"]
    assert len(read_manifest(summary["manifest"])) == 1
    assert ("up", "cliniko_error", 0) not in ti.pulls  # a batch with all its results needs no error
    assert caplog.messages[1:] == [
        "Cliniko nightly export: 2 uploaded, 1 skipped, 0 failed",
        "  uploaded R0: patient 11, attachment 100 (verified: content)",
        "  uploaded R1: patient 11, attachment 101",
        f"  skipped R9: {NO_PATIENT}",
    ]
    assert caplog.messages[0].startswith("Audit manifest of the night: ")


def test_a_night_with_a_failure_logs_it_then_fails() -> None:
    ti = NightTI(
        {
            ("resolve_patients", "return_value", None): [BATCH],
            ("upload_reports", "cliniko_error", 0): "worker killed",
        }
    )
    with pytest.raises(RuntimeError, match=r"^2 report\(s\) failed to upload"):
        summarize_night(ti, None)
    assert ("upload_reports", "cliniko_error", 0) in ti.pulls


def test_a_night_without_reports_has_an_empty_summary() -> None:
    summary = summarize_night(NightTI({}), [], audit_path=None)
    assert summary == {"reports": 0, "uploaded": [], "skipped": [], "failed": []}
