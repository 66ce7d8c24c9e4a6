"""Integrity checks: S3's ETag against the MD5 streamed, the processed record, and verify="content".

The pure checks are unit-tested at their edges; every behaviour a user relies on is also proven against
the running sandbox, whose fault switches corrupt a stored object, a processed size or processed bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from airflow.providers.common.compat.sdk import TaskDeferred

from cliniko_provider.exceptions import (
    AirflowFailException,
    ClinikoBatchFinalError,
    ClinikoInputError,
    ClinikoIntegrityError,
    S3IntegrityError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator, ClinikoBatchUploadOperator
from cliniko_provider.utils.idempotency import DigestingOpener, UploadOutcome
from cliniko_provider.utils.integrity import (
    S3Upload,
    check_processed_record,
    check_verify,
    expectation,
    higher,
)
from cliniko_provider.utils.s3_form import answered_etag, etag_md5
from cliniko_provider.utils.upload import resolve_source
from tests.helpers import fake_context, sandbox_control, sandbox_faults, write_file
from tests.test_request_plane import Reply, use
from tests.test_request_plane import stand_ins as stand_ins  # the fixture

JsonDict = dict[str, Any]
MD5 = "0123456789abcdef0123456789abcdef"

# --- unit: S3's ETag ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "headers", "etag"),
    [
        ({"ETag": f'"{MD5}"'}, {"ETag": '"other"'}, MD5),  # the XML wins over the header
        ({}, {"ETag": f'"{MD5}"'}, MD5),  # a 204 answer: the header
        ({}, {"ETag": f'W/"{MD5}"'}, MD5),
        ({}, {}, ""),
    ],
)
def test_answered_etag(answer: dict[str, str], headers: dict[str, str], etag: str) -> None:
    assert answered_etag(answer, headers) == etag


@pytest.mark.parametrize(
    ("etag", "headers", "md5", "why"),
    [
        (MD5, {}, MD5, ""),
        (MD5.upper(), {}, MD5, ""),
        (MD5, {"x-amz-server-side-encryption": "AES256"}, MD5, ""),  # SSE-S3 keeps the MD5
        (MD5, {"x-amz-server-side-encryption": "aws:kms"}, None, "aws:kms"),
        (MD5, {"x-amz-server-side-encryption": "aws:kms:dsse"}, None, "aws:kms:dsse"),
        (MD5, {"x-amz-server-side-encryption-customer-algorithm": "AES256"}, None, "customer key"),
        (f"{MD5}-2", {}, None, "not an MD5"),  # multipart
        (MD5[:-1], {}, None, "not an MD5"),  # 31 hex digits
        (MD5 + "0", {}, None, "not an MD5"),  # 33
        ("", {}, None, "no ETag"),
    ],
)
def test_etag_md5(etag: str, headers: dict[str, str], md5: str | None, why: str) -> None:
    held, reason = etag_md5(etag, headers)
    assert held == md5
    assert why in reason and bool(reason) == (md5 is None)


# --- unit: the digests computed while streaming -----------------------------------------------------


def test_digesting_opener_hashes_what_is_read_and_only_a_whole_file() -> None:
    data = b"x" * 2_500_000 + b"end"
    opener = DigestingOpener(lambda: io.BytesIO(data), len(data))
    with opener() as reader:
        while reader.read(1024 * 1024):
            pass
    assert opener.sha256 == hashlib.sha256(data).hexdigest()
    assert opener.md5 == hashlib.md5(data).hexdigest()
    with opener() as reader:  # a new read forgets the last digests until it is whole
        reader.read(10)
        assert opener.sha256 is None and opener.md5 is None
    short = DigestingOpener(lambda: io.BytesIO(data), len(data) + 1)
    with short() as reader:
        while reader.read(1024 * 1024):
            pass
    assert short.sha256 is None and short.md5 is None


# --- unit: the processed record ----------------------------------------------------------------------


def test_processed_record_matches_what_was_sent() -> None:
    expect = expectation(1000, "a%22b.pdf")
    check_processed_record({"id": "7", "size": 1000, "filename": "a%22b.pdf"}, expect)
    check_processed_record({"id": "7", "size": "1000", "filename": "a%22b.pdf"}, expect)  # as text
    check_processed_record({"id": "7", "size": 5}, None)  # nothing expected: nothing checked


@pytest.mark.parametrize("size", [999, 1001, None, True, "1000 bytes", 0])
def test_processed_record_with_another_size_names_both(size: object) -> None:
    with pytest.raises(ClinikoIntegrityError) as caught:
        check_processed_record({"id": "7", "size": size, "filename": "a.pdf"}, expectation(1000, "a.pdf"))
    message = str(caught.value)
    assert "attachment 7" in message and "1000 bytes" in message
    assert ("no size" if size is None else f"{size} bytes") in message


def test_processed_record_with_another_name_names_both() -> None:
    with pytest.raises(ClinikoIntegrityError, match=r"'b\.pdf'.*'a\.pdf'"):
        check_processed_record({"id": "7", "size": 3, "filename": "b.pdf"}, expectation(3, "a.pdf"))
    with pytest.raises(ClinikoIntegrityError, match="None"):
        check_processed_record({"id": "7", "size": 3}, expectation(3, "a.pdf"))


def test_verify_argument() -> None:
    assert check_verify(None, False) is None
    assert check_verify("", False) is None  # a template rendered empty
    assert check_verify("content", True) == "content"
    assert check_verify("size", True) == "size"
    for level in ("content", "size"):
        with pytest.raises(ValueError, match=f"verify='{level}' checks .* set wait_for_completion=True"):
            check_verify(level, False)
    for bad in ("contents", "etag", "processed", "None", True, 0, " content"):
        with pytest.raises(ValueError, match=r"^verify must be None, 'size' or 'content', got .*\. 'size'"):
            check_verify(bad, True)


def test_a_templated_verify_is_checked_once_rendered() -> None:
    for template in ("{{ params.verify }}", "{% if x %}content{% endif %}"):
        assert check_verify(template, False) == template  # before rendering: left to execute
    with pytest.raises(ClinikoInputError, match=r"got 'contnet' \(as rendered\)\. .*DAG param"):
        check_verify("contnet", True, rendered=True)
    with pytest.raises(
        ClinikoInputError, match=re.escape("got '{{ params.verify }}'")
    ):  # rendered: no template left
        check_verify("{{ params.verify }}", True, rendered=True)
    with pytest.raises(ClinikoInputError, match="wait_for_completion=True"):
        check_verify("content", False, rendered=True)
    assert check_verify("content", True, rendered=True) == "content"


def test_levels() -> None:
    assert higher("none", "processed") == "processed"
    assert higher("content", "etag") == "content"
    assert S3Upload("k", 1, "s", "m", "m", etag_verified=True).verification == "etag"
    assert S3Upload("k", 1, "s", "m", "x", etag_verified=False).verification == "none"
    summary = UploadOutcome({"id": "1"}, False, "uploaded", sha256="s", md5="m", verification="etag").summary(
        None
    )
    assert (summary["sha256"], summary["md5"], summary["verification"]) == ("s", "m", "etag")


# --- against the running sandbox: S3's ETag ---------------------------------------------------------


@pytest.fixture
def hook(sandbox_conn: str) -> ClinikoHook:
    return ClinikoHook(sandbox_conn, sleep=lambda seconds: time.sleep(min(seconds, 0.2)))


@pytest.fixture
def patient(hook: ClinikoHook) -> str:
    return str(hook.create_patient("Ada", f"Integrity-{uuid.uuid4().hex[:8]}")["id"])


def attachments(hook: ClinikoHook, patient: str) -> list[JsonDict]:
    return list(hook.list_attachments(patient_id=patient, include_archived=True))


def reset_stats(sandbox: Any) -> None:
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()


def logged(hook: ClinikoHook) -> ClinikoHook:
    """Send the hook's log to a plain logger, which ``caplog`` sees at every level."""
    hook._log = logging.getLogger("tests.integrity")
    return hook


