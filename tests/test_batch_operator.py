"""ClinikoBatchUploadOperator against the fake Cliniko + S3 of tests/test_operator.py: each file's result,
the task's outcome, waiting (in the worker or deferred), retries and the content check, request by request.
The same behaviours against the sandbox process are in tests/test_batch.py."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from airflow.providers.common.compat.sdk import TaskDeferred

from cliniko_provider.exceptions import (
    ClinikoBatchError,
    ClinikoBatchFinalError,
    ClinikoError,
    ClinikoInputError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator
from cliniko_provider.triggers.cliniko import ProcessingCompletedBatchTrigger, success_event
from tests.fake_http import Answer, FakeClock
from tests.helpers import cliniko_connection, fake_context, write_file
from tests.test_operator import KEY, PATIENT, FakeCliniko

JsonDict = dict[str, Any]
PROCESSED_AT = "2026-01-01T00:01:00Z"


class BatchFake(FakeCliniko):
    """The fake, plus the account-wide listing by ids that waiting for many attachments asks."""

    def route(self, request: requests.PreparedRequest) -> Answer:
        url = urlsplit(str(request.url))
        if url.path == "/v1/patient_attachments" and request.method == "GET":
            filters = parse_qs(url.query)["q[]"]
            assert filters[1:] == ["archived_at:*"], filters
            ids = filters[0].removeprefix("id:=").split(",")
            found = [record for record in self.records.values() if record["id"] in ids]
            for record in found:
                record["views"] = record.get("views", 0) + 1
                if self.list_views_until_processed is not None and record["views"] > 1:
                    self.process(record)
            shown = [{k: v for k, v in record.items() if k != "views"} for record in found]
            return Answer(200, {"patient_attachments": shown, "total_entries": len(shown), "links": {}})
        return super().route(request)

    def process(self, record: JsonDict) -> None:
        super().process(record)
        record["processed_at"] = PROCESSED_AT


@pytest.fixture(autouse=True)
def _connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with cliniko_connection(monkeypatch, KEY):
        yield


@pytest.fixture
def fake() -> BatchFake:
    fake = BatchFake()
    fake.list_views_until_processed = 1  # patient listings (look-ups) show records processed
    return fake


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hook(fake: BatchFake, clock: FakeClock) -> ClinikoHook:
    hook = ClinikoHook(sleep=clock.sleep, clock=clock, rand=lambda: 0.5)
    hook.session.mount("https://", fake.adapter)
    hook.s3_session.mount("https://", fake.adapter)
    return hook


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return [write_file(tmp_path, f"{name}.pdf", size, seed=size) for name, size in (("a", 100), ("b", 200))]


def batch(hook: ClinikoHook, uploads: Any, **kwargs: Any) -> ClinikoBatchUploadOperator:
    op = ClinikoBatchUploadOperator(task_id="upload", uploads=uploads, max_concurrency=1, **kwargs)
    op.hook = hook
    return op


def uploads_of(files: list[Path], **extra: Any) -> list[JsonDict]:
    return [{"patient_id": PATIENT, "file_path": str(path), **extra} for path in files]


def result(index: int, path: Path, attachment_id: str | None, **changes: Any) -> JsonDict:
    """An uploaded file's result as the operator gives it ("waiting": not known processed)."""
    data = path.read_bytes()
    return {
        "index": index,
        "patient_id": PATIENT,
        "file_path": str(path),
        "attachment_id": attachment_id,
        "status": "waiting",
        "filename": path.name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
        "verification": "none",  # the fake S3 answers an ETag that is no MD5
        **changes,
    }


