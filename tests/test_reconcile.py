"""Reconcile: an audit manifest checked against the sandbox, 100 attachments a request."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.exceptions import ClinikoInputError, ClinikoReconcileError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator
from cliniko_provider.operators.reconcile import ClinikoReconcileOperator
from cliniko_provider.utils.audit import (
    AuditRecord,
    Finding,
    attached,
    compare,
    content_changed,
    manifest_location,
    read_manifest,
    reconcile_summary,
    write_manifest,
)
from tests.helpers import fake_context, sandbox_control, sandbox_faults, write_file

JsonDict = dict[str, Any]


@pytest.fixture
def hook(unpaced_sandbox_hook: ClinikoHook) -> ClinikoHook:
    return unpaced_sandbox_hook


def api_requests(sandbox: Any) -> dict[str, int]:
    by_route = sandbox_control(sandbox, "stats")["requests_by_route"]
    return {route: int(count) for route, count in by_route.items() if " /v1/" in route}


def requests_since(sandbox: Any, before: dict[str, int]) -> dict[str, int]:
    now = api_requests(sandbox)
    return {route: now[route] - before.get(route, 0) for route in now if now[route] != before.get(route, 0)}


def delete_attachment(sandbox: Any, attachment_id: str) -> None:
    """Remove an attachment for good (a sandbox control: Cliniko's API only archives)."""
    url = f"{sandbox.base_url.removesuffix('/v1')}/_sandbox/attachments/{attachment_id}/delete"
    requests.post(url, json={}, timeout=10).raise_for_status()


def reconcile(hook: ClinikoHook, manifest: Any, **kwargs: Any) -> tuple[Any, JsonDict | None, str]:
    op = ClinikoReconcileOperator(task_id="reconcile", manifest=str(manifest), **kwargs)
    op.hook = hook
    ctx = fake_context()
    try:
        return ctx, op.execute(ctx), ""
    except ClinikoReconcileError as error:
        return ctx, ctx["ti"].pushed["return_value"], str(error)


def upload_batch(hook: ClinikoHook, tmp_path: Path, files: list[Path], patient: str) -> Path:
    audit = tmp_path / "audit"
    op = ClinikoBatchUploadOperator(
        task_id="upload",
        uploads=[{"patient_id": patient, "file_path": str(path)} for path in files],
        wait_for_completion=True,
        deferrable=False,
        poll_interval=0.2,
        timeout=60,
        audit_path=str(audit),
    )
    op.hook = hook
    op.execute(fake_context())
    return Path(str(manifest_location(audit, "nightly", "manual__1", "upload", None)))


def test_an_archived_and_a_deleted_attachment_are_reported_the_rest_confirmed_in_one_request(
    hook: ClinikoHook, tmp_path: Path, sandbox: Any
) -> None:
    patient = str(hook.create_patient("Reconcile", uuid.uuid4().hex[:8])["id"])
    files = [write_file(tmp_path, f"r{n}.csv", 200 + n, seed=n) for n in range(5)]
    manifest = upload_batch(hook, tmp_path, files, patient)
    lines = read_manifest(manifest)
    ids = [str(line.attachment_id) for line in lines]

    before = api_requests(sandbox)
    _, report, error = reconcile(hook, manifest)
    assert not error and report == {
        "manifest": str(manifest),
        "checked": 5,
        "skipped": 0,
        "counts": {"confirmed": 5},
        "findings": [],
    }
    assert requests_since(sandbox, before) == {"GET /v1/patient_attachments": 1}

    hook.archive_attachment(ids[1])
    delete_attachment(sandbox, ids[3])
    assert str(ids[3]) not in hook.get_attachments(ids)  # deleted: absent from Cliniko's answer
    assert hook.get_attachments(ids)[ids[1]]["archived_at"]  # archived: returned, with archived_at

    before = api_requests(sandbox)
    _, report, error = reconcile(hook, manifest)
    assert requests_since(sandbox, before) == {"GET /v1/patient_attachments": 1}
    assert report is not None and report["counts"] == {"confirmed": 3, "archived": 1, "missing": 1}
    assert [(f["attachment_id"], f["status"]) for f in report["findings"]] == [
        (ids[1], "archived"),
        (ids[3], "missing"),
    ]
    assert error.startswith(
        f"Reconciled 5 attachment(s) of {manifest} with Cliniko: 3 confirmed, 1 missing, 1 archived\n"
    )
    assert f"attachment {ids[3]} (patient {patient}, r3.csv): missing: not in Cliniko any more" in error
    assert "archived: archived at 20" in error


def test_content_is_compared_when_asked(hook: ClinikoHook, tmp_path: Path, sandbox: Any) -> None:
    patient = str(hook.create_patient("Reconcile", uuid.uuid4().hex[:8])["id"])
    files = [write_file(tmp_path, f"c{n}.csv", 300 + n, seed=n) for n in range(2)]
    manifest = upload_batch(hook, tmp_path, files[:1], patient)
    with sandbox_faults(sandbox, corrupt_processed_contents=1):  # Cliniko serves a flipped byte
        changed = upload_batch(hook, tmp_path / "b", files[1:], patient)
    both = tmp_path / "both.jsonl"
    write_manifest(both, [*read_manifest(manifest), *read_manifest(changed)])

    _, report, error = reconcile(hook, both)  # sizes alike: nothing seen without reading the bytes
    assert not error and report is not None and report["counts"] == {"confirmed": 2}
    before = api_requests(sandbox)
    _, report, error = reconcile(hook, both, verify="content")
    assert report is not None and report["counts"] == {"confirmed": 1, "content_changed": 1}
    assert "content changed: its bytes hash to SHA-256" in error
    content_route = "GET /v1/patient_attachments/{id}/content"
    assert requests_since(sandbox, before) == {"GET /v1/patient_attachments": 1, content_route: 2}


def test_reads_are_coalesced_100_ids_a_request(hook: ClinikoHook, tmp_path: Path, sandbox: Any) -> None:
    base = {
        "run_id": "r",
        "dag_id": "d",
        "task_id": "t",
        "map_index": None,
        "status": None,
        "patient_id": "1",
    }
    lines = [
        AuditRecord(**base, index=n, source=f"/r{n}", attachment_id=str(10**15 + n), size=1)
        for n in range(250)
    ]
    lines.append(AuditRecord(**base, index=250, source="/bad", error="no such file", retryable=False))
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, lines)
    before = api_requests(sandbox)
    _, report, error = reconcile(hook, manifest)
    assert requests_since(sandbox, before) == {
        "GET /v1/user": 1,  # whose rate budget the key draws on, once
        "GET /v1/patient_attachments": 3,  # 100 + 100 + 50
    }
    assert report is not None and report["counts"] == {"missing": 250} and report["skipped"] == 1
    assert error.count("\n") == 1 + 20 and error.endswith(
        "... and 230 more (every one is in the task's XCom)"
    )
    assert "(1 line(s) had no attachment: failed uploads)" in error.splitlines()[0]