def routes(sandbox: Any) -> dict[str, int]:
    return dict(sandbox_control(sandbox, "stats")["requests_by_route"])


def run_upload(hook: ClinikoHook, patient: str, path: Path, **kwargs: Any) -> tuple[JsonDict, Any]:
    op = ClinikoAttachmentUploadOperator(task_id="upload", patient_id=patient, file_path=str(path), **kwargs)
    op.hook = hook
    context = fake_context("manual__1", 1)
    return op.execute(context), context["ti"]


def test_upload_checks_the_etag_at_no_extra_request(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, size=3 * 1024 * 1024 + 5)
    data = path.read_bytes()
    reset_stats(sandbox)
    record, ti = run_upload(hook, patient, path)
    summary = ti.pushed["cliniko_upload"]
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()
    assert summary["md5"] == hashlib.md5(data).hexdigest()
    assert summary["verification"] == "etag"
    assert routes(sandbox) == {
        "GET /v1/patients/{id}/attachment_presigned_post": 1,
        "POST /s3/{bucket}/": 1,
        "POST /v1/patient_attachments": 1,
    }
    assert [item["id"] for item in attachments(hook, patient)] == [record["id"]]


def test_a_corrupted_s3_object_is_sent_again_before_the_create(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_file(tmp_path, size=200_000)
    reset_stats(sandbox)
    with sandbox_faults(sandbox, corrupt_s3_objects=1), caplog.at_level(logging.WARNING):
        record, ti = run_upload(
            logged(hook),
            patient,
            path,
            wait_for_completion=True,
            deferrable=False,
            poll_interval=0.1,
            timeout=30,
        )
    assert "S3 holds other bytes than were sent" in caplog.text and "fresh presign" in caplog.text
    seen = routes(sandbox)
    assert seen["POST /s3/{bucket}/"] == 2
    assert seen["GET /v1/patients/{id}/attachment_presigned_post"] == 2
    assert seen["POST /v1/patient_attachments"] == 1
    assert sandbox_control(sandbox, "stats")["corrupted"] == {"s3_objects": 1}
    assert [item["id"] for item in attachments(hook, patient)] == [record["id"]]
    assert hook.request("GET", f"/patient_attachments/{record['id']}/content").content == path.read_bytes()
    assert ti.pushed["cliniko_upload"]["verification"] in ("etag", "processed")


def test_an_object_corrupted_twice_fails_the_file_and_creates_nothing(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, size=70_000)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    reset_stats(sandbox)
    with sandbox_faults(sandbox, corrupt_s3_objects=2), pytest.raises(S3IntegrityError) as caught:
        run_upload(hook, patient, path)
    message = str(caught.value)
    assert f"sent 70000 bytes with MD5 {md5}" in message and "No attachment was created" in message
    assert "ETag" in message and "policy" not in message.lower()
    assert routes(sandbox)["POST /s3/{bucket}/"] == 2
    assert "POST /v1/patient_attachments" not in routes(sandbox)
    assert attachments(hook, patient) == []


def test_the_bench_path_upload_file_returns_the_digests(
    hook: ClinikoHook, patient: str, tmp_path: Path
) -> None:
    source = resolve_source(write_file(tmp_path, size=1234))
    stored = hook.upload_file(hook.get_presigned_post(patient), source.opener, source.size, source.name)
    data = Path(source.uri).read_bytes()
    assert (stored.md5, stored.sha256) == (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert stored.etag == stored.md5 and stored.etag_verified and stored.size == 1234


# --- a stand-in S3 whose ETags are no MD5 (SSE-KMS), or another MD5 -----------------------------------


def test_an_etag_that_is_no_md5_is_noted_once_at_debug_level_and_the_upload_goes_on(
    stand_ins: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kms = {"ETag": f'"{MD5}"', "x-amz-server-side-encryption": "aws:kms"}
    s3 = stand_ins(Reply(204, body=b"", headers=kms))
    use(monkeypatch, stand_ins())
    source = tmp_path / "a.txt"
    source.write_bytes(b"abc")
    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    hook = logged(ClinikoHook())
    with caplog.at_level(logging.DEBUG):
        first = hook.upload_file(presign, lambda: source.open("rb"), 3, "a.txt")
        second = hook.upload_file(presign, lambda: source.open("rb"), 3, "a.txt")
    assert first.key == "k/a.txt" and not first.etag_verified and first.verification == "none"
    assert first.md5 == hashlib.md5(b"abc").hexdigest() and second.etag == MD5
    notes = [r for r in caplog.records if "Not comparing S3's ETag" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG and "aws:kms" in notes[0].getMessage()
    assert len(s3.seen) == 2  # one POST per upload: nothing sent again


def test_without_a_refresh_a_mismatch_is_sent_again_with_the_same_presign(
    stand_ins: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    right = hashlib.md5(b"abc").hexdigest()
    s3 = stand_ins(
        Reply(204, body=b"", headers={"ETag": f'"{MD5}"'}), Reply(204, b"", {"ETag": f'"{right}"'})
    )
    use(monkeypatch, stand_ins())
    source = tmp_path / "a.txt"
    source.write_bytes(b"abc")
    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    stored = ClinikoHook().upload_file(presign, lambda: source.open("rb"), 3, "a.txt")
    assert stored.etag_verified and len(s3.seen) == 2


# --- against the running sandbox: the processed record and verify="content" ----------------------------

WAIT = {"wait_for_completion": True, "poll_interval": 0.1, "timeout": 30}


def fire(trigger: Any) -> JsonDict:
    """Run a trigger to its one event, as the triggerer would; return the event as XCom would store it."""

    async def first() -> JsonDict:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("the trigger yielded no event")

    return json.loads(json.dumps(asyncio.run(asyncio.wait_for(first(), timeout=60))))


def batch(hook: ClinikoHook, uploads: Any, **kwargs: Any) -> ClinikoBatchUploadOperator:
    op = ClinikoBatchUploadOperator(task_id="upload", uploads=uploads, **kwargs)
    op.hook = hook
    return op


def test_verify_content_needs_the_wait() -> None:
    for operator in (
        lambda **kw: ClinikoAttachmentUploadOperator(task_id="t", patient_id="1", file_path="/a", **kw),
        lambda **kw: ClinikoBatchUploadOperator(task_id="t", uploads=[], **kw),
    ):
        with pytest.raises(ValueError, match="wait_for_completion=True"):
            operator(verify="content")
        with pytest.raises(ValueError, match="None, 'size' or 'content'"):
            operator(verify="sizes", wait_for_completion=True)


def test_verify_is_templated_on_the_operators_and_the_decorator() -> None:
    from tests.test_decorator import decorated

    template = "{{ params.verify }}"
    for op in (
        ClinikoAttachmentUploadOperator(
            task_id="t", patient_id="1", file_path="/a", wait_for_completion=True, verify=template
        ),
        ClinikoBatchUploadOperator(task_id="t", uploads=[], wait_for_completion=True, verify=template),
        decorated(wait_for_completion=True, verify=template),
    ):
        assert "verify" in op.template_fields and op.verify == template  # checked once rendered
        op.render_template_fields({"params": {"verify": "content"}})
        assert op.verify == "content"


def rendered(op: Any, verify: str) -> Any:
    op.render_template_fields({"params": {"verify": verify}})
    return op


@pytest.mark.parametrize("verify", ["contnet", "etag"])
def test_a_verify_rendered_to_another_value_fails_the_task_before_any_request(
    verify: str, tmp_path: Path
) -> None:
    """No connection is set (a request would fail otherwise); each leaves its reason in XCom and manifest."""
    from cliniko_provider.decorators.cliniko import _ClinikoUploadDecoratedOperator
    from cliniko_provider.utils.audit import manifest_location, read_manifest

    common: JsonDict = {"wait_for_completion": True, "verify": "{{ params.verify }}"}
    uploads = [{"patient_id": "1", "file_path": str(tmp_path / "a.pdf")}]
    operators = {
        "single": ClinikoAttachmentUploadOperator(
            task_id="single", patient_id="1", file_path=str(tmp_path / "a.pdf"), **common
        ),
        "batch": ClinikoBatchUploadOperator(task_id="batch", uploads=uploads, **common),
        "decorated": _ClinikoUploadDecoratedOperator(
            task_id="decorated", python_callable=lambda: uploads, **common
        ),
    }
    for name, op in operators.items():
        op.audit_path = str(tmp_path / name)
        ctx = fake_context()
        with pytest.raises(
            ClinikoInputError, match=rf"^verify must be None, 'size' or 'content', got '{verify}'"
        ):
            rendered(op, verify).execute(ctx)
        assert ctx["ti"].pushed["cliniko_error"].startswith("verify must be None, 'size' or 'content'")
        (line,) = read_manifest(manifest_location(tmp_path / name, "nightly", "manual__1", "upload", None))
        assert line.status == "error" and str(line.error).startswith("verify must be") and not line.retryable


def test_a_processed_size_that_differs_fails_the_file_with_both_sizes(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, size=5000)
    context = fake_context("manual__1", 1)
    op = ClinikoAttachmentUploadOperator(
        task_id="upload", patient_id=patient, file_path=str(path), deferrable=False, **WAIT
    )
    op.hook = hook
    with sandbox_faults(sandbox, corrupt_processed_sizes=1), pytest.raises(ClinikoIntegrityError) as caught:
        op.execute(context)
    [record] = attachments(hook, patient)  # no duplicate
    message = str(caught.value)
    assert f"attachment {record['id']} as 5001 bytes, but 5000 bytes" in message
    assert context["ti"].pushed["cliniko_error"] == message
    assert isinstance(caught.value, AirflowFailException)  # a retry would find the same attachment


def test_deferred_a_processed_size_that_differs_fails_on_resume(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, name='a"b.pdf', size=4000)
    context = fake_context("manual__1", 1)
    op = ClinikoAttachmentUploadOperator(
        task_id="upload", patient_id=patient, file_path=str(path), deferrable=True, **WAIT
    )
    op.hook = hook
    with sandbox_faults(sandbox, corrupt_processed_sizes=1, processing_delay=0.5):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)
        trigger = deferred.value.trigger
        assert trigger.serialize()[1]["expect"] == {"size": 4000, "filename": "a%22b.pdf"}
        event = fire(trigger)
    assert event["status"] == "error" and event["reason"] == "mismatch" and event["retryable"] is False
    with pytest.raises(ClinikoIntegrityError, match="as 4001 bytes, but 4000 bytes"):
        op.execute_complete(context, event)
    assert len(attachments(hook, patient)) == 1


def test_verify_content_proves_the_bytes_with_one_request(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, size=2 * 1024 * 1024 + 3)
    reset_stats(sandbox)
    record, ti = run_upload(hook, patient, path, deferrable=False, verify="content", **WAIT)
    assert record["processing_completed"] is True
    summary = ti.pushed["cliniko_upload"]
    assert summary["verification"] == "content"
    assert (summary["size"], summary["filename"]) == (path.stat().st_size, path.name)
    assert routes(sandbox)["GET /v1/patient_attachments/{id}/content"] == 1


def test_verify_content_catches_a_changed_byte(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, size=3000)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with (
        sandbox_faults(sandbox, corrupt_processed_contents=1),
        pytest.raises(ClinikoIntegrityError) as caught,
    ):
        run_upload(hook, patient, path, deferrable=False, verify="content", **WAIT)
    [record] = attachments(hook, patient)
    message = str(caught.value)
    assert (
        f"attachment {record['id']} (3000 bytes read)" in message
        and f"file sent (3000 bytes) has SHA-256 {sha256}" in message
    )
    assert record["size"] == 3000  # the size check passed: only the content tells


def test_deferred_verify_content_after_resume(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    path = write_file(tmp_path, size=10_000)
    context = fake_context("manual__1", 1)
    op = ClinikoAttachmentUploadOperator(
        task_id="upload", patient_id=patient, file_path=str(path), deferrable=True, verify="content", **WAIT
    )
    op.hook = hook
    with sandbox_faults(sandbox, processing_delay=0.5), pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert context["ti"].pushed["cliniko_upload"]["verification"] == "etag"
    record = op.execute_complete(context, fire(deferred.value.trigger))
    assert record["processing_completed"] is True
    assert context["ti"].pushed["cliniko_upload"]["verification"] == "content"


def test_batch_fails_only_the_file_whose_processed_size_differs(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    files = [write_file(tmp_path, f"r{n}.csv", 1000 + n) for n in range(3)]
    op = batch(hook, [{"patient_id": patient, "file_path": str(p)} for p in files], deferrable=False, **WAIT)
    context = fake_context("manual__1", 1)
    with sandbox_faults(sandbox, corrupt_processed_sizes=1), pytest.raises(ClinikoBatchFinalError):
        op.execute(context)
    results = context["ti"].pushed["return_value"]
    [bad] = [r for r in results if "error" in r]
    assert (
        f"as {bad['size'] + 1} bytes, but {bad['size']} bytes" in bad["error"] and bad["retryable"] is False
    )
    assert [r["verification"] for r in results if "error" not in r] == ["processed", "processed"]
    assert len(attachments(hook, patient)) == 3


def test_deferred_batch_with_verify_content_catches_a_changed_byte(
    hook: ClinikoHook, patient: str, tmp_path: Path, sandbox: Any
) -> None:
    files = [write_file(tmp_path, f"v{n}.csv", 2000 + n, seed=n) for n in range(3)]
    uploads = [{"patient_id": patient, "file_path": str(p)} for p in files]
    op = batch(hook, uploads, deferrable=True, verify="content", **WAIT)
    context = fake_context("manual__1", 1)
    with sandbox_faults(sandbox, corrupt_processed_contents=1, processing_delay=0.5):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)
        trigger = deferred.value.trigger
        expect = trigger.serialize()[1]["expect"]
        assert sorted(item["size"] for item in expect.values()) == [2000, 2001, 2002]
        event = fire(trigger)
    with pytest.raises(ClinikoBatchFinalError):
        op.execute_complete(context, event)
    results = context["ti"].pushed["return_value"]
    [bad] = [r for r in results if "error" in r]
    assert f"has SHA-256 {bad['sha256']}" in bad["error"]
    assert [r["verification"] for r in results if "error" not in r] == ["content", "content"]
    assert len(attachments(hook, patient)) == 3


@pytest.mark.parametrize(
    ("body_size", "max_bytes", "hashed", "counted"),
    [(3000, 3000, 3000, 3000), (3000, 2999, 2999, 3000), (2999, 3000, 2999, 2999), (3000, None, 3000, 3000)],
)
def test_content_is_hashed_to_the_size_and_one_more_byte_tells_it_is_longer(
    stand_ins: Any,
    monkeypatch: pytest.MonkeyPatch,
    body_size: int,
    max_bytes: int | None,
    hashed: int,
    counted: int,
) -> None:
    body = bytes(range(256)) * (body_size // 256) + b"x" * (body_size % 256)
    api = stand_ins(Reply(200, body=body, headers={"Content-Type": "application/pdf"}))
    use(monkeypatch, api)
    sha256, count = ClinikoHook().attachment_digest("42", max_bytes=max_bytes)
    assert (sha256, count) == (hashlib.sha256(body[:hashed]).hexdigest(), counted)
    assert api.seen[0].path == "/v1/patient_attachments/42/content"


def test_a_huge_content_is_never_read_whole(stand_ins: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def endless() -> Any:
        for _ in range(1000):  # 1 GiB if read whole
            yield b"z" * (1024 * 1024)

    use(monkeypatch, stand_ins(Reply(200, body=endless, headers={"Content-Type": "application/pdf"})))
    started = time.monotonic()
    _, count = ClinikoHook().attachment_digest("42", max_bytes=10)
    assert count == 11 and time.monotonic() - started < 10


def test_a_mismatch_event_fails_without_retry() -> None:
    from cliniko_provider.triggers.cliniko import error_event, record_from_event

    event = error_event("42", "mismatch", "Cliniko processed attachment 42 as 5 bytes, but 4 bytes were sent")
    with pytest.raises(ClinikoIntegrityError, match="as 5 bytes, but 4"):
        record_from_event(json.loads(json.dumps(event)))


def test_content_cut_midway_is_retried_then_a_connection_error(
    stand_ins: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cliniko_provider.exceptions import ClinikoConnectionError

    def cut() -> Any:
        yield b"a" * 1000
        raise ConnectionResetError("cut")  # the stand-in drops the connection inside a chunked answer

    api = stand_ins(Reply(200, body=cut, headers={"Content-Type": "application/pdf"}))
    use(monkeypatch, api, timeout=1, max_attempts=2)  # the stand-in leaves the connection hanging
    with pytest.raises(ClinikoConnectionError, match="after 2 attempt"):
        ClinikoHook(sleep=lambda seconds: None).attachment_digest("42", max_bytes=5000)
    assert len(api.seen) == 2  # retried once


def test_the_decorator_takes_verify() -> None:
    from tests.test_decorator import decorated

    assert decorated(wait_for_completion=True, verify="content").verify == "content"
    with pytest.raises(ValueError, match="wait_for_completion=True"):
        decorated(verify="content")
