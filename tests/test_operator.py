"""The upload operator and the hook's upload section against a fake Cliniko + S3 (transport level)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, TaskDeferred

from cliniko_provider.exceptions import (
    ClinikoAuthError,
    ClinikoError,
    ClinikoInputError,
    ClinikoServerError,
    ClinikoStorageLimitError,
    S3UploadError,
    S3UploadRejectedError,
)
from cliniko_provider.hooks.cliniko import PRESIGN_REFRESHES, ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator
from cliniko_provider.triggers.cliniko import error_event
from cliniko_provider.utils.s3_form import MultipartBody, join_upload_url
from cliniko_provider.utils.upload import (
    MAX_UPLOAD_BYTES,
    UploadProgress,
    idempotency_marker,
    resolve_source,
)
from tests.fake_http import Answer, FakeClock, ScriptedAdapter
from tests.helpers import cliniko_connection, fake_context, write_file

KEY = "UpLoAdTeStSeCrEt-au1"
BASE = "https://api.au1.cliniko.com/v1"
BUCKET = "https://fake-bucket.s3.amazonaws.com/"
PATIENT = "42"
POLICY = "UE9MSUNZLVNFQ1JFVC1WQUxVRQ=="
SIGNATURE = "feedfacecafebeef0123456789"
JsonDict = dict[str, Any]


def s3_xml_error(code: str, message: str) -> str:
    return f"<?xml version='1.0'?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"


class FakeCliniko:
    """A fake Cliniko API and S3 bucket, strict about what the upload sends.

    ``s3_script`` and ``create_script`` are consumed one entry per S3 POST / create; when empty, the call
    succeeds. Create entries: ``"ok"``, ``"500"`` (fails, nothing made), ``"500-after"`` (makes the
    record, then answers 500), ``"reset-after"`` (makes it, then the connection breaks).
    """

    def __init__(self) -> None:
        self.patients = {PATIENT}
        self.records: dict[str, JsonDict] = {}
        self.presigns: list[str] = []
        self.s3_script: list[Answer] = []
        self.create_script: list[str] = []
        self.uploads: list[tuple[str, bytes, str]] = []  # (filename, data, key)
        self.storage_full = False
        self.gets_until_processed = 1
        self.adapter = ScriptedAdapter(route=self.route)
        self._gets: dict[str, int] = {}

    @property
    def requests(self) -> list[requests.PreparedRequest]:
        return self.adapter.requests

    def route(self, request: requests.PreparedRequest) -> Answer:
        url = str(request.url)
        if url.startswith(BUCKET):
            return self.s3_post(request)
        assert request.headers["Authorization"].startswith("Basic ")
        path = urlsplit(url).path.removeprefix("/v1")
        query = parse_qs(urlsplit(url).query)
        if match := re.fullmatch(r"/patients/(\w+)/attachment_presigned_post", path):
            return self.presign(match[1])
        if match := re.fullmatch(r"/patients/(\w+)/patient_attachments", path):
            if match[1] not in self.patients:
                return Answer(404, {"message": "Not found"})
            return self.listing(match[1], query.get("q[]", []))
        if path == "/patient_attachments" and request.method == "POST":
            return self.create(request)
        if match := re.fullmatch(r"/patient_attachments/(\w+)", path):
            return self.get(match[1])
        raise AssertionError(f"unexpected request {request.method} {url}")

    def presign(self, patient_id: str) -> Answer:
        if patient_id not in self.patients:
            return Answer(404, {"message": "Not found"})
        if self.storage_full:
            return Answer(
                422, {"message": "Validation Failed", "errors": {"base": "File storage limit reached"}}
            )
        self.presigns.append(f"{patient_id}/temp/p{len(self.presigns)}")
        fields = {
            "key": f"1/patients/{self.presigns[-1]}/${{filename}}",
            "policy": POLICY,
            "x-amz-credential": "AKIA/20260101/ap-southeast-2/s3/aws4_request",
            "x-amz-signature": SIGNATURE,
            "x-amz-algorithm": "AWS4-HMAC-SHA256",
            "x-amz-date": "20260101T000000Z",
            "success_action_status": "201",
            "acl": "private",
        }
        return Answer(200, {"url": BUCKET, "fields": fields})

    def s3_post(self, request: requests.PreparedRequest) -> Answer:
        body = request.body
        assert isinstance(body, MultipartBody), "the upload must stream, not build the body in memory"
        assert "Authorization" not in request.headers, "Cliniko's key must never go to S3"
        assert "Transfer-Encoding" not in request.headers
        raw = b"".join(body)
        assert request.headers["Content-Length"] == str(len(raw))
        if self.s3_script:
            return self.s3_script.pop(0)
        names = re.findall(rb'; name="([^"]+)"', raw)
        assert names[-1] == b"file" and names[0] == b"key", names
        key_template = re.search(rb'name="key"\r\n\r\n([^\r]*)\r\n', raw)
        filename = re.search(rb'filename="((?:[^"\\]|\\.)*)"', raw)
        assert key_template and filename
        name = re.sub(r"\\(.)", r"\1", filename[1].decode())
        data = raw.split(b"\r\n\r\n")[-1].rsplit(b"\r\n--", 1)[0]
        key = key_template[1].decode().replace("${filename}", name)
        self.uploads.append((name, data, key))
        xml = (
            f"<PostResponse><Location>{BUCKET}{key.replace('/', '%2F')}</Location><Bucket>b</Bucket>"
            f'<Key>{key}</Key><ETag>"e"</ETag></PostResponse>'
        )
        return Answer(201, xml)

    def listing(self, patient_id: str, filters: list[str]) -> Answer:
        found = [
            record
            for record in self.records.values()
            if record["patient_id"] == patient_id
            and not record["archived_at"]
            and all(
                item.startswith("description:~") and item.split("~", 1)[1] in (record["description"] or "")
                for item in filters
            )
        ]
        return Answer(200, {"patient_attachments": found, "total_entries": len(found), "links": {}})

    def create(self, request: requests.PreparedRequest) -> Answer:
        import json

        body = json.loads(request.body or b"{}")
        assert body["upload_url"].startswith(BUCKET) and "//" not in body["upload_url"].removeprefix(
            "https://"
        )
        assert any(body["upload_url"] == BUCKET + key for _, _, key in self.uploads), body["upload_url"]
        step = self.create_script.pop(0) if self.create_script else "ok"
        if step == "500":
            return Answer(500, {"message": "Internal Server Error"})
        record_id = str(1000 + len(self.records))
        self.records[record_id] = {
            "id": record_id,
            "patient_id": body["patient_id"],
            "description": body.get("description"),
            "upload_url": body["upload_url"],
            "archived_at": None,
            "processing_completed": False,
            "filename": None,
        }
        if step == "500-after":
            return Answer(502, "<html>Bad Gateway</html>")
        if step == "reset-after":
            return Answer(raise_error=requests.ConnectionError(ConnectionResetError(104, "reset by peer")))
        return Answer(201, self.records[record_id])

    def get(self, record_id: str) -> Answer:
        record = self.records[record_id]
        self._gets[record_id] = self._gets.get(record_id, 0) + 1
        if self._gets[record_id] > self.gets_until_processed:
            record["processing_completed"] = True
            record["filename"] = next(n for n, _, k in self.uploads if record["upload_url"].endswith(k))
        return Answer(200, record)

    def paths(self) -> list[str]:
        return [f"{r.method} {urlsplit(str(r.url)).path}" for r in self.requests]


@pytest.fixture(autouse=True)
def _connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with cliniko_connection(monkeypatch, KEY):
        yield


@pytest.fixture
def fake() -> FakeCliniko:
    return FakeCliniko()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hook(fake: FakeCliniko, clock: FakeClock) -> ClinikoHook:
    hook = ClinikoHook(sleep=clock.sleep, clock=clock, rand=lambda: 0.5)
    hook.session.mount("https://", fake.adapter)
    hook.s3_session.mount("https://", fake.adapter)
    return hook


def context(run_id: str = "scheduled__2026-01-01", try_number: int = 1) -> Any:
    return fake_context(run_id, try_number)


def operator(hook: ClinikoHook, **kwargs: Any) -> ClinikoAttachmentUploadOperator:
    op = ClinikoAttachmentUploadOperator(task_id="upload", patient_id=PATIENT, **kwargs)
    op.hook = hook
    return op


@pytest.fixture
def report(tmp_path: Path) -> Path:
    return write_file(tmp_path, "report.pdf", 5000)


# --- the happy path --------------------------------------------------------------------------------


def test_three_steps_and_the_record_is_returned(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    record = operator(hook, file_path=str(report), description="Nightly").execute(context())
    assert fake.paths() == [
        "GET /v1/patients/42/patient_attachments",
        "GET /v1/patients/42/attachment_presigned_post",
        "POST /",
        "POST /v1/patient_attachments",
    ]
    ((name, data, key),) = fake.uploads
    assert (name, data) == ("report.pdf", report.read_bytes())
    assert record["upload_url"] == BUCKET + key  # url + Key: not Location, no doubled slash
    assert re.fullmatch(r"Nightly \[ref:[0-9a-f]{12}\]", record["description"])


def test_filename_overrides_the_base_name(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    operator(hook, file_path=str(report), filename="Résumé #1 & co.pdf").execute(context())
    assert fake.uploads[0][0] == "Résumé #1 & co.pdf"


def test_user_facing_arguments_are_templated() -> None:
    assert set(ClinikoAttachmentUploadOperator.template_fields) == {
        "patient_id",
        "file_path",
        "filename",
        "description",
        "idempotency_key",
    }


@pytest.mark.parametrize(
    ("url", "key", "expected"),
    [
        ("https://b.s3.amazonaws.com/", "1/temp/a b.pdf", "https://b.s3.amazonaws.com/1/temp/a b.pdf"),
        ("https://b.s3.amazonaws.com/", "/1/a.pdf", "https://b.s3.amazonaws.com/1/a.pdf"),
        ("https://b.s3.amazonaws.com", "1/a.pdf", "https://b.s3.amazonaws.com/1/a.pdf"),
    ],
)
def test_join_upload_url_never_doubles_the_slash(url: str, key: str, expected: str) -> None:
    assert join_upload_url(url, key) == expected


# --- idempotency -----------------------------------------------------------------------------------


def test_a_second_run_of_the_same_task_instance_returns_the_first_record(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    first = operator(hook, file_path=str(report)).execute(context())
    again = operator(hook, file_path=str(report)).execute(context())
    assert again["id"] == first["id"]
    assert len(fake.records) == 1 and len(fake.uploads) == 1


def test_the_next_run_uploads_a_new_attachment(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    operator(hook, file_path=str(report)).execute(context("run-1"))
    operator(hook, file_path=str(report)).execute(context("run-2"))
    assert len(fake.records) == 2


def test_an_explicit_idempotency_key_spans_runs(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    operator(hook, file_path=str(report), idempotency_key="report-7").execute(context("run-1"))
    operator(hook, file_path=str(report), idempotency_key="report-7").execute(context("run-2"))
    assert len(fake.records) == 1
    assert fake.records["1000"]["description"] == idempotency_marker("report-7")


def test_on_retry_skips_the_lookup_on_the_first_try_only(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    first = operator(hook, file_path=str(report), look_for_existing="on_retry").execute(context())
    assert "GET /v1/patients/42/patient_attachments" not in fake.paths()  # one request saved
    before = len(fake.requests)
    again = operator(hook, file_path=str(report), look_for_existing="on_retry").execute(context(try_number=2))
    assert again["id"] == first["id"]
    assert fake.paths()[before:] == ["GET /v1/patients/42/patient_attachments"]
    assert len(fake.records) == 1


def test_look_for_existing_is_checked() -> None:
    with pytest.raises(ValueError, match="'always' or 'on_retry'"):
        ClinikoAttachmentUploadOperator(task_id="t", patient_id=1, file_path="x", look_for_existing="never")  # type: ignore[arg-type]


def test_a_failure_leaves_its_reason_in_xcom(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    fake.patients.clear()
    ctx = context()
    with pytest.raises(Exception, match="no such patient") as error:
        operator(hook, file_path=str(report)).execute(ctx)
    assert ctx["ti"].pushed == {"cliniko_error": str(error.value)}


def test_another_file_size_is_another_upload(hook: ClinikoHook, fake: FakeCliniko, tmp_path: Path) -> None:
    operator(hook, file_path=str(write_file(tmp_path, "r.csv", 10))).execute(context())
    operator(hook, file_path=str(write_file(tmp_path, "r.csv", 11))).execute(context())
    assert len(fake.records) == 2


@pytest.mark.parametrize("failure", ["500-after", "reset-after"])
def test_a_create_that_failed_after_creating_is_found_not_repeated(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, report: Path, failure: str
) -> None:
    fake.create_script = [failure]
    record = operator(hook, file_path=str(report)).execute(context())
    assert list(fake.records) == [record["id"]]
    assert fake.paths().count("POST /v1/patient_attachments") == 1
    assert clock.sleeps == []


def test_a_create_that_failed_without_creating_is_retried(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, report: Path
) -> None:
    fake.create_script = ["500", "500"]
    record = operator(hook, file_path=str(report)).execute(context())
    assert list(fake.records) == [record["id"]]
    assert fake.paths().count("POST /v1/patient_attachments") == 3
    assert clock.sleeps == [0.75, 1.5]  # the shared policy's backoff (rand=0.5)


def test_a_create_that_keeps_failing_fails_retryably(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    fake.create_script = ["500"] * 5
    with pytest.raises(ClinikoServerError) as caught:
        operator(hook, file_path=str(report)).execute(context())
    assert not isinstance(caught.value, AirflowFailException)
    assert fake.records == {}


def test_an_archived_earlier_upload_does_not_count(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    first = operator(hook, file_path=str(report)).execute(context())
    fake.records[first["id"]]["archived_at"] = "2026-01-02T00:00:00Z"
    second = operator(hook, file_path=str(report)).execute(context())
    assert second["id"] != first["id"]


def test_a_description_merely_containing_the_hex_is_not_a_match(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    marker = idempotency_marker("k")
    fake.records["999"] = {
        "id": "999",
        "patient_id": PATIENT,
        "description": f"see {marker[5:-1]}",
        "archived_at": None,
        "upload_url": "",
    }
    record = operator(hook, file_path=str(report), idempotency_key="k").execute(context())
    assert record["id"] != "999"


# --- the S3 step: retries and errors ----------------------------------------------------------------


def test_403_expired_presign_fetches_a_fresh_one(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, report: Path
) -> None:
    fake.s3_script = [
        Answer(403, s3_xml_error("AccessDenied", "Invalid according to Policy: Policy expired."))
    ]
    record = operator(hook, file_path=str(report)).execute(context())
    assert len(fake.presigns) == 2
    assert fake.presigns[1] in record["upload_url"]
    assert clock.sleeps == []


def test_403_again_and_again_fails_with_s3s_code_and_message(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    refusal = Answer(403, s3_xml_error("SignatureDoesNotMatch", "The request signature we calculated..."))
    fake.s3_script = [refusal] * (PRESIGN_REFRESHES + 1)
    with pytest.raises(
        S3UploadRejectedError, match=r"\(403 SignatureDoesNotMatch\): The request signature we calculated"
    ):
        operator(hook, file_path=str(report)).execute(context())
    assert len(fake.presigns) == PRESIGN_REFRESHES + 1
    assert fake.records == {}


@pytest.mark.parametrize(
    "failure",
    [
        Answer(503, s3_xml_error("SlowDown", "Please reduce your request rate.")),
        Answer(500, "<html>oops</html>"),
        Answer(raise_error=requests.ConnectionError(ConnectionResetError(104, "Connection reset by peer"))),
    ],
    ids=["503", "500-html", "reset"],
)
def test_s3_5xx_and_resets_retry_with_the_shared_backoff(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, report: Path, failure: Answer
) -> None:
    fake.s3_script = [failure, failure]
    record = operator(hook, file_path=str(report)).execute(context())
    assert clock.sleeps == [0.75, 1.5]
    assert len(fake.presigns) == 1
    assert record["upload_url"] == BUCKET + fake.uploads[0][2]


def test_s3_5xx_past_the_attempts_fails_retryably(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    fake.s3_script = [Answer(500, s3_xml_error("InternalError", "We encountered an internal error."))] * 5
    with pytest.raises(S3UploadError, match=r"\(500 InternalError\): We encountered") as caught:
        operator(hook, file_path=str(report)).execute(context())
    assert not isinstance(caught.value, AirflowFailException)
    assert fake.records == {}


def test_entity_too_large_fails_at_once(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, report: Path
) -> None:
    fake.s3_script = [Answer(400, s3_xml_error("EntityTooLarge", "Your proposed upload exceeds the maximum"))]
    with pytest.raises(S3UploadRejectedError, match=r"\(400 EntityTooLarge\): Your proposed upload.*storage"):
        operator(hook, file_path=str(report)).execute(context())
    assert clock.sleeps == [] and len(fake.presigns) == 1 and fake.records == {}


def test_presign_secrets_stay_out_of_logs_and_errors(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.s3_script = [Answer(503, s3_xml_error("SlowDown", "slow"))] + [
        Answer(403, s3_xml_error("AccessDenied", "Invalid according to Policy: Policy expired."))
    ] * (PRESIGN_REFRESHES + 1)
    with pytest.raises(S3UploadRejectedError) as caught:
        operator(hook, file_path=str(report)).execute(context())
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err
    assert "S3 upload: 503 (SlowDown: slow) on attempt 1 of 5" in logs  # the logs were captured at all
    for secret in (POLICY, SIGNATURE, KEY):
        assert secret not in logs
        assert secret not in str(caught.value)


# --- bad input: clear, not retried, nothing sent --------------------------------------------------------


def sparse_file(path: Path, size: int) -> Path:
    """A file that claims ``size`` bytes without using the disk (a hole)."""
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.pdf", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: write_file(d, "empty.pdf", 0), r"is empty \(0 bytes\)"),
        (lambda d: sparse_file(d / "huge.bin", MAX_UPLOAD_BYTES + 1), "at most 5 GiB"),
    ],
    ids=["missing", "directory", "empty", "over-5-GiB"],
)
def test_bad_files_are_refused_before_any_request(
    hook: ClinikoHook, fake: FakeCliniko, tmp_path: Path, make: Any, message: str
) -> None:
    with pytest.raises(ClinikoInputError, match=message):
        operator(hook, file_path=str(make(tmp_path))).execute(context())
    assert fake.requests == []


def test_exactly_5_gib_is_allowed(tmp_path: Path) -> None:
    assert resolve_source(sparse_file(tmp_path / "limit.bin", MAX_UPLOAD_BYTES)).size == MAX_UPLOAD_BYTES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patient_id": "abc"}, "patient_id must be a Cliniko numeric id"),
        ({"patient_id": "-1"}, "patient_id must be a Cliniko numeric id"),
        ({"description": "x" * 237}, "which leaves 236. Shorten the description to 236"),
        ({"filename": "a/b.pdf"}, "S3 would cut the name"),
        ({"filename": "a\nb.pdf"}, "control characters"),
        ({"file_path": "nosuchscheme://bucket/a.pdf"}, "Install the Airflow provider"),
        ({"file_path": ""}, "file_path is empty"),
    ],
)
def test_bad_arguments_are_refused_before_any_request(
    hook: ClinikoHook, fake: FakeCliniko, report: Path, kwargs: JsonDict, message: str
) -> None:
    arguments: JsonDict = {"file_path": str(report), **kwargs}
    op = operator(hook, **{k: v for k, v in arguments.items() if k != "patient_id"})
    op.patient_id = arguments.get("patient_id", PATIENT)
    with pytest.raises(ClinikoInputError, match=message):
        op.execute(context())
    assert fake.requests == []


def test_description_of_236_characters_fits(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    record = operator(hook, file_path=str(report), description="x" * 236).execute(context())
    assert len(record["description"]) == 255


def test_unknown_patient_is_a_clear_error(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    op = operator(hook, file_path=str(report))
    op.patient_id = "777"
    with pytest.raises(ClinikoInputError, match="patient_id 777: Cliniko has no such patient") as caught:
        op.execute(context())
    assert isinstance(caught.value, AirflowFailException)
    assert fake.uploads == [] and len(fake.requests) == 1


def test_full_storage_fails_without_retry_or_upload(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    fake.storage_full = True
    with pytest.raises(ClinikoStorageLimitError, match="storage limit") as caught:
        operator(hook, file_path=str(report)).execute(context())
    assert isinstance(caught.value, AirflowFailException)
    assert fake.uploads == [] and fake.records == {}


def test_bad_api_key_fails_without_retry(hook: ClinikoHook, report: Path, clock: FakeClock) -> None:
    refusing = ScriptedAdapter(route=lambda request: Answer(401, "HTTP Basic: Access denied."))
    hook.session.mount("https://", refusing)
    with pytest.raises(ClinikoAuthError, match=r"Access denied.*API key"):
        operator(hook, file_path=str(report)).execute(context())
    assert len(refusing.requests) == 1 and clock.sleeps == []


# --- waiting for processing ---------------------------------------------------------------------------


def test_wait_for_completion_polls_until_processed(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    fake.gets_until_processed = 2
    op = operator(hook, file_path=str(report), wait_for_completion=True, deferrable=False, poll_interval=0)
    record = op.execute(context())
    assert record["processing_completed"] is True and record["filename"] == "report.pdf"
    assert fake.paths().count(f"GET /v1/patient_attachments/{record['id']}") == 3


def test_wait_for_completion_deferrable_defers_to_the_trigger(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    op = operator(hook, file_path=str(report), wait_for_completion=True, deferrable=True, timeout=600)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context())
    trigger = deferred.value.trigger
    classpath, kwargs = trigger.serialize()
    assert classpath.endswith("ProcessingCompletedTrigger")
    assert kwargs["attachment_id"] == "1000" and kwargs["cliniko_conn_id"] == "cliniko_default"
    assert kwargs["deadline"] is not None
    assert KEY not in repr(kwargs)
    assert deferred.value.method_name == "execute_complete"
    processed = {"id": "1000", "processing_completed": True}
    event = {"status": "success", "attachment_id": "1000", "attachment": processed}
    assert op.execute_complete(context(), event) == processed
    with pytest.raises(AirflowSensorTimeout):
        op.execute_complete(context(), {"status": "error", "attachment_id": "1000", "reason": "timeout"})


@pytest.mark.parametrize(("retryable", "fails_without_retry"), [(False, True), (True, False)])
def test_execute_complete_fails_without_retry_when_retrying_cannot_help(
    retryable: bool, fails_without_retry: bool
) -> None:
    op = ClinikoAttachmentUploadOperator(task_id="upload", patient_id=PATIENT, file_path="/x")
    event = error_event("1000", "api_error", "Cliniko answered 401: Access denied", retryable=retryable)
    ctx = fake_context()
    with pytest.raises(ClinikoError, match=r"^Cliniko answered 401: Access denied$") as info:
        op.execute_complete(ctx, event)
    assert isinstance(info.value, AirflowFailException) is fails_without_retry
    assert ctx["ti"].pushed["cliniko_error"] == "Cliniko answered 401: Access denied"


# --- progress -----------------------------------------------------------------------------------------


def test_progress_logs_every_10_percent_or_30_seconds() -> None:
    lines: list[str] = []
    now = [0.0]
    total = 100 * 1024 * 1024
    progress = UploadProgress(total, lambda fmt, *args: lines.append(fmt % args), lambda: now[0])
    for sent in range(1024 * 1024, total + 1, 1024 * 1024):
        now[0] += 0.1
        progress(sent)
    assert len(lines) == 10
    assert lines[0] == "Upload progress: 10.0 MiB of 100.0 MiB (10%) at 10.0 MiB/s"
    assert lines[-1].startswith("Upload progress: 100.0 MiB of 100.0 MiB (100%)")
    lines.clear()
    slow = UploadProgress(total, lambda fmt, *args: lines.append(fmt % args), lambda: now[0])
    for sent in (1024, 2048, 4096):
        now[0] += 31
        slow(sent)
    assert len(lines) == 3  # a line per 30 s even below 10%


def test_small_files_log_no_progress_lines() -> None:
    lines: list[str] = []
    progress = UploadProgress(1024, lambda *args: lines.append("x"), lambda: 0.0)
    progress(1024)
    assert lines == []


def test_file_uri_and_memory_uri_sources(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    attach("memory", fs=MemoryFileSystem())
    ObjectStoragePath("memory://bucket/in memory.csv").write_bytes(b"a,b\n1,2\n")
    memory = resolve_source("memory://bucket/in memory.csv")
    assert (memory.name, memory.size) == ("in memory.csv", 8)
    with memory.opener() as handle:
        assert handle.read() == b"a,b\n1,2\n"
    local = write_file(tmp_path, "a.pdf", 10)
    as_uri = resolve_source(local.as_uri())
    assert (as_uri.name, as_uri.size) == ("a.pdf", 10)
    with pytest.raises(ClinikoInputError, match="no such file"):
        resolve_source("memory://bucket/nothing.csv")
    assert os.path.exists(local)
