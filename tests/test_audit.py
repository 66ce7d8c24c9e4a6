"""The audit manifest: what the operators write for each task, read back; atomic writes; merging a night."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import subprocess
import sys
import textwrap
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cliniko_provider.exceptions import (
    ClinikoBatchError,
    ClinikoBatchFinalError,
    ClinikoDeferralError,
    ClinikoError,
    ClinikoInputError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.nightly import summarize_batches
from cliniko_provider.operators.cliniko import (
    ClinikoAttachmentUploadOperator,
    ClinikoBatchUploadOperator,
    TaskDeferralError,
    TaskDeferralTimeout,
)
from cliniko_provider.triggers.cliniko import success_event
from cliniko_provider.utils.audit import (
    AUDIT_FACTS_KEY,
    AuditRecord,
    as_path,
    manifest_location,
    merge_manifests,
    path_segment,
    read_manifest,
    record_from,
    records_from_results,
    redact_uri,
    serialise,
    task_manifests,
    task_of,
    write_manifest,
)
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import SANDBOX_KEY
from tests.helpers import fake_context, sandbox_control, sandbox_faults

JsonDict = dict[str, Any]


@pytest.fixture
def hook(unpaced_sandbox_hook: ClinikoHook) -> ClinikoHook:
    return unpaced_sandbox_hook


def text_file(directory: Path, name: str, marker: str, repeat: int = 20) -> Path:
    """A small file whose content is easy to look for (it must never show in a manifest)."""
    path = directory / name
    path.write_text(f"CONTENT-{marker}-do-not-leak\n" * repeat)
    return path


def record(**fields: Any) -> AuditRecord:
    base: JsonDict = {
        "run_id": "scheduled__2026-12-07T00:00:00+00:00",
        "dag_id": "nightly",
        "task_id": "upload",
        "map_index": None,
        "index": 0,
        "status": "processed",
        "patient_id": "1",
        "source": "/data/a.pdf",
    }
    return AuditRecord(**{**base, **fields})


# --- a batch of 100 with failures and reuses, against the sandbox --------------------------------------


@pytest.mark.slow  # about 400 requests: 30 to 50 s on a busy machine
def test_a_batch_of_100_writes_a_line_per_file_with_failures_and_reuses(
    hook: ClinikoHook, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    patients = [str(hook.create_patient("Audit", f"{tag}-{n}")["id"]) for n in range(3)]
    files = [text_file(tmp_path, f"report-{n}.txt", f"{tag}-{n}", repeat=1 + n % 7) for n in range(100)]
    uploads: list[JsonDict] = [
        {"patient_id": patients[n % 3], "file_path": str(path), "description": f"Report {n}"}
        for n, path in enumerate(files)
    ]
    uploads[10]["file_path"] = str(tmp_path / "missing.txt")  # no such file
    uploads[20]["patient_id"] = "999999999"  # no such patient
    (tmp_path / "empty.txt").write_bytes(b"")
    uploads[30]["file_path"] = str(tmp_path / "empty.txt")  # empty
    uploads[40]["filename"] = "bad/name.txt"  # a name S3 would cut
    audit = tmp_path / "audit"
    presigned: list[JsonDict] = []
    get_presigned_post = hook.get_presigned_post

    def recording(patient_id: int | str) -> JsonDict:
        answer = get_presigned_post(patient_id)
        presigned.append(answer)
        return answer

    hook.get_presigned_post = recording  # type: ignore[method-assign]

    def run(items: list[JsonDict], try_number: int) -> tuple[Any, list[AuditRecord]]:
        op = ClinikoBatchUploadOperator(
            task_id="upload",
            uploads=items,
            wait_for_completion=True,
            deferrable=False,
            poll_interval=0.2,
            timeout=60,
            max_concurrency=8,
            audit_path=str(audit),
        )
        op.hook = hook
        ctx = fake_context(run_id="scheduled__2026-12-07T00:00:00+00:00", try_number=try_number, map_index=4)
        with contextlib.suppress(ClinikoBatchFinalError):  # four files fail on purpose
            op.execute(ctx)
        where = manifest_location(audit, "nightly", "scheduled__2026-12-07T00:00:00+00:00", "upload", 4)
        return ctx, read_manifest(where)

    run(uploads[:5], try_number=1)  # an earlier try attached the first five
    ctx, lines = run(uploads, try_number=2)
    results = ctx["ti"].pushed["return_value"]
    where = audit / "nightly" / "scheduled__2026-12-07T00:00:00+00:00" / "upload-4.jsonl"
    assert where.is_file() and [p.name for p in where.parent.iterdir()] == ["upload-4.jsonl"]

    assert len(lines) == 100
    records = {str(r["id"]): r for p in patients for r in hook.list_attachments(patient_id=p)}
    assert len(records) == 96  # each good file once: the reused five were not sent again
    for n, line in enumerate(lines):
        assert (line.run_id, line.dag_id, line.task_id, line.map_index, line.index) == (
            "scheduled__2026-12-07T00:00:00+00:00",
            "nightly",
            "upload",
            4,
            n,
        )
        assert line.patient_id == uploads[n]["patient_id"]
        assert line.status == results[n]["status"] == ("error" if n in (10, 20, 30, 40) else "processed")
        assert line.source == uploads[n]["file_path"]
        assert line.recorded_at and line.recorded_at.endswith("+00:00")
        if n in (10, 20, 30, 40):
            assert line.failed and line.attachment_id is None and line.retryable is False
            assert line.error == results[n]["error"]
            continue
        content = files[n].read_bytes()
        attachment = records[str(line.attachment_id)]
        assert line.attachment_id == results[n]["attachment_id"]
        assert line.filename == files[n].name == attachment["filename"]
        assert line.size == len(content) == attachment["size"]
        assert line.sha256 == hashlib.sha256(content).hexdigest()
        assert line.md5 == (None if n < 5 and results[n]["md5"] is None else hashlib.md5(content).hexdigest())
        assert line.verification == results[n]["verification"]
        if n >= 5:  # sent: S3's ETag was checked at least; a reuse sends nothing and may check nothing
            assert (
                line.verification in ("etag", "processed", "content")
                and line.verification_outcome == "passed"
            )
        else:
            assert line.verification_outcome == (None if line.verification == "none" else "passed")
        assert line.created_at == attachment["created_at"] and line.processed_at == attachment["processed_at"]
        assert line.error is None and line.retryable is None
        assert line.reused is (n < 5)
        if n < 5:
            assert line.reused_reason and "recorded attachment" in line.reused_reason
        else:
            assert line.reused_reason is None
    assert "no such file" in str(lines[10].error) and "no such patient" in str(lines[20].error)
    assert lines[10].size is None and lines[20].size == len(files[20].read_bytes())
    assert lines[40].filename is None  # refused before it had a name

    # nothing secret and no file content in it
    raw = where.read_text("utf-8")
    secrets = {SANDBOX_KEY, base64.b64encode(f"{SANDBOX_KEY}:".encode()).decode()}
    for answer in presigned:
        fields = answer.get("fields") or {}
        secrets |= {str(fields[name]) for name in fields if name.lower() in ("policy", "x-amz-signature")}
    assert len(presigned) == 96 and len(secrets) > 2 + len(presigned)
    assert not [secret for secret in secrets if secret in raw]
    assert "do-not-leak" not in raw and "CONTENT-" not in raw
    assert "url" not in json.loads(raw.splitlines()[0])


def test_the_manifest_survives_a_deferral_and_has_the_processed_times(
    hook: ClinikoHook, tmp_path: Path
) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    from tests.test_batch import fire

    patient = str(hook.create_patient("Audit", uuid.uuid4().hex[:8])["id"])
    files = [text_file(tmp_path, f"d{n}.txt", str(n)) for n in range(3)]
    uploads = [{"patient_id": patient, "file_path": f.as_uri()} for f in files]
    op = ClinikoBatchUploadOperator(
        task_id="upload",
        uploads=uploads,
        wait_for_completion=True,
        deferrable=True,
        poll_interval=0.2,
        timeout=60,
        audit_path=(tmp_path / "audit").as_uri(),
    )
    op.hook = hook
    ctx = fake_context()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    assert not (tmp_path / "audit").exists()  # written when the task ends, not before
    event = asyncio.run(asyncio.wait_for(fire(deferred.value.trigger), timeout=60))
    ctx["ti"].pushed = json.loads(json.dumps(ctx["ti"].pushed))  # as XCom keeps them
    resumed = ClinikoBatchUploadOperator(task_id="upload", uploads=uploads, audit_path=op.audit_path)
    resumed.hook = hook
    resumed.execute_complete(ctx, json.loads(json.dumps(event)))
    lines = read_manifest(tmp_path / "audit" / "nightly" / "manual__1" / "upload.jsonl")
    assert [line.map_index for line in lines] == [None] * 3
    assert all(line.processed_at and line.created_at and line.sha256 and line.size for line in lines)
    assert [line.status for line in lines] == ["processed"] * 3
    assert [line.filename for line in lines] == [f.name for f in files]


def test_the_single_file_operator_writes_its_line_on_success_and_on_failure(
    hook: ClinikoHook, tmp_path: Path
) -> None:
    patient = str(hook.create_patient("Audit", uuid.uuid4().hex[:8])["id"])
    path = text_file(tmp_path, "one.txt", "one")
    audit = tmp_path / "audit"
    op = ClinikoAttachmentUploadOperator(
        task_id="one", patient_id=patient, file_path=str(path), audit_path=str(audit)
    )
    op.hook = hook
    made = op.execute(fake_context(map_index=2))
    (line,) = read_manifest(audit / "nightly" / "manual__1" / "upload-2.jsonl")
    assert (line.index, line.map_index, line.attachment_id, line.patient_id) == (
        None,
        2,
        str(made["id"]),
        patient,
    )
    assert line.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and line.size == path.stat().st_size
    assert line.created_at == made["created_at"] and line.processed_at is None and not line.failed
    assert line.status == "waiting"  # attached, not waited for

    bad = ClinikoAttachmentUploadOperator(
        task_id="bad", patient_id="999999999", file_path=str(path), audit_path=str(audit)
    )
    bad.hook = hook
    with pytest.raises(ClinikoInputError):
        bad.execute(fake_context())
    (failed,) = read_manifest(audit / "nightly" / "manual__1" / "upload.jsonl")
    assert failed.failed and "no such patient" in str(failed.error) and failed.retryable is False
    assert failed.status == "error"
    assert failed.attachment_id is None and failed.size == path.stat().st_size


# --- a manifest whatever ends the task: no files, bad input, Airflow's deferral timeout ----------------


def test_an_empty_batch_writes_an_empty_manifest(tmp_path: Path) -> None:
    op = ClinikoBatchUploadOperator(task_id="upload", uploads=[], audit_path=str(tmp_path))
    assert op.execute(fake_context(map_index=4)) == []
    where = manifest_location(tmp_path, "nightly", "manual__1", "upload", 4)
    assert where.read_bytes() == b"" and read_manifest(where) == []  # the night's record shows it ran
    assert merge_manifests(tmp_path, "nightly", "manual__1")[1] == []


@pytest.mark.parametrize("uploads", ["a.pdf", {"patient_id": "1", "file_path": "/a"}, 7, None])
def test_uploads_that_are_not_a_list_fail_with_a_manifest_line_saying_why(
    uploads: Any, tmp_path: Path
) -> None:
    ctx = fake_context(map_index=3)
    op = ClinikoBatchUploadOperator(task_id="upload", uploads=uploads, audit_path=str(tmp_path))
    with pytest.raises(ClinikoInputError, match="uploads must be a list of dicts"):
        op.execute(ctx)
    (line,) = read_manifest(manifest_location(tmp_path, "nightly", "manual__1", "upload", 3))
    assert (line.status, line.index, line.map_index, line.patient_id, line.source) == (
        "error",
        None,
        3,
        None,
        None,
    )
    assert str(line.error).startswith("uploads must be a list of dicts, got ") and line.retryable is False
    assert line.error == ctx["ti"].pushed["cliniko_error"]


def test_a_manifest_that_cannot_be_written_leaves_the_tasks_own_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory")
    op = ClinikoBatchUploadOperator(task_id="upload", uploads="a.pdf", audit_path=str(tmp_path / "file"))
    with pytest.raises(ClinikoInputError, match="uploads must be a list"):
        op.execute(fake_context())
    assert "The audit manifest could not be written: [Errno 20] Not a directory" in capsys.readouterr().out


def deferred_batch(pushed_results: bool = True) -> Any:
    """The XCom a batch left before deferring: one processed at once, one waiting, one failed."""
    ctx = fake_context()
    results: list[JsonDict] = [
        {"index": 0, "patient_id": "1", "file_path": "/a", "attachment_id": "10", "status": "processed",
         "processed_at": "2026-01-01T00:00:00Z", "size": 3, "filename": "a", "verification": "processed"},
        {"index": 1, "patient_id": "1", "file_path": "/b", "attachment_id": "11", "status": "waiting",
         "size": 4, "filename": "b", "sha256": "ab" * 32, "verification": "etag"},
        {"index": 2, "patient_id": "1", "file_path": "/c", "attachment_id": None, "status": "error",
         "error": "no such file", "retryable": False},
    ]  # fmt: skip
    if pushed_results:
        ctx["ti"].xcom_push("return_value", results)
    ctx["ti"].xcom_push(AUDIT_FACTS_KEY, {"1": {"created_at": "2026-01-01T00:00:01Z"}})
    return ctx


@pytest.mark.parametrize(
    ("next_kwargs", "words"),
    [
        (
            {"error": "Trigger timeout"},
            "Airflow's deferral timeout (70 s: timeout=5 plus poll_interval plus 60 s)",
        ),
        ({"error": "Trigger failure", "traceback": ["boom"]}, "failed in the triggerer (Trigger failure;"),
    ],
)
def test_when_airflow_ends_the_wait_each_waiting_file_fails_in_xcom_and_the_manifest(
    tmp_path: Path, next_kwargs: JsonDict, words: str
) -> None:
    ctx = deferred_batch()
    op = ClinikoBatchUploadOperator(
        task_id="upload", uploads=[], timeout=5, poll_interval=5, audit_path=str(tmp_path)
    )
    # What Airflow's task runner calls when the scheduler ended the deferral (next_method "__fail__").
    with pytest.raises(ClinikoBatchError, match=r"2 of 3 upload\(s\) failed") as raised:
        op.resume_execution("__fail__", next_kwargs, ctx)
    assert not isinstance(raised.value, ClinikoBatchFinalError)  # a retry finds the attachment, waits anew
    assert isinstance(raised.value.__cause__, (TaskDeferralTimeout, TaskDeferralError))
    results = ctx["ti"].pushed["return_value"]
    assert [r["status"] for r in results] == ["processed", "error", "error"]
    assert words in results[1]["error"] and results[1]["retryable"] is True
    assert results[1]["attachment_id"] == "11" and results[2]["error"] == "no such file"
    assert words in ctx["ti"].pushed["cliniko_error"]
    lines = read_manifest(manifest_location(tmp_path, "nightly", "manual__1", "upload", None))
    assert [line.status for line in lines] == ["processed", "error", "error"]
    assert words in str(lines[1].error) and lines[1].attachment_id == "11"
    assert (lines[1].created_at, lines[1].sha256) == ("2026-01-01T00:00:01Z", "ab" * 32)
    batch = [{"reference": f"R{n}", "patient_id": "1", "file_path": f"/{c}"} for n, c in enumerate("abc")]
    uploaded, failed = summarize_batches([batch], [results])
    assert [u["reference"] for u in uploaded] == ["R0"] and [f["reference"] for f in failed] == ["R1", "R2"]


def test_a_deferral_timeout_with_the_results_gone_still_writes_the_manifest(tmp_path: Path) -> None:
    ctx = deferred_batch(pushed_results=False)
    op = ClinikoBatchUploadOperator(task_id="upload", uploads=[], audit_path=str(tmp_path))
    with pytest.raises(ClinikoError, match="results are missing from XCom"):
        op.resume_execution("__fail__", {"error": "Trigger timeout"}, ctx)
    (line,) = read_manifest(manifest_location(tmp_path, "nightly", "manual__1", "upload", None))
    assert line.status == "error" and "deferral timeout (3690 s: timeout=3600" in str(line.error)
    assert "deferral timeout" in ctx["ti"].pushed["cliniko_error"]


def test_a_resume_with_the_triggers_event_still_completes(tmp_path: Path) -> None:
    ctx = deferred_batch()
    op = ClinikoBatchUploadOperator(task_id="upload", uploads=[], audit_path=str(tmp_path))
    event = {"status": "done", "attachments": {"11": success_event("11", {"id": "11", "processed_at": "t"})}}
    with pytest.raises(ClinikoBatchFinalError, match=r"1 of 3"):  # only the file that had failed
        op.resume_execution("execute_complete", {"event": event}, ctx)
    assert [r["status"] for r in ctx["ti"].pushed["return_value"]] == ["processed", "processed", "error"]


def test_when_airflow_ends_a_single_uploads_wait_its_line_says_why(tmp_path: Path) -> None:
    ctx = fake_context(map_index=0)
    facts = {
        "patient_id": "1",
        "file_path": "/a.pdf",
        "attachment_id": "42",
        "size": 9,
        "verification": "etag",
    }
    ctx["ti"].xcom_push(AUDIT_FACTS_KEY, facts)
    op = ClinikoAttachmentUploadOperator(
        task_id="one", patient_id="1", file_path="/a.pdf", wait_for_completion=True, deferrable=True,
        timeout=100, poll_interval=10, audit_path=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(ClinikoDeferralError, match=r"deferral timeout \(170 s: timeout=100 .*raise the"):
        op.resume_execution("__fail__", {"error": "Trigger timeout"}, ctx)
    assert "deferral timeout" in ctx["ti"].pushed["cliniko_error"]
    (line,) = read_manifest(manifest_location(tmp_path, "nightly", "manual__1", "upload", 0))
    assert (line.status, line.attachment_id, line.retryable) == ("error", "42", True)
    assert "deferral timeout (170 s" in str(line.error) and line.processed_at is None


def test_airflows_deferral_timeout_through_the_operator_against_the_sandbox(
    hook: ClinikoHook, tmp_path: Path, sandbox: Any
) -> None:
    """Processing held in the sandbox: the batch defers; Airflow's deferral timeout ends the wait."""
    from airflow.providers.common.compat.sdk import TaskDeferred

    patient = str(hook.create_patient("Audit", uuid.uuid4().hex[:8])["id"])
    files = [text_file(tmp_path, f"held{n}.txt", str(n)) for n in range(2)]
    uploads = [{"patient_id": patient, "file_path": str(f)} for f in files]
    kwargs: JsonDict = dict(
        task_id="upload", uploads=uploads, wait_for_completion=True, deferrable=True, poll_interval=0.5,
        timeout=2, audit_path=str(tmp_path / "audit"), verify="{{ params.verify }}",
    )  # fmt: skip
    ctx = fake_context()
    with sandbox_faults(sandbox, processing_delay=3600):  # never processed while the task waits
        try:
            op = ClinikoBatchUploadOperator(**kwargs)
            op.hook, op.verify = hook, "content"  # as rendered from the param
            with pytest.raises(TaskDeferred) as deferred:
                op.execute(ctx)
            assert deferred.value.timeout == timedelta(seconds=62.5)  # after the trigger's deadline
            ctx["ti"].pushed = json.loads(json.dumps(ctx["ti"].pushed))  # as XCom keeps them
            resumed = ClinikoBatchUploadOperator(**kwargs)  # a new worker process resumes the task
            resumed.hook, resumed.verify = hook, "content"
            with pytest.raises(ClinikoBatchError, match=r"2 of 2 upload\(s\) failed") as raised:
                resumed.resume_execution("__fail__", {"error": "Trigger timeout"}, ctx)
        finally:
            sandbox_control(sandbox, "processing/finish", after=0)
    assert not isinstance(raised.value, ClinikoBatchFinalError)
    results = ctx["ti"].pushed["return_value"]
    assert [r["status"] for r in results] == ["error", "error"]
    assert all("deferral timeout (62.5 s: timeout=2" in r["error"] for r in results)
    lines = read_manifest(tmp_path / "audit" / "nightly" / "manual__1" / "upload.jsonl")
    assert [line.status for line in lines] == ["error", "error"]
    assert [line.attachment_id for line in lines] == [r["attachment_id"] for r in results]
    assert all(line.sha256 and line.created_at and line.processed_at is None for line in lines)
    assert len(list(hook.list_attachments(patient_id=patient))) == 2  # nothing made twice


