"""Many files in one task: ClinikoBatchUploadOperator and its batch trigger, against the sandbox."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.exceptions import (
    ClinikoBatchError,
    ClinikoBatchFinalError,
    ClinikoError,
    ClinikoInputError,
    ClinikoServerError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator
from cliniko_provider.protocol.upload import UploadProtocol
from cliniko_provider.triggers.cliniko import ProcessingCompletedBatchTrigger, error_event, success_event
from cliniko_provider.utils.batch import MAX_CONCURRENCY, failure_summary, parse_upload
from tests.conftest import SANDBOX_KEY
from tests.helpers import create_attachment_via_api, fake_context, sandbox_control, sandbox_faults, write_file

JsonDict = dict[str, Any]


@pytest.fixture
def hook(sandbox_conn: str) -> ClinikoHook:
    return ClinikoHook(sandbox_conn)


@pytest.fixture
def patients(hook: ClinikoHook) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [str(hook.create_patient("Batch", f"{tag}-{n}")["id"]) for n in range(2)]


def batch(hook: ClinikoHook, uploads: Any, **kwargs: Any) -> ClinikoBatchUploadOperator:
    op = ClinikoBatchUploadOperator(task_id="upload_batch", uploads=uploads, **kwargs)
    op.hook = hook
    return op


def api_requests(sandbox: Any) -> int:
    by_route = sandbox_control(sandbox, "stats")["requests_by_route"]
    return sum(int(count) for route, count in by_route.items() if " /v1/" in route)


def attachments_of(hook: ClinikoHook, patient_id: str) -> list[JsonDict]:
    return list(hook.list_attachments(patient_id=patient_id, include_archived=True))


# --- one task, many files; bad ones stop none ----------------------------------------------------------


def test_each_good_file_is_attached_once_and_each_bad_one_says_why(
    hook: ClinikoHook, patients: list[str], tmp_path: Path
) -> None:
    ann, bob = patients
    good = [write_file(tmp_path, f"good-{n}.csv", 300 + n, seed=n) for n in range(3)]
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    uploads: list[Any] = [
        {"patient_id": ann, "file_path": str(good[0]), "description": "Report 0"},
        {"patient_id": ann, "file_path": str(tmp_path / "missing.csv")},
        {"patient_id": ann, "file_path": str(good[1]), "filename": "renamed.csv"},
        {"patient_id": bob, "file_path": str(empty)},
        {"patient_id": "999999999", "file_path": str(good[2])},
        {"patient": bob, "file_path": str(good[2])},
        {"patient_id": ann, "file_path": str(good[0]), "description": "Report 0"},
        "not a dict",
        {"patient_id": "12a", "file_path": str(good[2])},
        {"patient_id": bob, "file_path": good[2].as_uri()},
    ]
    op = batch(hook, uploads, max_concurrency=3)
    ctx = fake_context()
    with pytest.raises(ClinikoBatchFinalError) as raised:  # every failure is one a retry cannot fix
        op.execute(ctx)
    results = ctx["ti"].pushed["return_value"]
    assert [r["index"] for r in results] == list(range(len(uploads)))
    ok = {r["index"]: r for r in results if "error" not in r}
    assert sorted(ok) == [0, 2, 9]
    reasons = {r["index"]: r["error"] for r in results if "error" in r}
    assert "no such file" in reasons[1]
    assert "empty (0 bytes)" in reasons[3]
    assert "no such patient" in reasons[4]
    assert "unknown key(s) patient" in reasons[5]
    assert "repeats uploads[0]" in reasons[6]
    assert "is a str" in reasons[7]
    assert "patient_id" in reasons[8]
    assert not any(r["retryable"] for r in results if "error" in r)
    # the exception names the first five; XCom cliniko_error names all seven, one line each
    message = str(raised.value)
    assert message.startswith(f"7 of {len(uploads)} upload(s) failed:")
    assert "#1 patient" in message and "#7 patient" not in message and "and 2 more" in message
    error_lines = ctx["ti"].pushed["cliniko_error"].splitlines()
    assert len(error_lines) == 8 and error_lines[-1].startswith("  #8 patient 12a")
    # in Cliniko: exactly the good files, each once, with the description given
    by_id = {str(r["id"]): r for p in (ann, bob) for r in attachments_of(hook, p)}
    assert sorted(by_id) == sorted(str(r["attachment_id"]) for r in ok.values())
    assert by_id[ok[0]["attachment_id"]]["description"] == "Report 0"  # exactly as given
    assert len(attachments_of(hook, ann)) == 2 and len(attachments_of(hook, bob)) == 1

    # the task's retry finds what its first try uploaded, and uploads nothing twice
    again = fake_context(try_number=2)
    with pytest.raises(ClinikoBatchFinalError):
        batch(hook, uploads, max_concurrency=3).execute(again)
    retried = {r["index"]: r for r in again["ti"].pushed["return_value"] if "error" not in r}
    assert {i: r["attachment_id"] for i, r in retried.items()} == {
        i: r["attachment_id"] for i, r in ok.items()
    }
    assert len(attachments_of(hook, ann)) == 2 and len(attachments_of(hook, bob)) == 1


def test_all_good_returns_the_results_in_order(
    hook: ClinikoHook, patients: list[str], tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    files = [write_file(tmp_path, f"r{n}.csv", 100 + n) for n in range(5)]
    uploads = [
        {"patient_id": patients[n % 2], "file_path": str(path), "description": f"secret {n}"}
        for n, path in enumerate(files)
    ]
    ctx = fake_context()
    op = batch(hook, uploads)
    with capture_logs() as logs:
        results = op.execute(ctx)
    text = "\n".join(str(entry["event"]) % tuple(entry.get("positional_args", ())) for entry in logs)
    # The log names each file and its patient (never the description or the contents).
    for n, (path, result) in enumerate(zip(files, results, strict=True)):
        line = f"Upload #{n}: {path} to patient {patients[n % 2]}: attachment {result['attachment_id']}"
        assert line in text
    assert "secret" not in text
    # The task's "Cliniko attachments" link lists exactly its records (the API URL: no web address known).
    from cliniko_provider.links.cliniko import ClinikoAttachmentsLink

    link = ClinikoAttachmentsLink().get_link(op, ti_key=ctx["ti"])
    assert link.startswith(f"{hook.settings.base_url}/patient_attachments?q%5B%5D=id%3A%3D")
    listed = hook.get_json(link)["patient_attachments"]
    assert sorted(str(r["id"]) for r in listed) == sorted(str(r["attachment_id"]) for r in results)
    assert "cliniko_error" not in ctx["ti"].pushed
    assert [r["file_path"] for r in results] == [str(path) for path in files]
    assert [r["patient_id"] for r in results] == [patients[n % 2] for n in range(5)]
    records = {str(r["id"]): r for p in patients for r in attachments_of(hook, p)}
    assert sorted(records) == sorted(str(r["attachment_id"]) for r in results)
    fields = {"index", "patient_id", "file_path", "attachment_id", "filename", "size", "sha256", "md5"}
    assert all(set(r) == fields | {"verification", "status"} for r in results)
    assert [r["status"] for r in results] == ["waiting"] * 5  # created, not (yet) confirmed processed
    assert [(r["filename"], r["size"], r["verification"]) for r in results] == [
        (path.name, path.stat().st_size, "etag") for path in files
    ]
    assert [r["sha256"] for r in results] == [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]
    assert [r["md5"] for r in results] == [hashlib.md5(path.read_bytes()).hexdigest() for path in files]


def test_a_failure_a_retry_may_fix_makes_the_task_retryable(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [write_file(tmp_path, f"r{n}.csv", 100 + n) for n in range(3)]
    real = UploadProtocol.upload_once

    def flaky(self: UploadProtocol, patient_id: str, source: Any, **kwargs: Any) -> Any:
        if source.name == "r1.csv":
            raise ClinikoServerError(503, "Service Unavailable", {}, "POST /patient_attachments")
        if source.name == "r2.csv":
            raise OSError("disk went away")
        return real(self, patient_id, source, **kwargs)

    monkeypatch.setattr(UploadProtocol, "upload_once", flaky)
    uploads = [{"patient_id": patients[0], "file_path": str(path)} for path in files]
    uploads.append({"patient_id": patients[0], "file_path": str(tmp_path / "missing.csv")})
    ctx = fake_context()
    with pytest.raises(ClinikoBatchError) as raised:
        batch(hook, uploads).execute(ctx)
    assert not isinstance(raised.value, ClinikoBatchFinalError)  # Airflow will retry the task
    results = ctx["ti"].pushed["return_value"]
    assert [r.get("retryable") for r in results] == [None, True, True, False]
    assert "503" in results[1]["error"] and "disk went away" in results[2]["error"]
    assert results[0]["attachment_id"] is not None


# --- concurrency and the shared rate budget -------------------------------------------------------------


def test_files_upload_at_once_and_every_request_draws_from_the_one_budget(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [write_file(tmp_path, f"c{n}.csv", 2000 + n) for n in range(8)]
    uploads = [{"patient_id": patients[n % 2], "file_path": str(path)} for n, path in enumerate(files)]
    together = threading.Barrier(4, timeout=20)  # broken (and the test fails) unless 4 run at once
    threads: set[str] = set()
    real = UploadProtocol.upload_once

    def at_once(self: UploadProtocol, patient_id: str, source: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        if source.name in {"c0.csv", "c1.csv", "c2.csv", "c3.csv"}:
            together.wait()
        return real(self, patient_id, source, **kwargs)

    monkeypatch.setattr(UploadProtocol, "upload_once", at_once)
    hook.settings  # noqa: B018 - the budget is the key's
    budget = hook.budget
    reserved: list[float] = []
    reserve = budget.reserve

    def counting(now: float | None = None) -> float:
        reserved.append(time.time())
        return reserve(now)

    monkeypatch.setattr(budget, "reserve", counting)
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
    results = batch(hook, uploads, max_concurrency=4).execute(fake_context())
    assert all("error" not in r for r in results)
    assert len(threads) == 4 and all(name.startswith("cliniko-upload") for name in threads)
    assert len(reserved) == api_requests(sandbox) == 2 * len(files)  # presign, create: no look-up first


def test_threads_get_their_own_sessions_sharing_connection_pools(hook: ClinikoHook) -> None:
    sessions: dict[str, Any] = {}

    def grab(name: str) -> None:
        sessions[name] = (hook.session, hook.s3_session)

    grab("main")
    worker = threading.Thread(target=grab, args=("worker",))
    worker.start()
    worker.join()
    (api_main, s3_main), (api_worker, s3_worker) = sessions["main"], sessions["worker"]
    assert api_main is not api_worker and s3_main is not s3_worker
    assert hook.session is api_main  # the same thread keeps its session
    assert api_worker.adapters["http://"] is api_main.adapters["http://"]
    assert s3_worker.adapters["http://"] is s3_main.adapters["http://"]
    assert api_worker.headers["Authorization"] == api_main.headers["Authorization"]
    assert "Authorization" not in s3_worker.headers


# --- waiting: in the worker, or one deferral for the batch ---------------------------------------------


def test_waiting_in_the_worker_polls_the_batch_together(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, sandbox: Any
) -> None:
    files = [write_file(tmp_path, f"w{n}.csv", 100 + n) for n in range(6)]
    uploads = [{"patient_id": patients[0], "file_path": str(path)} for path in files]
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
    with sandbox_faults(sandbox, processing_delay=1.0):
        results = batch(hook, uploads, wait_for_completion=True, deferrable=False, poll_interval=0.5).execute(
            fake_context()
        )
    assert all(r["processed_at"] for r in results) and {r["status"] for r in results} == {"processed"}
    by_route = sandbox_control(sandbox, "stats")["requests_by_route"]
    assert by_route.get("GET /v1/patient_attachments/{id}", 0) == 0  # never one request per file
    assert 1 <= by_route["GET /v1/patient_attachments"] <= 4  # ~1 s of processing, 6 ids a request


def test_deferring_waits_for_the_batch_with_one_trigger(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, sandbox: Any
) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    files = [write_file(tmp_path, f"d{n}.csv", 100 + n) for n in range(4)]
    uploads: list[Any] = [{"patient_id": patients[1], "file_path": str(path)} for path in files]
    uploads.append({"patient_id": patients[1], "file_path": str(tmp_path / "missing.csv")})
    op = batch(hook, uploads, wait_for_completion=True, deferrable=True, poll_interval=0.3, timeout=60)
    ctx = fake_context()
    with sandbox_faults(sandbox, processing_delay=1.0), pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    trigger = deferred.value.trigger
    assert isinstance(trigger, ProcessingCompletedBatchTrigger)
    assert not deferred.value.kwargs  # the results wait in XCom, which `airflow dags test` keeps too
    results = json.loads(json.dumps(ctx["ti"].pushed["return_value"]))  # as XCom stores them
    assert trigger.attachment_ids == [r["attachment_id"] for r in results[:4]]  # the failed one not waited
    assert "no such file" in results[4]["error"] and "cliniko_error" not in ctx["ti"].pushed
    # Should the deferral be abandoned, what was pushed before it never reads as success.
    assert [r["status"] for r in results] == ["waiting"] * 4 + ["error"]
    event = asyncio.run(asyncio.wait_for(fire(trigger), timeout=60))
    with pytest.raises(ClinikoBatchFinalError):
        op.execute_complete(ctx, json.loads(json.dumps(event)))
    done = ctx["ti"].pushed["return_value"]
    assert all(r["processed_at"] for r in done[:4]) and "error" in done[4]
    assert [r["status"] for r in done] == ["processed"] * 4 + ["error"]


@pytest.mark.parametrize(
    ("outcome", "retryable", "final", "words"),
    [
        ("timeout", False, True, "had not finished"),
        ("archived", False, True, "was archived"),
        ("not_found", False, True, "does not exist"),
        ("api_error", True, False, "kept failing"),
        ("api_error", False, True, "kept failing"),  # e.g. a 401: the task's retries would repeat it
    ],
)
def test_a_failed_wait_fails_that_file_only(outcome: str, retryable: bool, final: bool, words: str) -> None:
    from cliniko_provider.exceptions import ClinikoAttachmentGoneError

    results = [
        {"index": 0, "patient_id": "1", "file_path": "/a", "attachment_id": "10"},
        {"index": 1, "patient_id": "1", "file_path": "/b", "attachment_id": "11"},
    ]
    messages = {
        "timeout": "Cliniko had not finished processing attachment 11 by the deadline",
        "archived": str(ClinikoAttachmentGoneError("11", "archived", archived_at="2026-01-01")),
        "not_found": str(ClinikoAttachmentGoneError("11", "not_found")),
        "api_error": "Cliniko kept failing for 20 rounds: 503",
    }
    event = {
        "status": "done",
        "attachments": {
            "10": success_event("10", {"id": "10", "processed_at": "2026-01-01T00:00:00Z"}),
            "11": error_event("11", outcome, messages[outcome], retryable=retryable),
        },
    }
    op = ClinikoBatchUploadOperator(task_id="b", uploads=[])
    ctx = fake_context()
    ctx["ti"].xcom_push("return_value", results)
    with pytest.raises(ClinikoBatchFinalError if final else ClinikoBatchError) as raised:
        op.execute_complete(ctx, event)
    assert isinstance(raised.value, ClinikoBatchFinalError) is final
    done = ctx["ti"].pushed["return_value"]
    assert done[0]["processed_at"] == "2026-01-01T00:00:00Z" and "error" not in done[0]
    assert (done[0]["status"], done[1]["status"]) == ("processed", "error")
    assert words in done[1]["error"] and done[1]["attachment_id"] == "11"
    assert done[1]["retryable"] is not final


def test_a_malformed_event_is_a_clear_error() -> None:
    op = ClinikoBatchUploadOperator(task_id="b", uploads=[])
    with pytest.raises(ClinikoError, match="Unexpected event from the Cliniko batch trigger"):
        op.execute_complete(fake_context(), {"status": "success"})


def test_results_missing_from_xcom_are_a_clear_error() -> None:
    op = ClinikoBatchUploadOperator(task_id="b", uploads=[])
    with pytest.raises(ClinikoError, match="results are missing from XCom"):
        op.execute_complete(fake_context(), {"status": "done", "attachments": {}})


# --- the batch trigger --------------------------------------------------------------------------------


async def fire(trigger: ProcessingCompletedBatchTrigger) -> JsonDict:
    events: list[JsonDict] = [event.payload async for event in trigger.run()]
    assert len(events) == 1, "a batch trigger yields exactly one event"
    return events[0]


def test_the_trigger_serialises_only_ids_the_conn_id_and_numbers() -> None:
    from airflow.serialization.serialized_objects import BaseSerialization

    expect = {"7": {"size": 3, "filename": "a.pdf"}}
    trigger = ProcessingCompletedBatchTrigger(
        ["7", "8", "7"], "my_conn", poll_interval=15, deadline=12.5, expect=expect
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "cliniko_provider.triggers.cliniko.ProcessingCompletedBatchTrigger"
    assert kwargs == {
        "attachment_ids": ["7", "8"],
        "cliniko_conn_id": "my_conn",
        "poll_interval": 15.0,
        "deadline": 12.5,
        "expect": expect,
    }
    restored = BaseSerialization.deserialize(BaseSerialization.serialize(kwargs))
    assert ProcessingCompletedBatchTrigger(**restored).serialize() == (classpath, kwargs)


async def test_the_trigger_waits_for_all_in_shared_rounds_and_reports_each(
    sandbox: Any, sandbox_conn: str
) -> None:
    hook = ClinikoHook(sandbox_conn)
    patient = (await asyncio.to_thread(hook.create_patient, "Batch", "Trigger"))["id"]
    with sandbox_faults(sandbox, processing_delay=1.5):
        ids = [(await asyncio.to_thread(create_attachment_via_api, hook, patient))["id"] for _ in range(30)]
    archived = ids[-1]
    await asyncio.to_thread(hook.archive_attachment, archived)
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
    deadline = time.time() + 60
    trigger = ProcessingCompletedBatchTrigger([*ids, "12345", "x1"], poll_interval=0.5, deadline=deadline)
    event = await asyncio.wait_for(fire(trigger), timeout=60)
    outcomes = event["attachments"]
    assert event["status"] == "done" and list(outcomes) == [*ids, "12345", "x1"]
    for attachment_id in ids[:-1]:
        assert outcomes[attachment_id]["status"] == "success"
        assert set(outcomes[attachment_id]["attachment"]) == {
            "id",
            "processing_completed",
            "processed_at",
            "filename",
            "size",
        }
    assert outcomes[archived]["reason"] == "archived"
    assert outcomes["12345"]["reason"] == "not_found" and outcomes["x1"]["reason"] == "not_found"
    polls = sandbox_control(sandbox, "stats")["requests_by_route"]["GET /v1/patient_attachments"]
    assert 1 <= polls <= 6  # 31 ids in one request a round, over ~1.5 s of processing
    assert SANDBOX_KEY not in json.dumps(event)
    assert base64.b64encode(f"{SANDBOX_KEY}:".encode()).decode() not in json.dumps(event)


# --- arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, MAX_CONCURRENCY])
def test_max_concurrency_edges_are_accepted(value: int) -> None:
    assert ClinikoBatchUploadOperator(task_id="b", uploads=[], max_concurrency=value).max_concurrency == value


@pytest.mark.parametrize("value", [0, MAX_CONCURRENCY + 1, -1, True, 2.0, "4"])
def test_max_concurrency_out_of_range_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        ClinikoBatchUploadOperator(task_id="b", uploads=[], max_concurrency=value)


def test_look_for_existing_is_checked() -> None:
    with pytest.raises(ValueError, match="look_for_existing"):
        ClinikoBatchUploadOperator(task_id="b", uploads=[], look_for_existing="never")  # type: ignore[arg-type]


@pytest.mark.parametrize("uploads", ["a.pdf", {"patient_id": "1", "file_path": "/a"}, 7, None])
def test_uploads_that_are_not_a_list_fail_before_any_request(uploads: Any) -> None:
    ctx = fake_context()
    with pytest.raises(ClinikoInputError, match="uploads must be a list of dicts"):
        ClinikoBatchUploadOperator(task_id="b", uploads=uploads).execute(ctx)
    assert "uploads must be a list" in ctx["ti"].pushed["cliniko_error"]


def test_an_empty_batch_succeeds_with_nothing_to_do() -> None:
    assert ClinikoBatchUploadOperator(task_id="b", uploads=[]).execute(fake_context()) == []


def test_uploads_are_templated() -> None:
    assert ClinikoBatchUploadOperator.template_fields == ("uploads", "audit_path", "verify")


@pytest.mark.parametrize(
    ("upload", "words"),
    [
        ({"file_path": "/a"}, "has no patient_id"),
        ({"patient_id": "1"}, "has no file_path"),
        ({"patient_id": "1", "file_path": ""}, "has no file_path"),
        ({}, "has no patient_id or file_path"),
        ({"patient_id": "1", "file_path": "/a", "descripton": "x"}, "unknown key(s) descripton"),
        (["1", "/a"], "is a list"),
        ({"patient_id": "one", "file_path": "/a"}, "patient_id"),
    ],
)
def test_a_malformed_upload_is_named(upload: Any, words: str) -> None:
    with pytest.raises(ClinikoInputError) as raised:
        parse_upload(3, upload)
    assert str(raised.value).startswith("uploads[3]") or "patient_id" in words
    assert words in str(raised.value)


def test_an_upload_keeps_its_optional_arguments() -> None:
    item = parse_upload(0, {"patient_id": 12, "file_path": "/a", "filename": "b.pdf", "description": "d"})
    assert (item.patient_id, item.file_path, item.filename, item.description, item.idempotency_key) == (
        "12",
        "/a",
        "b.pdf",
        "d",
        None,
    )


def test_the_summary_names_every_failure_or_the_first_few() -> None:
    results = [{"index": n, "patient_id": "1", "file_path": f"/f{n}", "error": f"bad {n}"} for n in range(7)]
    results.append({"index": 7, "patient_id": "1", "file_path": "/ok", "attachment_id": "3"})
    full = failure_summary(results).splitlines()
    assert (
        full[0] == "7 of 8 upload(s) failed:" and len(full) == 8 and full[-1] == "  #6 patient 1 /f6: bad 6"
    )
    short = failure_summary(results, limit=5).splitlines()
    assert len(short) == 7 and short[-1].startswith("  ... and 2 more")
    assert len(failure_summary(results, limit=7).splitlines()) == 8  # exactly the limit: no "more" line


def test_waiting_in_the_worker_ends_each_file_with_its_own_outcome(
    hook: ClinikoHook, patients: list[str], sandbox: Any
) -> None:
    from airflow.providers.common.compat.sdk import AirflowSensorTimeout

    from cliniko_provider.exceptions import ClinikoAttachmentGoneError

    done = create_attachment_via_api(hook, patients[0])["id"]
    with sandbox_faults(sandbox, processing_delay=60.0):
        slow = create_attachment_via_api(hook, patients[0])["id"]
        archived = create_attachment_via_api(hook, patients[0])["id"]
    hook.archive_attachment(archived)
    time.sleep(0.5)  # the sandbox's default delay: the first one is processed by now
    outcomes = hook.wait_for_processing_of_many(
        [done, slow, archived, "12345", done], poll_interval=0.2, timeout=0.7
    )
    assert list(outcomes) == [done, archived, "12345", slow]  # in the order they ended; once each
    assert isinstance(outcomes[done], dict) and outcomes[done]["processing_completed"] is True
    assert isinstance(outcomes[archived], ClinikoAttachmentGoneError) and "archived" in str(
        outcomes[archived]
    )
    assert isinstance(outcomes["12345"], ClinikoAttachmentGoneError)
    assert isinstance(outcomes[slow], AirflowSensorTimeout) and "after 1 s" in str(outcomes[slow])


# --- look-ups on a retry on another worker (issue 18) ------------------------------------------------------


def content_stats(sandbox: Any) -> tuple[int, int]:
    stats = sandbox_control(sandbox, "stats")
    return int(stats["content_reads"]), int(stats["content_bytes"])


def twenty_alike(tmp_path: Path, patient: str) -> list[JsonDict]:
    """20 files of one patient, one description, one name shown and one size: only their bytes differ."""
    uploads = []
    for n in range(20):
        (tmp_path / f"d{n}").mkdir()
        path = write_file(tmp_path / f"d{n}", "report.pdf", 3000, seed=n)
        uploads.append({"patient_id": patient, "file_path": str(path), "description": "Nightly"})
    return uploads


def retry_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sandbox: Any) -> None:
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "another-worker"))
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()


def durable(ctx: Any, store: Any) -> Any:
    from datetime import datetime, timezone
    from types import SimpleNamespace

    ctx["task_state_store"] = store
    ctx["dag_run"] = SimpleNamespace(run_after=datetime.now(timezone.utc), start_date=None)
    return ctx


def test_on_the_task_state_store_a_batch_of_20_retried_on_another_worker_downloads_no_content(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import FakeTaskStateStore

    uploads, store = twenty_alike(tmp_path, patients[0]), FakeTaskStateStore()
    first = batch(hook, uploads, wait_for_completion=True, deferrable=False, poll_interval=0.3).execute(
        durable(fake_context(), store)
    )
    retry_elsewhere(monkeypatch, tmp_path, sandbox)
    again = batch(hook, uploads).execute(durable(fake_context(try_number=2), store))
    assert [r["attachment_id"] for r in again] == [r["attachment_id"] for r in first]
    assert all(r.get("reused") for r in again)
    assert content_stats(sandbox) == (0, 0)
    assert len(attachments_of(hook, patients[0])) == 20


def test_the_batchs_threads_call_the_task_state_store_one_at_a_time(
    hook: ClinikoHook, patients: list[str], tmp_path: Path
) -> None:
    from tests.helpers import FakeTaskStateStore

    uploads = [
        {"patient_id": patients[0], "file_path": str(write_file(tmp_path, f"s{n}.csv", 100 + n, seed=n))}
        for n in range(8)
    ]
    store = FakeTaskStateStore(one_call_at_a_time=True)
    results = batch(hook, uploads, max_concurrency=4).execute(durable(fake_context(), store))
    assert [r.get("error") for r in results] == [None] * 8
    assert len(store.values) == 8


def test_without_the_store_a_batch_retried_on_another_worker_reads_each_candidate_at_most_once(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = twenty_alike(tmp_path, patients[0])
    first = batch(hook, uploads, wait_for_completion=True, deferrable=False, poll_interval=0.3).execute(
        fake_context()
    )
    retry_elsewhere(monkeypatch, tmp_path, sandbox)
    again = batch(hook, uploads).execute(fake_context(try_number=2))
    assert [r["attachment_id"] for r in again] == [r["attachment_id"] for r in first]
    reads, size = content_stats(sandbox)
    assert reads <= 20 and size <= 20 * 3000  # was up to 20 reads per file: 210 for 20 alike
    assert len(attachments_of(hook, patients[0])) == 20


def test_two_files_one_description_one_still_processing_neither_waits_nor_duplicates(
    hook: ClinikoHook, patients: list[str], tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = patients[1]
    a = write_file(tmp_path, "a.pdf", 2000, seed=1)
    b = write_file(tmp_path, "b.pdf", 2500, seed=2)

    def upload(path: Path, key: str, try_number: int = 1) -> JsonDict:
        item = {
            "patient_id": patient,
            "file_path": str(path),
            "description": "Nightly",
            "idempotency_key": key,
        }
        (result,) = batch(hook, [item], look_for_existing="always").execute(
            fake_context(try_number=try_number)
        )
        return result

    with sandbox_faults(sandbox, processing_delay=1200.0):  # a's upload: still processing for 20 minutes
        upload(a, "a")
    started = time.monotonic()
    b_first = upload(b, "b")  # a first try with "always": not held by a's processing
    hook.wait_for_processing(b_first["attachment_id"], poll_interval=0.2, timeout=30)
    retry_elsewhere(monkeypatch, tmp_path, sandbox)
    b_again = upload(b, "b", try_number=2)
    assert time.monotonic() - started < 30  # was: 300 s, then a failure, on the first try already
    assert b_again["attachment_id"] == b_first["attachment_id"] and b_again.get("reused")
    assert len(attachments_of(hook, patient)) == 2
