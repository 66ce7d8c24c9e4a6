"""The upload protocol on its own (identity, recorded progress, the look-up, create-once), against the fake
Cliniko + S3 of tests/test_operator.py: what a reuse says, which queries a look-up sends, what it reads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cliniko_provider.exceptions import ClinikoInputError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.protocol.upload import TaskStateProgress, UploadProtocol
from cliniko_provider.utils.idempotency import UploadJournal, UploadOutcome, upload_identity
from cliniko_provider.utils.upload import UploadSource, resolve_source
from tests.fake_http import FakeClock
from tests.helpers import FakeTaskStateStore, cliniko_connection, fake_context, write_file
from tests.test_operator import KEY, PATIENT, FakeCliniko, durable_context

JsonDict = dict[str, Any]
SENT_AT = "2023-11-14T22:13:20Z"  # FakeClock's start: when the first try sent its create


@pytest.fixture(autouse=True)
def _connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with cliniko_connection(monkeypatch, KEY):
        yield


@pytest.fixture
def fake() -> FakeCliniko:
    return FakeCliniko()


@pytest.fixture
def hook(fake: FakeCliniko) -> ClinikoHook:
    clock = FakeClock()
    hook = ClinikoHook(sleep=clock.sleep, clock=clock, rand=lambda: 0.5)
    hook.session.mount("https://", fake.adapter)
    hook.s3_session.mount("https://", fake.adapter)
    return hook


@pytest.fixture
def report(tmp_path: Path) -> UploadSource:
    return resolve_source(write_file(tmp_path, "report.pdf", 5000))


def other_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From here on, act as another worker: its journal holds nothing of earlier tries."""
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "other-worker"))


def identity_of(source: UploadSource, description: str = "D", key: str | None = None, ctx: Any = None) -> Any:
    ctx = ctx if ctx is not None else fake_context()
    return upload_identity(ctx, PATIENT, source.name, description, source.content, idempotency_key=key)


def queries(fake: FakeCliniko, since: int = 0) -> list[list[str]]:
    """The ``q[]`` filters of each listing of the patient's attachments, from request ``since`` on."""
    return [
        parse_qs(urlsplit(str(request.url)).query).get("q[]", [])
        for request in fake.requests[since:]
        if urlsplit(str(request.url)).path.endswith(f"/patients/{PATIENT}/patient_attachments")
    ]


def first_upload(
    hook: ClinikoHook, source: UploadSource, identity: Any, ctx: Any = None, **kwargs: Any
) -> Any:
    protocol = UploadProtocol(hook, ctx if ctx is not None else fake_context())
    return protocol.upload_once(
        PATIENT, source, description=identity.description, identity=identity, look_first=False, **kwargs
    )


def sha256_file(source: UploadSource) -> str:
    with source.opener() as stream:
        return hashlib.sha256(stream.read()).hexdigest()


# --- what a reuse says --------------------------------------------------------------------------------------


