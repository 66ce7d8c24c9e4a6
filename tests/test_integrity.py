"""Integrity checks: S3's ETag against the MD5 streamed, the processed record, and verify="content".

The pure checks are unit-tested at their edges; every behaviour a user relies on is also proven against
the running sandbox, whose fault switches corrupt a stored object, a processed size or processed bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.exceptions import ClinikoIntegrityError, S3IntegrityError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator
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
    assert check_verify("content", True) == "content"
    with pytest.raises(ValueError, match="wait_for_completion=True"):
        check_verify("content", False)
    for bad in ("contents", "etag", True, ""):
        with pytest.raises(ValueError, match="None or 'content'"):
            check_verify(bad, True)


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