def test_each_file_is_uploaded_and_its_result_says_it_is_waiting(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = fake_context()
    results = batch(hook, uploads_of(files)).execute(ctx)
    assert results == [result(0, files[0], "1000"), result(1, files[1], "1001")]
    assert ctx["ti"].pushed == {}  # the return value is Airflow's to push
    assert fake.paths().count("POST /v1/patient_attachments") == 2
    assert "GET /v1/patients/42/patient_attachments" not in fake.paths()  # a first try looks for nothing
    out = capsys.readouterr().out
    assert "Uploading 2 file(s), 1 at a time [" in out
    assert f"Upload #1: {files[1]} to patient 42: attachment 1001 [" in out
    assert "Cliniko batch: 0 of 2 file(s) processed, 2 waiting for Cliniko's processing, 0 failed" in out


def test_waiting_in_the_worker_marks_each_file_processed(
    hook: ClinikoHook,
    fake: BatchFake,
    files: list[Path],
    clock: FakeClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    op = batch(hook, uploads_of(files), wait_for_completion=True, poll_interval=7, timeout=100)
    results = op.execute(fake_context())
    processed = {"status": "processed", "processed_at": PROCESSED_AT, "verification": "processed"}
    assert results == [result(0, files[0], "1000", **processed), result(1, files[1], "1001", **processed)]
    assert clock.sleeps == [7]  # the first round saw them processing, the second processed
    assert op.cliniko_attachment_ids == ["1000", "1001"]
    out = capsys.readouterr().out
    assert "Waiting for Cliniko to process 2 attachment(s) [" in out
    assert f"Upload #0: {files[0]} processed for patient 42 (attachment 1000)" in out
    assert "Cliniko batch: 2 of 2 file(s) processed, 0 waiting for Cliniko's processing, 0 failed" in out


def test_a_wait_that_times_out_fails_that_file_without_retries(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], clock: FakeClock
) -> None:
    fake.list_views_until_processed = None
    ctx = fake_context()
    with pytest.raises(ClinikoBatchFinalError) as raised:
        batch(hook, uploads_of(files[:1]), wait_for_completion=True, poll_interval=10, timeout=25).execute(
            ctx
        )
    assert sum(clock.sleeps) == 25
    (failed,) = ctx["ti"].pushed["return_value"]
    assert (failed["status"], failed["retryable"], failed["attachment_id"]) == ("error", False, "1000")
    assert str(raised.value).startswith(f"1 of 1 upload(s) failed:\n  #0 patient 42 {files[0]}: ")


def test_deferring_leaves_the_results_in_xcom_and_one_trigger_for_the_batch(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = fake_context()
    op = batch(
        hook, uploads_of(files), wait_for_completion=True, deferrable=True, poll_interval=5, timeout=60
    )
    started = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    trigger = deferred.value.trigger
    assert isinstance(trigger, ProcessingCompletedBatchTrigger)
    _, kwargs = trigger.serialize()
    assert kwargs["attachment_ids"] == ["1000", "1001"] and kwargs["poll_interval"] == 5.0
    assert kwargs["cliniko_conn_id"] == "cliniko_default"
    assert started + 60 <= kwargs["deadline"] <= time.time() + 60
    assert kwargs["expect"] == {
        "1000": {"size": 100, "filename": "a.pdf"},
        "1001": {"size": 200, "filename": "b.pdf"},
    }
    assert deferred.value.method_name == "execute_complete"
    assert "Deferring until Cliniko has processed 2 attachment(s) [" in capsys.readouterr().out
    assert deferred.value.timeout is not None and deferred.value.timeout.total_seconds() == 60 + 5 + 60
    waiting = [result(0, files[0], "1000"), result(1, files[1], "1001")]
    assert ctx["ti"].pushed == {"return_value": waiting}
    event = {
        "status": "done",
        "attachments": {
            "1000": success_event("1000", {"id": "1000", "processed_at": PROCESSED_AT}),
            "1001": success_event("1001", {"id": "1001", "processed_at": PROCESSED_AT}),
        },
    }
    done = batch(hook, uploads_of(files)).execute_complete(ctx, json.loads(json.dumps(event)))
    processed = {"status": "processed", "processed_at": PROCESSED_AT, "verification": "processed"}
    assert done == [result(0, files[0], "1000", **processed), result(1, files[1], "1001", **processed)]


def test_without_the_wait_deferrable_changes_nothing(
    hook: ClinikoHook, fake: BatchFake, files: list[Path]
) -> None:
    results = batch(hook, uploads_of(files), deferrable=True).execute(fake_context())
    assert [r["status"] for r in results] == ["waiting", "waiting"]


def test_bad_items_fail_alone_and_the_task_fails_without_retries_naming_each(
    hook: ClinikoHook, fake: BatchFake, files: list[Path]
) -> None:
    uploads: list[Any] = [
        *uploads_of(files[:1]),
        {"patient_id": PATIENT, "file_path": str(files[0])},  # the same file again
        {"patient_id": PATIENT, "file_path": "/no/such/file.pdf"},
        "not a dict",
        {"patient_id": PATIENT, "file_path": str(files[1]), "filename": "b2.pdf"},
    ]
    ctx = fake_context()
    with pytest.raises(ClinikoBatchFinalError) as raised:
        batch(hook, uploads).execute(ctx)
    results = ctx["ti"].pushed["return_value"]
    assert [r["status"] for r in results] == ["waiting", "error", "error", "error", "waiting"]
    assert results[1] == {
        "index": 1,
        "patient_id": PATIENT,
        "file_path": str(files[0]),
        "attachment_id": None,
        "status": "error",
        "error": "uploads[1] repeats uploads[0] (same patient, file, filename and idempotency key): give "
        "each file once.",
        "retryable": False,
    }
    assert results[3]["patient_id"] is None and results[3]["file_path"] is None
    assert results[4]["filename"] == "b2.pdf" and [n for n, _, _ in fake.uploads] == ["a.pdf", "b2.pdf"]
    message = str(raised.value)
    assert message.splitlines()[0] == "3 of 5 upload(s) failed:"
    assert "  #2 patient 42 /no/such/file.pdf: " in message and "no such file" in message
    assert ctx["ti"].pushed["cliniko_error"] == message  # all three fit in the summary


def test_a_failure_a_retry_may_fix_makes_the_task_retryable(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.create_script = ["500"] * 5
    ctx = fake_context()
    with pytest.raises(ClinikoBatchError) as raised:
        batch(hook, uploads_of(files)).execute(ctx)
    assert not isinstance(raised.value, ClinikoBatchFinalError)
    results = ctx["ti"].pushed["return_value"]
    assert [r["status"] for r in results] == ["error", "waiting"]
    assert results[0]["retryable"] is True and "500" in results[0]["error"]
    assert f"Upload #0: {files[0]} to patient 42 failed: " in capsys.readouterr().out


def test_more_failures_than_the_summary_names_are_all_in_xcom(hook: ClinikoHook, fake: BatchFake) -> None:
    uploads = [{"patient_id": PATIENT, "file_path": f"/no/such/{n}.pdf"} for n in range(7)]
    ctx = fake_context()
    with pytest.raises(ClinikoBatchFinalError) as raised:
        batch(hook, uploads).execute(ctx)
    assert len(str(raised.value).splitlines()) == 1 + 5 + 1  # five named, then "... and 2 more"
    assert len(ctx["ti"].pushed["cliniko_error"].splitlines()) == 1 + 7
    assert fake.paths() == ["GET /v1/user"]  # the key's user, learned before the threads: nothing sent


def test_a_retry_finds_each_files_earlier_upload_and_says_why(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    batch(hook, uploads_of(files)).execute(fake_context())
    before = len(fake.requests)
    again = batch(hook, uploads_of(files)).execute(fake_context(try_number=2))
    assert [r["attachment_id"] for r in again] == ["1000", "1001"] and len(fake.uploads) == 2
    assert [r["reused"] for r in again] == [
        "this worker recorded attachment 1000 as this upload",
        "this worker recorded attachment 1001 as this upload",
    ]
    assert again[0]["md5"] is None and again[0]["sha256"] == result(0, files[0], "1000")["sha256"]
    assert fake.paths()[before:] == ["GET /v1/patient_attachments/1000", "GET /v1/patient_attachments/1001"]
    assert (
        f"Upload #0: {files[0]} to patient 42: attachment 1000 (an earlier upload: this worker recorded "
        "attachment 1000 as this upload) [" in capsys.readouterr().out
    )


def test_always_looks_on_a_first_try_and_a_processed_match_is_confirmed_at_once(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch(hook, uploads_of(files[:1], description="D")).execute(fake_context())
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "other-worker"))
    fake.list_views_until_processed = 0  # processed by now
    again = batch(hook, uploads_of(files[:1], description="D"), look_for_existing="always").execute(
        fake_context()
    )
    assert again[0]["status"] == "processed" and again[0]["processed_at"] == PROCESSED_AT
    assert again[0]["verification"] == "content" and again[0]["reused"].startswith("attachment 1000 (created")
    assert len(fake.uploads) == 1


def test_verify_content_reads_each_processed_file_back(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    op = batch(hook, uploads_of(files), wait_for_completion=True, verify="content", poll_interval=1)
    results = op.execute(fake_context())
    assert [r["verification"] for r in results] == ["content", "content"]
    assert "Verifying the content of 2 processed attachment(s) [" in capsys.readouterr().out
    assert [p for p in fake.paths() if p.endswith("/content")] == [
        "GET /v1/patient_attachments/1000/content",
        "GET /v1/patient_attachments/1001/content",
    ]


def test_verify_content_fails_the_file_whose_bytes_differ(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], tmp_path: Path
) -> None:
    op = batch(
        hook,
        uploads_of(files),
        wait_for_completion=True,
        verify="content",
        poll_interval=1,
        audit_path=str(tmp_path / "audit"),
    )
    original = fake.data_of

    def data_of(record: JsonDict) -> bytes:
        data = original(record)
        return bytes(len(data)) if record["id"] == "1001" else data

    fake.data_of = data_of  # type: ignore[method-assign]
    ctx = fake_context()
    with pytest.raises(ClinikoBatchFinalError, match="#1 patient 42"):
        op.execute(ctx)
    results = ctx["ti"].pushed["return_value"]
    assert [r["status"] for r in results] == ["processed", "error"]
    assert results[0]["verification"] == "content" and results[1]["retryable"] is False
    assert op._facts["1"]["verification_outcome"] == "failed" and "verification_outcome" not in op._facts["0"]


def test_uploads_that_are_not_a_list_are_refused_and_named_in_xcom() -> None:
    ctx = fake_context()
    with pytest.raises(ClinikoInputError) as raised:
        ClinikoBatchUploadOperator(task_id="b", uploads="a.pdf").execute(ctx)
    assert str(raised.value) == (
        "uploads must be a list of dicts, got str: e.g. [{'patient_id': '123', 'file_path': '/data/a.pdf'}]."
    )
    assert ctx["ti"].pushed == {"cliniko_error": str(raised.value)}


# --- one item's checks and results (utils/batch.py) --------------------------------------------------------


@pytest.mark.parametrize(
    ("upload", "message"),
    [
        (
            ["1", "/a"],
            "uploads[2] is a list; each upload is a dict such as "
            "{'patient_id': '123', 'file_path': '/data/a.pdf'}.",
        ),
        (
            {"patient_id": "1", "file_path": "/a", "zeta": 1, "alpha": 2},
            "uploads[2] has unknown key(s) alpha, zeta; an upload takes patient_id, file_path, filename, "
            "description, idempotency_key. Check the spelling or drop the extra keys.",
        ),
        (
            {"patient_id": None, "file_path": ""},
            "uploads[2] has no patient_id or file_path: every upload needs both.",
        ),
        ({"patient_id": "1"}, "uploads[2] has no file_path: every upload needs both."),
        ({"patient_id": "one", "file_path": "/a"}, "patient_id must be a Cliniko numeric id"),
    ],
)
def test_a_malformed_upload_is_refused_with_its_exact_reason(upload: Any, message: str) -> None:
    from cliniko_provider.utils.batch import parse_upload

    with pytest.raises(ClinikoInputError) as raised:
        parse_upload(2, upload)
    assert str(raised.value) == message or str(raised.value).startswith(f"{message} ")


def test_an_items_optional_fields_are_strings_or_none_and_its_identity_leaves_out_the_description() -> None:
    from cliniko_provider.utils.batch import BatchItem, parse_upload

    item = parse_upload(
        4, {"patient_id": 7, "file_path": Path("/a.pdf"), "idempotency_key": 9, "description": 1}
    )
    assert item == BatchItem(4, "7", "/a.pdf", None, "1", "9")
    assert item.identity == ("7", "/a.pdf", None, "9")


def test_an_items_first_result_holds_what_was_given() -> None:
    from cliniko_provider.utils.batch import describe

    assert describe(3, {"patient_id": 12, "file_path": Path("/a")}) == {
        "index": 3,
        "patient_id": "12",
        "file_path": "/a",
        "attachment_id": None,
        "status": "waiting",
    }
    assert describe(0, "x")["patient_id"] is None and describe(0, {"patient_id": 0})["patient_id"] == "0"


def test_a_failed_items_reason_is_one_redacted_line_or_the_errors_type() -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException, AirflowSensorTimeout

    from cliniko_provider.utils.batch import failed, processed

    base = {"index": 0, "status": "waiting"}
    assert failed(base, RuntimeError("key abc\nleaked"), lambda text: text.replace("abc", "***")) == {
        "index": 0,
        "status": "error",
        "error": "key *** leaked",
        "retryable": True,
    }
    assert failed(base, RuntimeError())["error"] == "RuntimeError"
    assert failed(base, AirflowFailException("bad"))["retryable"] is False
    assert failed(base, AirflowSensorTimeout("late"))["retryable"] is False
    assert processed(base, "2026-01-01") == {"index": 0, "status": "processed", "processed_at": "2026-01-01"}


def test_the_summary_says_how_many_more_failures_xcom_names() -> None:
    from cliniko_provider.utils.batch import failure_summary

    results = [{"index": n, "patient_id": "1", "file_path": f"/f{n}", "error": f"bad {n}"} for n in range(3)]
    assert failure_summary(results, limit=2).splitlines()[-1] == (
        "  ... and 1 more (every reason is in XCom 'cliniko_error')"
    )
    assert failure_summary(results, limit=3).splitlines()[-1] == "  #2 patient 1 /f2: bad 2"


def test_an_items_idempotency_key_spans_runs(hook: ClinikoHook, fake: BatchFake, files: list[Path]) -> None:
    for run in ("run-1", "run-2"):
        results = batch(
            hook, uploads_of(files[:1], idempotency_key="a-7"), look_for_existing="always"
        ).execute(fake_context(run))
    assert results[0]["attachment_id"] == "1000" and len(fake.uploads) == 1


def test_a_processed_record_of_another_size_fails_that_file_when_waited_for_in_the_worker(
    hook: ClinikoHook, fake: BatchFake, files: list[Path]
) -> None:
    process = fake.process

    def shrinking(record: JsonDict) -> None:
        process(record)
        if record["id"] == "1001":
            record["size"] = 199

    fake.process = shrinking  # type: ignore[method-assign]
    ctx = fake_context()
    with pytest.raises(ClinikoBatchFinalError):
        batch(hook, uploads_of(files), wait_for_completion=True, poll_interval=1).execute(ctx)
    results = ctx["ti"].pushed["return_value"]
    assert [r["status"] for r in results] == ["processed", "error"]
    assert "199" in results[1]["error"] and "200" in results[1]["error"]


def test_the_manifest_has_each_files_name_size_and_creation_even_when_it_failed(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], tmp_path: Path
) -> None:
    from cliniko_provider.utils.audit import read_manifest

    fake.create_script = ["500"] * 5  # the first file's create keeps failing: nothing in its result
    uploads = [
        *uploads_of(files[:1]),
        {"patient_id": PATIENT, "file_path": str(files[1]), "filename": "c.pdf"},
    ]
    with pytest.raises(ClinikoBatchError):
        batch(hook, uploads, audit_path=str(tmp_path / "audit")).execute(fake_context())
    lines = read_manifest(tmp_path / "audit" / "nightly" / "manual__1" / "upload.jsonl")
    assert [(line.status, line.filename, line.size, line.created_at) for line in lines] == [
        ("error", "a.pdf", 100, None),
        ("waiting", "c.pdf", 200, "2026-01-01T00:00:00Z"),
    ]


def test_an_unexpected_event_is_shown_cut_at_200_characters() -> None:
    event = {"status": "x" * 300}
    with pytest.raises(ClinikoError) as raised:
        ClinikoBatchUploadOperator(task_id="b", uploads=[]).execute_complete(fake_context(), event)
    assert str(raised.value) == f"Unexpected event from the Cliniko batch trigger: {str(event)[:200]}"


def test_verify_is_checked_again_once_rendered_when_the_task_resumes() -> None:
    op = ClinikoBatchUploadOperator(
        task_id="b", uploads=[], wait_for_completion=True, verify="{{ params.verify }}"
    )
    op.verify = "bogus"  # as rendered
    with pytest.raises(
        ClinikoInputError, match=r"^verify must be None, 'size' or 'content', got 'bogus' \(as rendered\)"
    ):
        op.execute_complete(fake_context(), {"status": "done", "attachments": {}})


def test_the_keys_user_is_learned_on_the_tasks_thread_before_the_uploads_threads_start(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # under `airflow dags test` Airflow's calls are not safe from several threads at once
    threads: list[str] = []
    look_up = hook._look_up_user

    def recording_look_up() -> JsonDict:
        threads.append(threading.current_thread().name)
        return look_up()

    monkeypatch.setattr(hook, "_look_up_user", recording_look_up)
    op = batch(hook, uploads_of(files))
    op.max_concurrency = 2
    op.execute(fake_context())
    assert threads == [threading.main_thread().name]
    assert fake.paths().count("GET /v1/user") == 1


def test_deferring_with_an_audit_path_keeps_the_manifests_facts_in_xcom(
    hook: ClinikoHook, fake: BatchFake, files: list[Path], tmp_path: Path
) -> None:
    from cliniko_provider.utils.audit import AUDIT_FACTS_KEY

    ctx = fake_context()
    op = batch(
        hook, uploads_of(files[:1]), wait_for_completion=True, deferrable=True, audit_path=str(tmp_path / "a")
    )
    with pytest.raises(TaskDeferred):
        op.execute(ctx)
    assert ctx["ti"].pushed[AUDIT_FACTS_KEY] == {
        "0": {"size": 100, "filename": "a.pdf", "created_at": "2026-01-01T00:00:00Z"}
    }


def test_the_batch_keeps_each_files_progress_in_the_task_state_store(
    hook: ClinikoHook, fake: BatchFake, files: list[Path]
) -> None:
    from tests.helpers import FakeTaskStateStore

    store = FakeTaskStateStore()
    ctx = fake_context()
    ctx["task_state_store"] = store
    batch(hook, uploads_of(files)).execute(ctx)
    assert sorted(facts["attachment_id"] for facts in store.values.values()) == ["1000", "1001"]


def test_an_empty_batch_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert ClinikoBatchUploadOperator(task_id="b", uploads=[]).execute(fake_context()) == []
    assert re.search(r"\] No files to upload +\[", capsys.readouterr().out)  # the whole message