# --- comparing one line with one record ---------------------------------------------------------------


def line(**fields: Any) -> AuditRecord:
    base: JsonDict = {
        "run_id": "r",
        "dag_id": "d",
        "task_id": "t",
        "map_index": None,
        "index": 0,
        "status": "processed",
        "patient_id": "7",
        "source": "/a.pdf",
        "filename": "a.pdf",
        "size": 10,
        "attachment_id": "5",
    }
    return AuditRecord(**{**base, **fields})


def cliniko(**fields: Any) -> JsonDict:
    record: JsonDict = {
        "id": 5,
        "archived_at": None,
        "processing_completed": True,
        "size": 10,
        "patient": {"links": {"self": "https://x/v1/patients/7"}},
    }
    return {**record, **fields}


@pytest.mark.parametrize(
    ("record", "status", "words"),
    [
        (cliniko(), "confirmed", "present, not archived, same size"),
        (None, "missing", "deleted"),
        (cliniko(archived_at="2026-12-07T01:00:00Z"), "archived", "archived at 2026-12-07T01:00:00Z"),
        (cliniko(size=11), "size_changed", "Cliniko holds 11 bytes; 10 were sent"),
        (cliniko(patient={"links": {"self": "https://x/v1/patients/8"}}), "patient_changed", "patient 8"),
        (cliniko(processing_completed=False, size=None), "processing", "still being processed"),
    ],
)
def test_each_difference_is_named(record: JsonDict | None, status: str, words: str) -> None:
    finding = compare(line(), record)
    assert (finding.status, finding.attachment_id) == (status, "5") and words in finding.detail
    assert finding.problem is (status not in ("confirmed", "processing"))


def test_the_summary_counts_and_names_what_is_not_confirmed() -> None:
    findings = [
        Finding("1", "7", "a.pdf", "confirmed", "ok"),
        Finding("2", "7", "b.pdf", "processing", "still being processed"),
        Finding("3", "8", "c.pdf", "missing", "gone"),
    ]
    assert reconcile_summary("m.jsonl", findings, 0).splitlines() == [
        "Reconciled 3 attachment(s) of m.jsonl with Cliniko: 1 confirmed, 1 processing, 1 missing",
        "  attachment 2 (patient 7, b.pdf): processing: still being processed",
        "  attachment 3 (patient 8, c.pdf): missing: gone",
    ]


def test_verify_is_checked() -> None:
    with pytest.raises(ValueError, match="verify must be 'size', 'content' or None, got 'bytes'"):
        ClinikoReconcileOperator(task_id="r", manifest="/m.jsonl", verify="bytes")
    templated = ClinikoReconcileOperator(task_id="r", manifest="/m.jsonl", verify="{{ params.verify }}")
    templated.verify = "Content"  # as rendered
    with pytest.raises(ClinikoInputError, match="got 'Content'"):
        templated.execute(fake_context())