# --- writing, reading, merging ------------------------------------------------------------------------


def test_records_round_trip_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    one = record(sha256="ab" * 32, size=10, reused=True, reused_reason="found", attachment_id="5")
    where = write_manifest(tmp_path / "m.jsonl", [one, record(index=1, error="boom", retryable=True)])
    assert read_manifest(where) == [one, record(index=1, error="boom", retryable=True)]
    newer = json.dumps({**json.loads(one.to_json()), "added_later": 1})
    assert AuditRecord.from_json(newer) == one


@pytest.mark.parametrize(
    ("line", "words"),
    [("{not json", "line 2"), ("[1]", "expected a JSON object"), ('{"run_id": 1}', "run_id is missing")],
)
def test_a_malformed_manifest_line_is_named(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(record().to_json() + "\n" + line + "\n")
    with pytest.raises(ClinikoInputError, match=words):
        read_manifest(path)


def test_a_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClinikoInputError, match="No audit manifest at"):
        read_manifest(tmp_path / "none.jsonl")


def test_an_interrupted_write_leaves_the_old_manifest_whole_or_none(tmp_path: Path) -> None:
    target = tmp_path / "audit" / "upload.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal
        from cliniko_provider.utils import audit
        def killed(*args):
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies between the write and the rename
        os.replace = killed
        audit.write_manifest({str(target)!r}, [audit.AuditRecord(
            run_id="r", dag_id="d", task_id="t", map_index=None, index=n, status="waiting", patient_id="1",
            source="/a")
            for n in range(1000)])
        """
    )
    write_manifest(target, [record()])
    died = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert died.returncode == -9
    assert read_manifest(target) == [record()]  # the old manifest, whole: the new one's lines are not in it
    leftover = [path for path in target.parent.iterdir() if path != target]
    assert [path.name[:14] for path in leftover] == [".upload.jsonl."] and leftover[0].suffix == ".tmp"
    assert len(leftover[0].read_text().splitlines()) == 1000  # what was interrupted, hidden and unread
    assert task_manifests(target.parent) == [target]  # a merge leaves the temporary file out


def test_a_failed_write_removes_its_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_manifest(tmp_path / "m.jsonl", [record()])
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_never_made_is_not_what_the_write_fails_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cliniko_provider.utils import audit

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(audit, "open", refused, raising=False)  # the module's open, not the builtin
    with pytest.raises(PermissionError, match="Permission denied"):
        write_manifest(tmp_path / "m.jsonl", [record()])
    assert list(tmp_path.iterdir()) == []


def test_object_storage_gets_the_manifest_in_one_write(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    attach("memory", fs=MemoryFileSystem())  # Airflow 3.1 registers no memory:// filesystem of its own
    base = f"memory://audit-{uuid.uuid4().hex[:8]}"
    where = write_manifest(str(manifest_location(base, "d", "r", "t", None)), [record()])
    assert where.endswith("/d/r/t.jsonl")
    assert read_manifest(ObjectStoragePath(f"{base}/d/r/t.jsonl")) == [record()]


def test_a_nights_task_manifests_merge_into_one(tmp_path: Path) -> None:
    run = "scheduled__2026-12-07T00:00:00+00:00"
    write_manifest(
        manifest_location(tmp_path, "nightly", run, "upload", 1),
        [record(run_id=run, map_index=1, index=n) for n in range(2)],
    )
    write_manifest(
        manifest_location(tmp_path, "nightly", run, "upload", 0),
        [record(run_id=run, map_index=0, index=n) for n in range(3)],
    )
    (tmp_path / "nightly" / run / ".upload-2.jsonl.abc.tmp").write_text("partial")  # an interrupted write
    where, lines = merge_manifests(tmp_path, "nightly", run)
    assert where == str(tmp_path / "nightly" / f"{run}.jsonl")
    assert [(line.map_index, line.index) for line in lines] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert read_manifest(where) == lines


def test_run_and_task_ids_are_safe_path_segments(tmp_path: Path) -> None:
    where = manifest_location(tmp_path, "a/b", "manual__x y/..", "t", -1)
    assert where == tmp_path / "a_b" / "manual__x_y_.." / "t.jsonl"
    assert manifest_location(tmp_path, "d", "..", "t", 0) == tmp_path / "d" / "_" / "t-0.jsonl"


def test_uris_lose_their_credentials() -> None:
    assert redact_uri("s3://key:secret@bucket/a.pdf") == "s3://bucket/a.pdf"
    assert redact_uri("/data/a@b.pdf") == "/data/a@b.pdf"
    assert redact_uri("s3://bucket/a@b.pdf") == "s3://bucket/a@b.pdf"


# --- each function of the manifest at its edges (fast: make mutation runs these) ------------------------

BASE = {"run_id": "r1", "dag_id": "d1", "task_id": "t1", "map_index": 2}


def test_a_line_carries_every_fact_under_its_own_name() -> None:
    facts = {
        "status": "processed", "patient_id": 7, "file_path": "s3://k:s@b/a.pdf", "filename": "a.pdf",
        "size": 12, "sha256": "s" * 64, "md5": "m" * 32, "attachment_id": 9, "created_at": "c",
        "processed_at": "p", "reused": "found by its journal entry", "verification": "content",
        "verification_outcome": "passed",
    }  # fmt: skip
    line = record_from(BASE, facts, index=3, recorded_at="now")
    assert line == AuditRecord(
        run_id="r1", dag_id="d1", task_id="t1", map_index=2, index=3, status="processed", patient_id="7",
        source="s3://b/a.pdf", filename="a.pdf", size=12, sha256="s" * 64, md5="m" * 32, attachment_id="9",
        created_at="c", processed_at="p", reused=True, reused_reason="found by its journal entry",
        verification="content", verification_outcome="passed", error=None, retryable=None, recorded_at="now",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({}, {"status": "waiting", "source": None, "size": None, "reused": False, "verification": None}),
        ({"processed_at": "p"}, {"status": "processed", "processed_at": "p"}),
        ({"error": "boom", "retryable": True, "status": "processed"}, {"status": "error", "retryable": True}),
        ({"status": "processed", "processed_at": None}, {"status": "processed"}),  # the result's own word
        ({"status": "waiting", "processed_at": "p"}, {"status": "waiting"}),
        ({"retryable": True}, {"retryable": None, "error": None}),  # no error, nothing to retry
        ({"size": True}, {"size": None}),
        ({"size": "12"}, {"size": None}),
        ({"size": 0}, {"size": 0}),
        ({"reused": True, "reused_reason": "why"}, {"reused": True, "reused_reason": "why"}),
        ({"verification": "none"}, {"verification": "none", "verification_outcome": None}),
        ({"verification": "etag"}, {"verification": "etag", "verification_outcome": "passed"}),
        ({"verification": "content", "verification_outcome": "failed"}, {"verification_outcome": "failed"}),
        ({"verification_outcome": "failed"}, {"verification": None, "verification_outcome": "failed"}),
    ],
)
def test_a_lines_defaults_and_edges(facts: JsonDict, expected: JsonDict) -> None:
    line = record_from({**BASE, "map_index": None}, facts, index=None)
    assert {name: getattr(line, name) for name in expected} == expected
    assert (line.map_index, line.index) == (None, None)
    assert line.recorded_at and line.recorded_at.endswith("+00:00")  # written now, in UTC


def test_a_batchs_lines_take_each_items_facts_by_index_and_one_time() -> None:
    results = [{"index": 0, "status": "waiting"}, {"index": 1, "status": "error", "error": "boom"}]
    lines = list(records_from_results(BASE, results, {"1": {"size": 5}, "0": {"size": 4}}))
    assert [(line.index, line.size, line.status) for line in lines] == [(0, 4, "waiting"), (1, 5, "error")]
    assert lines[0].recorded_at == lines[1].recorded_at and lines[0].recorded_at is not None


def test_json_lines_are_compact_utf8_and_keep_non_ascii_text() -> None:
    line = record(filename="résumé 報告.pdf")
    text = line.to_json()
    assert '"filename":"résumé 報告.pdf"' in text and ", " not in text and ": " not in text
    data = serialise([line, line])
    assert data == f"{text}\n{text}\n".encode() and data.decode("utf-8").count("\n") == 2


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/audit", Path("/data/audit")),
        ("~/audit", Path.home() / "audit"),
        ("file:///data/audit", Path("/data/audit")),
        ("local:///data/audit", Path("/data/audit")),
        ("file:///data/with%20space", Path("/data/with%20space")),
        ("file:///data/a://b", Path("/data/a://b")),  # the scheme is what comes before the first ://
    ],
)
def test_local_audit_paths_are_paths(location: str, expected: Path) -> None:
    assert as_path(location) == expected


def test_other_audit_paths_are_object_storage_and_bad_ones_are_named() -> None:
    from airflow.sdk import ObjectStoragePath

    memory = as_path("memory://bucket/audit")
    assert isinstance(memory, ObjectStoragePath) and memory.protocol == "memory"
    assert as_path(ObjectStoragePath("file:///data/x")) == Path("/data/x")
    assert as_path(ObjectStoragePath("local:///data/x")) == Path("/data/x")
    assert as_path(memory) is memory
    with pytest.raises(
        ClinikoInputError, match=r"^audit_path is empty: give a local directory or a URI such as s3://"
    ):
        as_path("  ")
    if AIRFLOW_V_3_3_PLUS:  # Airflow 3.1's ObjectStoragePath finds an unknown scheme only when used
        with pytest.raises(
            ClinikoInputError,
            match=r"^audit_path 'nosuchfs://b/a' cannot be used: .*Install the Airflow provider for that "
            r"storage \(e\.g\. apache-airflow-providers-amazon for s3://\) or use a local directory\.$",
        ):
            as_path("nosuchfs://b/a")


def test_a_manifest_on_object_storage_with_a_local_protocol_is_written_atomically_as_a_file(
    tmp_path: Path,
) -> None:
    from airflow.sdk import ObjectStoragePath

    target = ObjectStoragePath(f"local://{tmp_path}/deep/er/m.jsonl")
    where = write_manifest(target, [record()])
    assert where == str(tmp_path / "deep" / "er" / "m.jsonl") and read_manifest(where) == [record()]
    assert write_manifest(str(tmp_path / "m2.jsonl"), []) == str(tmp_path / "m2.jsonl")
    write_manifest(tmp_path / "m3.jsonl", [record()])
    write_manifest(tmp_path / "m3.jsonl", [record(index=5)])  # over an existing one
    assert [line.index for line in read_manifest(tmp_path / "m3.jsonl")] == [5]
    file_uri = ObjectStoragePath(f"file://{tmp_path}/f/m.jsonl")
    assert write_manifest(file_uri, []) == str(tmp_path / "f" / "m.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "f", "m2.jsonl", "m3.jsonl"]  # no temp left


def test_task_manifests_are_the_runs_jsonl_files_sorted_without_temporary_ones(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a-1.jsonl", ".a.jsonl.123.tmp", ".hidden.jsonl", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in task_manifests(str(tmp_path))] == ["a-1.jsonl", "b.jsonl"]
    assert task_manifests(tmp_path / "missing") == []


def test_a_night_merges_in_task_map_index_and_item_order(tmp_path: Path) -> None:
    run = ("d", "r")
    write_manifest(manifest_location(tmp_path, *run, "up", 1), [record(task_id="up", map_index=1, index=0)])
    write_manifest(
        manifest_location(tmp_path, *run, "up", 0),
        [record(task_id="up", map_index=0, index=1), record(task_id="up", map_index=0, index=None)],
    )
    write_manifest(manifest_location(tmp_path, *run, "one", None), [record(task_id="one", index=None)])
    write_manifest(manifest_location(tmp_path, *run, "up", None), [record(task_id="up", map_index=None)])
    where, lines = merge_manifests(tmp_path, *run)
    assert [(line.task_id, line.map_index, line.index) for line in lines] == [
        ("one", None, None), ("up", None, 0), ("up", 0, None), ("up", 0, 1), ("up", 1, 0),
    ]  # fmt: skip
    assert where == str(tmp_path / "d" / "r.jsonl") and read_manifest(where) == lines


def test_a_manifests_blank_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(f"\n{record().to_json()}\n   \n{record(index=1).to_json()}\n")
    assert [line.index for line in read_manifest(str(tmp_path / "m.jsonl"))] == [0, 1]


def test_the_task_of_a_context_names_its_map_index_only_when_mapped() -> None:
    assert task_of(fake_context(map_index=0))["map_index"] == 0
    assert task_of(fake_context(map_index=-1)) == {
        "dag_id": "nightly", "run_id": "manual__1", "task_id": "upload", "map_index": None,
    }  # fmt: skip
    ti = fake_context()["ti"]
    del ti.map_index
    assert task_of({"ti": ti})["map_index"] is None
    ti.map_index = "0"
    assert task_of({"ti": ti})["map_index"] is None


def test_path_segments_edges() -> None:
    assert [path_segment(text) for text in ("", ".", "..", "...", "a.b", "a:b+c=d-e_f")] == [
        "_", "_", "_", "...", "a.b", "a:b+c=d-e_f",
    ]  # fmt: skip


def test_uris_lose_only_their_credentials() -> None:
    assert redact_uri("s3://user:p@ss@bucket/a.pdf") == "s3://bucket/a.pdf"  # the last @ ends them
    assert redact_uri("s3://a@bucket@x/a@b.pdf") == "s3://x/a@b.pdf"


def test_a_manifest_line_that_is_not_an_object_is_named_with_its_type(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("[1]\n")
    with pytest.raises(ClinikoInputError, match="expected a JSON object, got list"):
        read_manifest(tmp_path / "m.jsonl")