def test_a_reuse_by_content_names_its_evidence_and_the_files_digest(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    identity = identity_of(report)
    made = first_upload(hook, report, identity)
    assert (made.reused, made.reason) == (False, "uploaded")
    fake.process(fake.records["1000"])
    other_worker(monkeypatch, tmp_path)
    before = len(fake.requests)
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    sha = sha256_file(report)
    assert found == UploadOutcome(
        {k: v for k, v in fake.records["1000"].items() if k != "views"},
        True,
        "attachment 1000 (created 2026-01-01T00:00:00Z) has this description, file name, size and content "
        f"(SHA-256 {sha[:12]}...)",
        sha256=sha,
        verification="content",
    )
    assert queries(fake, before) == [["description:=D"]]


def test_a_reuse_of_the_recorded_attachment_gives_the_recorded_digest_or_none(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    identity = identity_of(report)
    first_upload(hook, report, identity)
    protocol = UploadProtocol(hook, fake_context(try_number=2))
    found = protocol.find_earlier_upload(identity, report)
    assert found is not None and (found.reused, found.reason, found.sha256) == (
        True,
        "this worker recorded attachment 1000 as this upload",
        sha256_file(report),
    )
    journal = UploadJournal(KEY)
    journal.write(identity.key, sha256=None)  # as an entry that holds the attachment id only
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert found is not None and found.record["id"] == "1000" and found.sha256 is None


def test_a_recorded_attachment_is_no_other_identitys_in_the_same_try(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    mine = identity_of(report, key="mine")
    first_upload(hook, report, mine)
    fake.process(fake.records["1000"])
    protocol = UploadProtocol(hook, fake_context(try_number=2))
    assert protocol.find_earlier_upload(mine, report) is not None  # by the journal: one GET
    assert protocol.find_earlier_upload(mine, report) is not None  # and again: it is still mine
    # Same file, description and content under another key: the record is taken.
    assert protocol.find_earlier_upload(identity_of(report, key="theirs"), report) is None
    # Without the claim its content would match (another try knows nothing of this one's claims).
    fresh = UploadProtocol(hook, fake_context(try_number=2))
    assert fresh.find_earlier_upload(identity_of(report, key="theirs"), report) is not None


# --- what a look-up asks ------------------------------------------------------------------------------------


def test_the_look_up_asks_from_ten_minutes_before_the_create_was_sent_not_from_the_run(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    store = FakeTaskStateStore()
    identity = identity_of(report, ctx=durable_context(store))
    assert identity.since is not None  # the run's start (2023-11-14T00:00:00Z)
    first_upload(hook, report, identity, durable_context(store))
    fake.process(fake.records["1000"])
    (facts,) = store.values.values()
    assert facts["create_sent_at"] == SENT_AT
    facts.pop("attachment_id")  # the create was sent, then the try died before recording its answer
    before = len(fake.requests)
    found = UploadProtocol(hook, durable_context(store, 2)).find_earlier_upload(identity, report)
    assert found is not None and found.record["id"] == "1000" and len(fake.records) == 1
    assert queries(fake, before) == [["description:=D", "created_at:>=2023-11-14T22:03:20Z"]]


def test_without_a_recorded_create_the_look_up_asks_from_the_run_less_ten_minutes(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    identity = identity_of(report, ctx=durable_context(FakeTaskStateStore()))
    assert UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report) is None
    assert queries(fake) == [["description:=D", "created_at:>=2023-11-13T23:50:00Z"]]


def test_no_description_asks_for_every_attachment_not_an_empty_description(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    identity = identity_of(report, description="")
    first_upload(hook, report, identity)
    fake.process(fake.records["1000"])
    other_worker(monkeypatch, tmp_path)
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert found is not None and found.record["id"] == "1000"
    assert queries(fake) == [[]]


def test_a_recorded_sha256_spares_reading_the_file_again(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    store = FakeTaskStateStore()
    identity = identity_of(report)
    first_upload(hook, report, identity, durable_context(store))
    fake.process(fake.records["1000"])
    (facts,) = store.values.values()
    facts.pop("attachment_id")
    opened: list[int] = []

    def opener() -> IO[bytes]:
        opened.append(1)
        return report.opener()

    found = UploadProtocol(hook, durable_context(store, 2)).find_earlier_upload(
        identity, replace(report, opener=opener)
    )
    assert found is not None and found.record["id"] == "1000" and opened == []


def test_the_content_compared_is_the_records_size_and_no_more(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    identity = identity_of(report)
    first_upload(hook, report, identity)
    fake.process(fake.records["1000"])
    fake.uploads = [(n, d + b"bytes beyond the record's size", k) for n, d, k in fake.uploads]
    fake.records["1000"]["size"] = report.size
    other_worker(monkeypatch, tmp_path)
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert found is not None and found.record["id"] == "1000"


def test_on_the_task_state_store_no_create_sent_means_no_look_up_and_says_so(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource, capsys: pytest.CaptureFixture[str]
) -> None:
    store = FakeTaskStateStore()
    identity = identity_of(report, ctx=durable_context(store))
    TaskStateProgress(store).write(identity.key, sha256="ab" * 32)
    assert UploadProtocol(hook, durable_context(store, 2)).find_earlier_upload(identity, report) is None
    assert fake.requests == []
    assert (
        f"No earlier upload of report.pdf for patient {PATIENT}: the task state store shows that no earlier "
        "try sent the create [" in capsys.readouterr().out
    )


# --- the opt-in marker --------------------------------------------------------------------------------------


def test_the_marker_look_up_filters_by_its_hex_and_takes_the_oldest_holder(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    identity = identity_of(report, description="Same")
    first_upload(hook, report, identity, description_marker=True)
    record = fake.records.pop("1000")
    # The same marker twice (a duplicate made by hand): newest listed first, ids compared as numbers.
    fake.records["1001"] = {**record, "id": "1001"}
    fake.records["999"] = {**record, "id": "999"}
    other_worker(monkeypatch, tmp_path)
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(
        identity, report, description_marker=True
    )
    assert found is not None
    assert (found.record["id"], found.reused, found.reason, found.sha256) == (
        "999",
        True,
        f"attachment 999's description holds this upload's {identity.marker}",
        None,
    )
    assert queries(fake) == [[f"description:~{identity.marker[5:-1]}"]]


def test_the_marker_mode_reuses_the_recorded_attachment_with_one_get(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    identity = identity_of(report, description="Same")
    first_upload(hook, report, identity, description_marker=True)
    before = len(fake.requests)
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(
        identity, report, description_marker=True
    )
    assert found is not None and found.reason == "this worker recorded attachment 1000 as this upload"
    assert fake.paths()[before:] == ["GET /v1/patient_attachments/1000"]


def test_a_recorded_attachment_whose_description_was_edited_is_not_reused(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    identity = identity_of(report)
    first_upload(hook, report, identity)
    fake.records["1000"]["description"] = "D (edited by the clinic)"
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert found is None and "GET /v1/patient_attachments/1000" in fake.paths()


def test_a_look_up_bound_is_in_utc_on_a_worker_in_another_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from cliniko_provider.protocol.upload import _now_iso, created_bound

    monkeypatch.setenv("TZ", "Australia/Sydney")
    time.tzset()
    try:
        assert created_bound("2026-01-01T10:10:00+10:00") == "2026-01-01T00:00:00Z"
        assert created_bound("2026-01-01T00:10:00Z") == "2026-01-01T00:00:00Z"
        assert _now_iso(1_700_000_000) == SENT_AT  # the create's time is recorded in UTC too
        since = datetime(2026, 1, 1, 10, 10, tzinfo=timezone(timedelta(hours=10)))
        assert replace(identity_of_nothing(), since=since).created_after() == "2026-01-01T00:00:00Z"
    finally:
        monkeypatch.undo()
        time.tzset()


# --- candidates still processing ----------------------------------------------------------------------------


def still_processing_at_first(fake: FakeCliniko) -> None:
    """Records show as processing in listings, and are processed at their second GET."""
    fake.list_views_until_processed = None
    fake.gets_until_processed = 1


def test_a_candidate_processed_while_waited_for_is_hashed_against_the_file(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    still_processing_at_first(fake)
    identity = identity_of(report)
    first_upload(hook, report, identity)
    other_worker(monkeypatch, tmp_path)  # nothing recorded: the file's SHA-256 is computed here
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert found is not None and found.record["id"] == "1000" and found.verification == "content"
    assert found.sha256 == sha256_file(report)


def test_a_candidate_processed_with_other_bytes_is_counted_in_the_log(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    still_processing_at_first(fake)
    identity = identity_of(report)
    first_upload(hook, report, identity)
    fake.uploads = [(n, bytes(len(d)), k) for n, d, k in fake.uploads]  # same name and size, other bytes
    other_worker(monkeypatch, tmp_path)
    capsys.readouterr()
    assert UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report) is None
    assert (
        f"No earlier upload of report.pdf for patient {PATIENT}: 1 attachment(s) with this description since "
        "ever, 1 with this name and size, none with this file's content (the file changed since: "
        "regenerated?) [" in capsys.readouterr().out
    )


# --- upload_attachment --------------------------------------------------------------------------------------


def test_upload_attachment_passes_every_argument_and_returns_the_record(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    identity = identity_of(report, description="Same")
    sent: list[int] = []
    record = UploadProtocol(hook, fake_context()).upload_attachment(
        PATIENT,
        report,
        filename="shown.pdf",
        description="Same",
        identity=identity,
        look_first=False,
        description_marker=True,
        progress=sent.append,
    )
    assert record == {k: v for k, v in fake.records["1000"].items() if k != "views"}
    assert record["description"] == f"Same {identity.marker}"
    assert [name for name, _, _ in fake.uploads] == ["shown.pdf"] and sent and sent[-1] == report.size
    assert fake.paths()[:2] == [
        "GET /v1/user",  # the key's user, once: whose rate budget it draws on
        f"GET /v1/patients/{PATIENT}/attachment_presigned_post",  # look_first=False: no look-up
    ]
    before = len(fake.requests)
    again = UploadProtocol(hook, fake_context(try_number=2)).upload_attachment(
        PATIENT, report, description="Same", identity=identity, description_marker=True
    )
    assert again["id"] == "1000" and fake.paths()[before:] == ["GET /v1/patient_attachments/1000"]
    plain = UploadProtocol(hook).upload_attachment(
        PATIENT, report, description="Other", identity=identity_of(report, "Other"), look_first=False
    )
    assert plain["description"] == "Other"  # no marker unless asked


# --- upload_once and create-once -------------------------------------------------------------------------


def test_an_upload_gives_the_digests_of_what_was_sent_and_records_each_step(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource, capsys: pytest.CaptureFixture[str]
) -> None:
    from cliniko_provider.utils.upload import format_bytes

    identity = identity_of(report)
    made = first_upload(hook, report, identity)
    with report.opener() as stream:
        data = stream.read()
    assert (made.record["id"], made.reused, made.reason) == ("1000", False, "uploaded")
    assert (made.sha256, made.md5) == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
    assert made.verification == "none"  # the fake S3's ETag is no MD5: nothing checked
    assert UploadJournal(KEY).read(identity.key) == {
        "identity": identity.key,
        "sha256": made.sha256,
        "patient_id": PATIENT,
        "create_sent_at": SENT_AT,
        "attachment_id": "1000",
    }
    assert f"Uploading report.pdf ({format_bytes(5000)}) for patient {PATIENT} [" in capsys.readouterr().out


def test_no_description_sends_none(hook: ClinikoHook, fake: FakeCliniko, report: UploadSource) -> None:
    UploadProtocol(hook).upload_once(PATIENT, report)
    (create,) = [
        r for r in fake.requests if r.method == "POST" and str(r.url).endswith("/patient_attachments")
    ]
    assert json.loads(create.body or b"{}").get("description") is None


def test_a_bad_patient_id_is_named(hook: ClinikoHook, fake: FakeCliniko, report: UploadSource) -> None:
    with pytest.raises(ClinikoInputError, match=r"^patient_id must be"):
        UploadProtocol(hook).upload_once("abc", report)
    assert fake.requests == []


def test_a_retry_looks_first_by_default(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = identity_of(report)
    first_upload(hook, report, identity)
    again = UploadProtocol(hook, fake_context(try_number=2)).upload_once(
        PATIENT, report, description="D", identity=identity
    )
    assert again.record["id"] == "1000" and again.reused and len(fake.uploads) == 1
    assert (
        f"Not uploading again: reusing attachment 1000 of patient {PATIENT}, because this worker recorded "
        "attachment 1000 as this upload [" in capsys.readouterr().out
    )


def test_a_lost_create_answer_is_found_by_the_marker_in_marker_mode(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake.create_script = ["500-after"]
    identity = identity_of(report, description="Same")
    made = first_upload(hook, report, identity, description_marker=True)
    assert list(fake.records) == ["1000"] and fake.paths().count("POST /v1/patient_attachments") == 1
    assert (made.record["id"], made.reused) == ("1000", False)
    assert made.reason.startswith("created; the answer was lost (") and "502" in made.reason
    error = made.reason.removeprefix("created; the answer was lost (").removesuffix(")")
    assert f"The create failed ({error}), but attachment 1000 exists [" in capsys.readouterr().out


def test_a_create_that_failed_before_creating_is_retried_saying_no_record_was_made(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.create_script = ["500"]
    made = first_upload(hook, report, identity_of(report))
    assert made.record["id"] == "1000" and fake.paths().count("POST /v1/patient_attachments") == 2
    assert "POST /patient_attachments: 500 (no record was made) on attempt 1 of " in capsys.readouterr().out


class BrokenStore(FakeTaskStateStore):
    """A task state store whose writes fail with ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def set(self, key: str, value: Any) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (RuntimeError("x" * 300 + "\nsecond line"), "x" * 200),  # one line, 200 characters at most
        (RuntimeError(), "RuntimeError"),  # no message: its type
    ],
)
def test_a_store_that_cannot_record_hands_the_progress_to_the_journal_saying_why(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    shown: str,
) -> None:
    ctx = durable_context(BrokenStore(error))
    identity = identity_of(report, ctx=ctx)
    protocol = UploadProtocol(hook, ctx)
    assert protocol.durable
    made = protocol.upload_once(PATIENT, report, description="D", identity=identity, look_first=False)
    assert not protocol.durable and made.record["id"] == "1000"
    facts = UploadJournal(KEY).read(identity.key)
    assert (facts["attachment_id"], facts["sha256"], facts["patient_id"]) == ("1000", made.sha256, PATIENT)
    assert (
        f"Airflow's task state store could not record this upload's progress ({shown}): this task keeps it "
        "in the worker's journal instead [" in capsys.readouterr().out
    )


def test_a_record_found_by_content_stays_this_identitys_for_the_rest_of_the_try(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    mine = identity_of(report)
    first_upload(hook, report, mine)
    fake.process(fake.records["1000"])
    other_worker(monkeypatch, tmp_path)
    protocol = UploadProtocol(hook, fake_context(try_number=2))
    assert protocol.find_earlier_upload(mine, report) is not None
    again = protocol.find_earlier_upload(mine, report)  # its content is not read twice either
    assert again is not None and again.record["id"] == "1000"
    assert fake.paths().count("GET /v1/patient_attachments/1000/content") == 1


def test_a_candidate_that_never_finishes_processing_is_named_in_the_error(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from cliniko_provider.exceptions import ClinikoError

    fake.list_views_until_processed = None
    fake.gets_until_processed = 10**9
    identity = identity_of(report)
    first_upload(hook, report, identity)
    other_worker(monkeypatch, tmp_path)
    with pytest.raises(ClinikoError) as raised:
        UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert str(raised.value) == (
        f"Attachment 1000 of patient {PATIENT} has this description but is still being processed after 300 "
        "s, so whether it is this upload's earlier attempt cannot be told yet (its bytes are readable only "
        "once processed). Not uploading, to avoid a duplicate; the task's next retry checks again."
    )


def test_a_first_try_says_why_it_does_not_wait_for_records_still_processing(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.list_views_until_processed = None
    first_upload(hook, report, identity_of(report, key="another"))
    capsys.readouterr()
    found = UploadProtocol(hook, fake_context()).find_earlier_upload(
        identity_of(report), report, pending_may_be_ours=False
    )
    assert found is None and fake.paths().count("GET /v1/patient_attachments/1000") == 0
    out = capsys.readouterr().out
    assert (
        f"1 attachment(s) of patient {PATIENT} with this description are still processing; none can be this "
        "upload's (no earlier try of it exists), so they are not waited for [" in out
    )
    assert (
        f"No earlier upload of report.pdf for patient {PATIENT}: 1 attachment(s) with this description since "
        "ever, 0 with this name and size, none with this file's content [" in out
    )


def test_a_candidate_archived_while_waited_for_is_skipped_for_the_next(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fake.list_views_until_processed = None
    fake.gets_until_processed = 1
    identity = identity_of(report)
    first_upload(hook, report, identity)
    fake.records["999"] = {**fake.records["1000"], "id": "999"}  # an older one, archived once asked about
    get = fake.get

    def archiving_get(record_id: str) -> Any:
        if record_id == "999":
            fake.records["999"]["archived_at"] = "2026-01-02T00:00:00Z"
        return get(record_id)

    monkeypatch.setattr(fake, "get", archiving_get)
    other_worker(monkeypatch, tmp_path)
    found = UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report)
    assert found is not None and found.record["id"] == "1000"


def test_each_candidate_processed_with_other_bytes_is_counted(
    hook: ClinikoHook,
    fake: FakeCliniko,
    report: UploadSource,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    still_processing_at_first(fake)
    identity = identity_of(report)
    first_upload(hook, report, identity)
    fake.records["999"] = {**fake.records["1000"], "id": "999"}
    fake.uploads = [(n, bytes(len(d)), k) for n, d, k in fake.uploads]
    other_worker(monkeypatch, tmp_path)
    capsys.readouterr()
    assert UploadProtocol(hook, fake_context(try_number=2)).find_earlier_upload(identity, report) is None
    assert "2 attachment(s) with this description since ever, 2 with this name and size, none" in (
        capsys.readouterr().out
    )


def identity_of_nothing() -> Any:
    from cliniko_provider.utils.idempotency import UploadIdentity

    return UploadIdentity("t", "", PATIENT, "a.pdf", "", "size=1")


def test_a_file_uploaded_in_this_try_is_no_other_identitys_even_with_the_same_bytes(
    hook: ClinikoHook, fake: FakeCliniko, report: UploadSource
) -> None:
    protocol = UploadProtocol(hook, fake_context())
    protocol.upload_once(
        PATIENT, report, description="D", identity=identity_of(report, key="a"), look_first=False
    )
    fake.process(fake.records["1000"])
    # Another file of this task with the same bytes and description (look_for_existing="always"): the
    # attachment just made is the first one's, so this one is uploaded too.
    second = protocol.upload_once(PATIENT, report, description="D", identity=identity_of(report, key="b"))
    assert second.record["id"] == "1001" and len(fake.uploads) == 2
