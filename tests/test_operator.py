"""The upload operator and the hook's upload section against a fake Cliniko + S3 (transport level)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from airflow.providers.common.compat.sdk import AirflowFailException, AirflowSensorTimeout, TaskDeferred

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
from cliniko_provider.protocol.upload import PENDING_POLL, PENDING_WAIT
from cliniko_provider.triggers.cliniko import error_event
from cliniko_provider.utils.idempotency import UploadJournal
from cliniko_provider.utils.s3_form import MultipartBody, join_upload_url
from cliniko_provider.utils.upload import (
    MAX_UPLOAD_BYTES,
    UploadProgress,
    resolve_source,
)
from tests.fake_http import Answer, FakeClock, ScriptedAdapter
from tests.helpers import FakeTaskStateStore, cliniko_connection, fake_context, write_file

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
    record, then answers 500), ``"reset-after"`` (makes it, then the connection breaks). A record is
    processed once a list answer has shown it ``list_views_until_processed`` times (never if None).
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
        self.list_views_until_processed: int | None = 0
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
        if match := re.fullmatch(r"/patient_attachments/(\w+)/content", path):
            record = self.records[match[1]]
            assert record["processing_completed"], "content is served once processed"
            return Answer(200, self.data_of(record))
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
        filename = re.search(rb'filename="([^"]*)"', raw)  # browsers' form: '"' sent as %22, no escapes
        assert key_template and filename
        name = filename[1].decode()
        data = raw.split(b"\r\n\r\n")[-1].rsplit(b"\r\n--", 1)[0]
        key = key_template[1].decode().replace("${filename}", name)
        self.uploads.append((name, data, key))
        xml = (
            f"<PostResponse><Location>{BUCKET}{key.replace('/', '%2F')}</Location><Bucket>b</Bucket>"
            f'<Key>{key}</Key><ETag>"e"</ETag></PostResponse>'
        )
        return Answer(201, xml)

    def listing(self, patient_id: str, filters: list[str]) -> Answer:
        def matches(record: JsonDict, item: str) -> bool:
            rest = item.partition(":")[2]
            description = record["description"] or ""
            if item.startswith("description:~"):
                return rest[1:] in description
            if item.startswith("description:="):
                return rest[1:] == description
            if item.startswith("id:="):
                return record["id"] in rest[1:].split(",")
            if item.startswith("created_at:>="):
                return bool(record["created_at"] >= rest[2:])
            raise AssertionError(f"unexpected filter {item}")

        found = [
            record
            for record in self.records.values()
            if record["patient_id"] == patient_id
            and not record["archived_at"]
            and all(matches(record, item) for item in filters)
        ]
        for record in found:
            record["views"] = record.get("views", 0) + 1
            if (
                self.list_views_until_processed is not None
                and record["views"] > self.list_views_until_processed
            ):
                self.process(record)
        shown = [{k: v for k, v in record.items() if k != "views"} for record in found]
        return Answer(200, {"patient_attachments": shown, "total_entries": len(found), "links": {}})

    def data_of(self, record: JsonDict) -> bytes:
        return next(data for _, data, key in self.uploads if record["upload_url"] == BUCKET + key)

    def process(self, record: JsonDict) -> None:
        if not record["processing_completed"] and record["upload_url"]:
            record["processing_completed"] = True
            record["filename"] = next(n for n, _, k in self.uploads if record["upload_url"] == BUCKET + k)
            record["size"] = len(self.data_of(record))

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
            "size": None,
            "created_at": "2026-01-01T00:00:00Z",
            "patient": {"links": {"self": f"{BASE}/patients/{body['patient_id']}"}},
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
            self.process(record)
        return Answer(200, {k: v for k, v in record.items() if k != "views"})

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
    ctx = context()
    op = operator(hook, file_path=str(report), description=" Nightly  report ")
    record = op.execute(ctx)
    assert fake.paths() == [  # a first try asks nothing more than the three steps
        "GET /v1/user",  # once per key and process: whose rate budget the key draws on
        "GET /v1/patients/42/attachment_presigned_post",
        "POST /",
        "POST /v1/patient_attachments",
    ]
    ((name, data, key),) = fake.uploads
    assert (name, data) == ("report.pdf", report.read_bytes())
    assert record["upload_url"] == BUCKET + key  # url + Key: not Location, no doubled slash
    assert record["description"] == " Nightly  report "  # exactly as given
    upload = ctx["ti"].pushed["cliniko_upload"]
    assert upload["attachment_id"] == record["id"] and upload["reused"] is False
    from cliniko_provider.links.cliniko import ClinikoAttachmentsLink

    link = ClinikoAttachmentsLink().get_link(op, ti_key=ctx["ti"])
    assert link == f"{hook.settings.base_url}/patient_attachments/{record['id']}"


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
        "audit_path",
        "verify",
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


# --- idempotency ---------------------------------------------------------------------------------


@pytest.fixture
def forget_journal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], None]:
    """Act as another worker: one whose private journal holds nothing of earlier tries."""

    def forget() -> None:
        monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "other-worker"))

    return forget


def test_a_retry_on_the_same_worker_reuses_the_recorded_attachment_with_one_get(
    hook: ClinikoHook, fake: FakeCliniko, report: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = operator(hook, file_path=str(report)).execute(context())
    before = len(fake.requests)
    ctx = context(try_number=2)
    again = operator(hook, file_path=str(report)).execute(ctx)
    assert again["id"] == first["id"]
    assert fake.paths()[before:] == [f"GET /v1/patient_attachments/{first['id']}"]
    assert len(fake.records) == 1 and len(fake.uploads) == 1
    assert ctx["ti"].pushed["cliniko_upload"] == {
        "attachment_id": first["id"],
        "reused": True,
        "reason": f"this worker recorded attachment {first['id']} as this upload",
        "identity": ctx["ti"].pushed["cliniko_upload"]["identity"],
        "sha256": hashlib.sha256(report.read_bytes()).hexdigest(),  # as the first try recorded it
        "md5": None,  # nothing sent
        "verification": "none",
        "filename": report.name,
        "size": report.stat().st_size,
    }
    assert (
        f"reusing attachment {first['id']} of patient 42, because this worker recorded"
        in capsys.readouterr().out
    )


def test_a_retry_on_another_worker_recognises_its_upload_by_description_and_content(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    forget_journal: Callable[[], None],
) -> None:
    first = operator(hook, file_path=str(report), description="Nightly").execute(context())
    forget_journal()
    before = len(fake.requests)
    ctx = context(try_number=2)
    again = operator(hook, file_path=str(report), description="Nightly").execute(ctx)
    assert again["id"] == first["id"] and len(fake.uploads) == 1
    assert fake.paths()[before:] == [
        "GET /v1/patients/42/patient_attachments",
        f"GET /v1/patient_attachments/{first['id']}/content",
    ]
    listing = parse_qs(urlsplit(str(fake.requests[before].url)).query)["q[]"]
    assert listing == ["description:=Nightly"]
    assert "same description" not in ctx["ti"].pushed["cliniko_upload"]["reason"]
    assert "has this description, file name, size and content" in ctx["ti"].pushed["cliniko_upload"]["reason"]


def test_same_name_and_size_with_other_bytes_is_another_upload(
    hook: ClinikoHook,
    fake: FakeCliniko,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    forget_journal: Callable[[], None],
) -> None:
    (tmp_path / "2026-01").mkdir()
    (tmp_path / "2026-02").mkdir()
    a = write_file(tmp_path / "2026-01", "summary.csv", 300, seed=1)
    b = write_file(tmp_path / "2026-02", "summary.csv", 300, seed=2)
    first = operator(hook, file_path=str(a), description="Summary").execute(fake_context(map_index=0))
    forget_journal()  # the worst case: nothing remembered locally
    second = operator(hook, file_path=str(b), description="Summary").execute(
        fake_context(map_index=1, try_number=2)
    )
    assert second["id"] != first["id"]
    assert [data for _, data, _ in fake.uploads] == [a.read_bytes(), b.read_bytes()]


def test_a_regenerated_file_is_uploaded_again_and_the_log_says_why(
    hook: ClinikoHook, fake: FakeCliniko, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_file(tmp_path, "r.csv", 100, seed=1)
    first = operator(hook, file_path=str(path), description="R").execute(context())
    write_file(tmp_path, "r.csv", 100, seed=2)
    second = operator(hook, file_path=str(path), description="R").execute(context(try_number=2))
    assert second["id"] != first["id"] and len(fake.uploads) == 2
    assert (
        "1 with this name and size, none with this file's content (the file changed since"
        in capsys.readouterr().out
    )


def test_the_next_run_uploads_a_new_attachment(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    operator(hook, file_path=str(report)).execute(context("run-1"))
    operator(hook, file_path=str(report)).execute(context("run-2"))
    assert len(fake.records) == 2


def test_an_explicit_idempotency_key_spans_runs(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    for run in ("run-1", "run-2"):
        operator(hook, file_path=str(report), idempotency_key="report-7", look_for_existing="always").execute(
            context(run)
        )
    assert len(fake.records) == 1
    assert fake.records["1000"]["description"] is None  # nothing added to the description


def test_always_looks_on_a_first_try_too(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    operator(hook, file_path=str(report), look_for_existing="always").execute(context())
    assert fake.paths()[:2] == ["GET /v1/user", "GET /v1/patients/42/patient_attachments"]


def test_look_for_existing_is_checked() -> None:
    with pytest.raises(ValueError, match="'always' or 'on_retry'"):
        ClinikoAttachmentUploadOperator(task_id="t", patient_id=1, file_path="x", look_for_existing="never")  # type: ignore[arg-type]


def test_a_failure_leaves_its_reason_in_xcom(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    fake.patients.clear()
    ctx = context()
    with pytest.raises(Exception, match="no such patient") as error:
        operator(hook, file_path=str(report)).execute(ctx)
    assert ctx["ti"].pushed == {"cliniko_error": str(error.value)}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"patient_id": "abc"}, "patient_id must be"),
        ({"file_path": "/no/such/file.pdf"}, "no such file"),
        ({"filename": "a\u202eb.pdf"}, "U+202E"),
        ({"description": "x" * 256}, "description is 256 characters"),
    ],
)
def test_input_errors_leave_a_one_line_reason_in_xcom(
    hook: ClinikoHook, fake: FakeCliniko, report: Path, kwargs: dict[str, str], expected: str
) -> None:
    ctx = context()
    op = ClinikoAttachmentUploadOperator(
        task_id="upload", **{"patient_id": PATIENT, "file_path": str(report), **kwargs}
    )
    op.hook = hook
    with pytest.raises(AirflowFailException):
        op.execute(ctx)
    reason = ctx["ti"].pushed["cliniko_error"]
    assert expected in reason and "\n" not in reason
    assert fake.requests == []


def test_another_file_size_is_another_upload(hook: ClinikoHook, fake: FakeCliniko, tmp_path: Path) -> None:
    operator(hook, file_path=str(write_file(tmp_path, "r.csv", 10))).execute(context())
    operator(hook, file_path=str(write_file(tmp_path, "r.csv", 11))).execute(context(try_number=2))
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


def test_a_lost_create_waits_for_processing_before_comparing(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, report: Path
) -> None:
    fake.create_script = ["500-after"]
    fake.list_views_until_processed = 1
    record = operator(hook, file_path=str(report), description="D").execute(context())
    assert list(fake.records) == [record["id"]]
    assert clock.sleeps == [PENDING_POLL]
    assert f"GET /v1/patient_attachments/{record['id']}/content" in fake.paths()


def test_a_candidate_that_never_finishes_processing_fails_retryably_without_uploading(
    hook: ClinikoHook,
    fake: FakeCliniko,
    clock: FakeClock,
    report: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    forget_journal: Callable[[], None],
) -> None:
    fake.list_views_until_processed = None
    fake.gets_until_processed = 10**9
    operator(hook, file_path=str(report), description="D").execute(context())
    forget_journal()
    with pytest.raises(ClinikoError, match="still being processed after 300 s") as caught:
        operator(hook, file_path=str(report), description="D").execute(context(try_number=2))
    assert not isinstance(caught.value, AirflowFailException)
    assert len(fake.uploads) == 1 and sum(clock.sleeps) == PENDING_WAIT


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
    second = operator(hook, file_path=str(report)).execute(context(try_number=2))
    assert second["id"] != first["id"]


def test_a_tampered_journal_entry_is_ignored(
    hook: ClinikoHook, fake: FakeCliniko, report: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = operator(hook, file_path=str(report), description="D").execute(context())
    (entry,) = UploadJournal(KEY).directory.glob("*.json")
    data = json.loads(entry.read_text())
    data["payload"] = data["payload"].replace(first["id"], "999")
    entry.write_text(json.dumps(data))
    assert oct(UploadJournal(KEY).directory.stat().st_mode & 0o777) == "0o700"
    again = operator(hook, file_path=str(report), description="D").execute(context(try_number=2))
    assert again["id"] == first["id"]
    assert "GET /v1/patient_attachments/999" not in fake.paths()
    assert "GET /v1/patients/42/patient_attachments" in fake.paths()  # fell back to asking Cliniko


def test_the_opt_in_marker_is_visible_and_found(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    forget_journal: Callable[[], None],
) -> None:
    first = operator(hook, file_path=str(report), description="Same", description_marker=True).execute(
        context()
    )
    assert re.fullmatch(r"Same \[ref:[0-9a-f]{12}\]", first["description"])
    forget_journal()
    again = operator(hook, file_path=str(report), description="Same", description_marker=True).execute(
        context(try_number=2)
    )
    assert again["id"] == first["id"]
    assert "content" not in " ".join(fake.paths())  # the marker is evidence enough


def test_the_marker_leaves_236_characters_for_the_description(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    operator(hook, file_path=str(report), description="x" * 236, description_marker=True).execute(context())
    with pytest.raises(ClinikoInputError, match="leaves 236"):
        operator(hook, file_path=str(report), description="x" * 237, description_marker=True).execute(
            context()
        )


def test_a_description_merely_containing_the_hex_is_not_a_match(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    forget_journal: Callable[[], None],
) -> None:
    first = operator(hook, file_path=str(report), description_marker=True).execute(context())
    hex_only = first["description"][5:-1]
    fake.records["999"] = {**fake.records[first["id"]], "id": "999", "description": f"see {hex_only}"}
    fake.records.pop(first["id"])
    forget_journal()
    record = operator(hook, file_path=str(report), description_marker=True).execute(context(try_number=2))
    assert record["id"] not in ("999", first["id"])


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
        ({"description": "x" * 256}, "description is 256 characters long; Cliniko takes at most 255"),
        ({"filename": "a/b.pdf"}, "S3 would cut the name"),
        ({"filename": "a\nb.pdf"}, r"holds U\+000A \(a control character\)"),
        ({"filename": ".."}, "is a path step, not a file name"),
        ({"filename": "."}, "is a path step, not a file name"),
        ({"filename": "invoice\u202efdp.exe"}, r"holds U\+202E \(RIGHT-TO-LEFT OVERRIDE\)"),
        ({"filename": "a\u2028b.pdf"}, r"holds U\+2028 \(LINE SEPARATOR\)"),
        ({"filename": "a\x85b.pdf"}, r"holds U\+0085"),
        ({"filename": "a\u200bb.pdf"}, r"holds U\+200B \(ZERO WIDTH SPACE\)"),
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


def test_description_of_255_characters_fits_exactly(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    record = operator(hook, file_path=str(report), description="x" * 255).execute(context())
    assert record["description"] == "x" * 255


def test_unknown_patient_is_a_clear_error(hook: ClinikoHook, fake: FakeCliniko, report: Path) -> None:
    op = operator(hook, file_path=str(report))
    op.patient_id = "777"
    with pytest.raises(ClinikoInputError, match="patient_id 777: Cliniko has no such patient") as caught:
        op.execute(context())
    assert isinstance(caught.value, AirflowFailException)
    assert fake.uploads == [] and fake.paths() == [
        "GET /v1/user",
        "GET /v1/patients/777/attachment_presigned_post",
    ]


def test_full_storage_fails_without_retry_or_upload(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    fake.storage_full = True
    with pytest.raises(ClinikoStorageLimitError, match="storage limit") as caught:
        operator(hook, file_path=str(report)).execute(context())
    assert isinstance(caught.value, AirflowFailException)
    assert fake.uploads == [] and fake.records == {}


def test_bad_api_key_fails_without_retry(hook: ClinikoHook, report: Path, clock: FakeClock) -> None:
    refusing = ScriptedAdapter(route=lambda request: Answer(401, "HTTP Basic: Access denied."), user=None)
    hook.session.mount("https://", refusing)
    with pytest.raises(ClinikoAuthError, match=r"Access denied.*API key"):
        operator(hook, file_path=str(report)).execute(context())
    # the look-up of the key's user fails (its own budget then serves), then the presign: no retry
    sent = [f"{r.method} {urlsplit(str(r.url)).path}" for r in refusing.requests]
    assert sent == ["GET /v1/user", "GET /v1/patients/42/attachment_presigned_post"] and clock.sleeps == []


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


# --- look-up rules and durable state (issue 18) ----------------------------------------------------------


def durable_context(store: FakeTaskStateStore, try_number: int = 1) -> Any:
    from datetime import datetime, timezone
    from types import SimpleNamespace

    ctx = context(try_number=try_number)
    ctx["task_state_store"] = store
    ctx["dag_run"] = SimpleNamespace(run_after=datetime(2023, 11, 14, tzinfo=timezone.utc), start_date=None)
    return ctx


def test_a_first_try_with_always_is_not_held_by_another_files_upload_still_processing(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, tmp_path: Path
) -> None:
    fake.list_views_until_processed = None
    fake.gets_until_processed = 10**9
    a = write_file(tmp_path, "a.pdf", 100, seed=1)
    b = write_file(tmp_path, "b.pdf", 200, seed=2)
    operator(hook, file_path=str(a), description="D").execute(context())
    kwargs: Any = {"description": "D", "look_for_existing": "always", "idempotency_key": "k-b"}
    record = operator(hook, file_path=str(b), **kwargs).execute(context())
    assert clock.sleeps == [] and len(fake.records) == 2 and record["id"] != "1000"


def test_a_retry_reuses_its_ready_upload_at_once_beside_another_still_processing(
    hook: ClinikoHook, fake: FakeCliniko, clock: FakeClock, tmp_path: Path, forget_journal: Callable[[], None]
) -> None:
    a = write_file(tmp_path, "a.pdf", 100, seed=1)
    b = write_file(tmp_path, "b.pdf", 200, seed=2)
    first_b = operator(hook, file_path=str(b), description="D").execute(context())
    fake.records[first_b["id"]]["created_at"] = "2026-01-01T00:00:01Z"
    fake.process(fake.records[first_b["id"]])
    fake.list_views_until_processed = None
    fake.gets_until_processed = 10**9
    operator(hook, file_path=str(a), description="D").execute(context())
    forget_journal()
    again = operator(hook, file_path=str(b), description="D").execute(context(try_number=2))
    assert again["id"] == first_b["id"] and clock.sleeps == [] and len(fake.records) == 2


def test_content_is_read_once_per_candidate_and_never_beyond_the_records_size(
    hook: ClinikoHook, fake: FakeCliniko, tmp_path: Path, forget_journal: Callable[[], None]
) -> None:
    from cliniko_provider.protocol.upload import UploadProtocol
    from cliniko_provider.utils.idempotency import upload_identity
    from cliniko_provider.utils.upload import resolve_source

    path = write_file(tmp_path, "r.pdf", 300, seed=3)
    record = operator(hook, file_path=str(path), description="D").execute(context())
    fake.process(fake.records[record["id"]])
    forget_journal()
    (tmp_path / "other").mkdir()
    other = resolve_source(str(write_file(tmp_path / "other", "r.pdf", 300, seed=4)))
    source = resolve_source(str(path))
    protocol = UploadProtocol(hook, context(try_number=2))

    def identity(key: str, content: str) -> Any:
        return upload_identity(context(), PATIENT, "r.pdf", "D", content, idempotency_key=key)

    # Same name, size and description: the other file's look-up reads the record's content, this one's
    # reuses that reading; once taken, the record is no third identity's.
    assert protocol.find_earlier_upload(identity("other", other.content), other) is None
    assert protocol.find_earlier_upload(identity("mine", source.content), source) is not None
    assert protocol.find_earlier_upload(identity("third", source.content), source) is None
    assert fake.paths().count(f"GET /v1/patient_attachments/{record['id']}/content") == 1
    hook.settings  # noqa: B018
    data = fake.data_of(fake.records[record["id"]])
    fake.uploads = [(n, d + b"trailing bytes never read", k) for n, d, k in fake.uploads]
    import hashlib

    assert hook.attachment_sha256(record["id"], max_bytes=300) == hashlib.sha256(data).hexdigest()


def test_on_the_task_state_store_a_retry_on_another_worker_asks_one_get_and_reads_no_content(
    hook: ClinikoHook, fake: FakeCliniko, report: Path, forget_journal: Callable[[], None]
) -> None:
    store = FakeTaskStateStore()
    first = operator(hook, file_path=str(report), description="D").execute(durable_context(store))
    (facts,) = store.values.values()
    assert facts["attachment_id"] == first["id"] and len(facts["sha256"]) == 64 and facts["create_sent_at"]
    forget_journal()
    before = len(fake.requests)
    again = operator(hook, file_path=str(report), description="D").execute(durable_context(store, 2))
    assert again["id"] == first["id"]
    assert fake.paths()[before:] == [f"GET /v1/patient_attachments/{first['id']}"]


def test_on_the_task_state_store_no_create_sent_means_no_look_up(
    hook: ClinikoHook, fake: FakeCliniko, report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FakeTaskStateStore()
    monkeypatch.setattr(ClinikoHook, "create_attachment", crash := _crash)
    with pytest.raises(RuntimeError, match="crash"):
        operator(hook, file_path=str(report), description="D").execute(durable_context(store))
    monkeypatch.undo()
    (facts,) = store.values.values()
    facts.pop("create_sent_at")  # as a try that crashed after S3, before sending the create, leaves it
    before = len(fake.requests)
    operator(hook, file_path=str(report), description="D").execute(durable_context(store, 2))
    assert "GET /v1/patients/42/patient_attachments" not in fake.paths()[before:]
    assert crash is _crash and len(fake.records) == 1


def test_a_state_store_that_cannot_record_leaves_the_progress_to_the_journal(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    store = FakeTaskStateStore(works_for=0)
    first = operator(hook, file_path=str(report)).execute(durable_context(store))
    assert store.values == {} and len(fake.records) == 1
    fake.process(fake.records[first["id"]])
    again = operator(hook, file_path=str(report)).execute(durable_context(store, 2))
    assert again["id"] == first["id"] and len(fake.records) == 1  # found in Cliniko: no duplicate


def test_a_state_store_that_took_the_sha256_but_not_the_create_mark_stops_before_the_create(
    hook: ClinikoHook, fake: FakeCliniko, report: Path
) -> None:
    with pytest.raises(RuntimeError, match="unreachable"):
        operator(hook, file_path=str(report)).execute(durable_context(FakeTaskStateStore(works_for=1)))
    assert fake.records == {} and "POST /v1/patient_attachments" not in fake.paths()


def _crash(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("crash")


@pytest.mark.parametrize(
    ("moment", "bound"),
    [
        ("2026-01-01T00:10:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T10:10:00+10:00", "2026-01-01T00:00:00Z"),
        ("2026-01-01T00:10:00", None),  # no zone: not trusted
        ("yesterday", None),
        (None, None),
        (1_700_000_000, None),
    ],
)
def test_the_look_up_starts_ten_minutes_before_the_create_was_sent(moment: object, bound: str | None) -> None:
    from cliniko_provider.protocol.upload import created_bound

    assert created_bound(moment) == bound


def test_progress_times_and_sizes_read_as_recorded() -> None:
    from cliniko_provider.protocol.upload import TaskStateProgress, _now_iso

    assert _now_iso(1_700_000_000.9) == "2023-11-14T22:13:20Z"
    store = FakeTaskStateStore()
    store.values["cliniko-upload:k1"] = {"identity": "k2", "attachment_id": "9"}  # another's entry
    store.values["cliniko-upload:k3"] = ["not", "a", "dict"]
    progress = TaskStateProgress(store)
    assert progress.read("k1") == {} and progress.read("k3") == {} and progress.read("k4") == {}
    progress.write("k4", sha256="ab")
    progress.write("k4", attachment_id="7")
    assert store.values == {
        **store.values,
        "cliniko-upload:k4": {"identity": "k4", "sha256": "ab", "attachment_id": "7"},
    }