def test_the_delete_control_names_an_unknown_or_malformed_id(sandbox: Any) -> None:
    base = f"{sandbox.base_url.removesuffix('/v1')}/_sandbox/attachments"
    missing = requests.post(f"{base}/1/delete", json={}, timeout=10)
    assert (missing.status_code, missing.json()) == (404, {"message": "No attachment 1"})
    assert requests.post(f"{base}/x/delete", json={}, timeout=10).status_code == 400
    cross_site = requests.post(
        f"{base}/1/delete", json={}, headers={"Origin": "https://evil.example"}, timeout=10
    )
    assert cross_site.status_code == 403


def test_the_example_dag_reconciles_the_newest_night_or_the_manifest_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from dags_examples import cliniko_reconcile_manifest as example

    monkeypatch.setattr(example, "NIGHTLY_MANIFESTS", str(tmp_path))
    dag = example.cliniko_reconcile_manifest()
    choose = dag.get_task("choose_manifest").python_callable  # type: ignore[attr-defined]
    assert set(dag.task_dict) == {"choose_manifest", "reconcile"}
    with pytest.raises(FileNotFoundError, match="run the nightly export first"):
        choose(params={"manifest": ""})
    for n, name in enumerate(["b.jsonl", "a.jsonl", ".c.jsonl.x.tmp"]):
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (1000 + n, 1000 + n))
    assert choose(params={"manifest": ""}).endswith("/a.jsonl")  # the newest manifest, not a temporary file
    assert choose(params={"manifest": "s3://audit/x.jsonl"}) == "s3://audit/x.jsonl"


def test_a_finding_names_the_attachment_patient_and_file_and_says_exactly_what_was_found() -> None:
    details = {
        None: ("missing", "not in Cliniko any more (deleted)"),
        "confirmed": ("confirmed", "present, not archived, same size"),
        "processing": ("processing", "still being processed by Cliniko: its size is not known yet"),
    }
    records = {None: None, "confirmed": cliniko(), "processing": cliniko(processing_completed=False)}
    for key, record in records.items():
        assert compare(line(), record) == Finding("5", "7", "a.pdf", *details[key])
    assert compare(line(), cliniko(patient=None)).status == "confirmed"  # no patient link: not compared
    assert compare(line(patient_id=None), cliniko()).status == "confirmed"
    assert compare(line(size=None), cliniko(size=99)).status == "confirmed"  # nothing sent to compare


def test_content_compared_says_same_changed_or_nothing_to_compare() -> None:
    found = Finding("5", "7", "a.pdf", "confirmed", "present")
    sha = "a" * 64
    assert content_changed(found, line(sha256=sha), sha) == Finding(
        "5", "7", "a.pdf", "confirmed", "present, same content"
    )
    assert content_changed(found, line(sha256=None), "b" * 64) == Finding(
        "5", "7", "a.pdf", "confirmed", "present (no SHA-256 to compare)"
    )
    assert content_changed(found, line(sha256=sha), "0123456789abcdef" + "b" * 48) == Finding(
        "5",
        "7",
        "a.pdf",
        "content_changed",
        f"its bytes hash to SHA-256 0123456789abcdef..., {'a' * 16}... was sent",
    )


def test_only_attachments_not_failed_are_checked_each_once() -> None:
    lines = [
        line(attachment_id="1", index=0),
        line(attachment_id=None, index=1),
        line(attachment_id="2", index=2, error="boom"),
        line(attachment_id="1", index=3),
        line(attachment_id="3", index=4),
    ]
    assert [(found.attachment_id, found.index) for found in attached(lines)] == [("1", 0), ("3", 4)]


def test_the_summary_counts_each_status_and_names_at_most_the_limit() -> None:
    findings = [Finding(str(n), "7", f"{n}.pdf", "size_changed", "d") for n in range(3)]
    findings.append(Finding("9", "7", "9.pdf", "confirmed", "ok"))
    text = reconcile_summary("m", findings, 2, limit=2).splitlines()
    assert text[0] == (
        "Reconciled 4 attachment(s) of m with Cliniko: 1 confirmed, 3 size changed "
        "(2 line(s) had no attachment: failed uploads)"
    )
    assert text[1:] == [
        "  attachment 0 (patient 7, 0.pdf): size changed: d",
        "  attachment 1 (patient 7, 1.pdf): size changed: d",
        "  ... and 1 more (every one is in the task's XCom)",
    ]
    assert len(reconcile_summary("m", findings[:2], 0, limit=2).splitlines()) == 3  # exactly the limit
    assert reconcile_summary("m", [], 0) == "Reconciled 0 attachment(s) of m with Cliniko: none"
