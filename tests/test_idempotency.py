"""What an upload's identity is made of, how look-up candidates are screened, and the journal's entries."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cliniko_provider.exceptions import ClinikoInputError
from cliniko_provider.utils.idempotency import (
    JOURNAL_ENTRY_LIMIT,
    DigestingOpener,
    UploadIdentity,
    UploadJournal,
    UploadOutcome,
    content_identity,
    describe_with_marker,
    marker_token,
    screen_candidates,
    sha256_of,
    task_identity,
    upload_identity,
    wire_filename,
)
from tests.helpers import fake_context

JsonDict = dict[str, Any]
IDENTITY = UploadIdentity("nightly/upload/r1/-1", "", "42", 'a"b.pdf', "Nightly", "size=5")
LINK = "https://api.au1.cliniko.com/v1/patients/"


def test_every_part_of_the_identity_changes_its_key_and_the_key_is_their_joined_sha256() -> None:
    parts = ("task", "item", "patient_id", "filename", "description", "content")
    keys = {replace(IDENTITY, **{part: "x"}).key for part in parts}
    assert len(keys | {IDENTITY.key}) == 7
    joined = "\x1f".join(("nightly/upload/r1/-1", "", "42", 'a"b.pdf', "Nightly", "size=5"))
    assert IDENTITY.key == hashlib.sha256(joined.encode()).hexdigest()
    # The separator keeps parts apart: moving a character across a boundary is another identity.
    assert replace(IDENTITY, task="ab", item="c").key != replace(IDENTITY, task="a", item="bc").key
    assert IDENTITY.marker == f"[ref:{IDENTITY.key[:12]}]"
    assert marker_token(IDENTITY.marker) == IDENTITY.key[:12]


def test_the_look_up_bound_is_ten_minutes_before_since_in_utc() -> None:
    assert IDENTITY.created_after() is None
    since = datetime(2026, 1, 1, 10, 5, 30, tzinfo=timezone(timedelta(hours=10)))
    assert replace(IDENTITY, since=since).created_after() == "2025-12-31T23:55:30Z"


def test_the_look_up_bound_is_in_utc_on_a_worker_in_another_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    since = datetime(2026, 1, 1, 10, 5, 30, tzinfo=timezone(timedelta(hours=10)))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert replace(IDENTITY, since=since).created_after() == "2025-12-31T23:55:30Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_task_part_is_the_task_instance_and_since_the_runs_earliest_moment() -> None:
    ctx = fake_context("scheduled__1", map_index=3)
    early, late = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert task_identity(ctx) == ("nightly/upload/scheduled__1/3", None)
    for run_after, start_date in ((early, late), (late, early)):
        ctx["dag_run"] = SimpleNamespace(run_after=run_after, start_date=start_date)
        assert task_identity(ctx) == ("nightly/upload/scheduled__1/3", early)
    ctx["dag_run"] = SimpleNamespace(run_after="2026-01-01", start_date=late)  # not a datetime: ignored
    assert task_identity(ctx)[1] == late
    ctx["ti"].map_index = None
    assert task_identity(ctx)[0] == "nightly/upload/scheduled__1/-1"
    assert task_identity(ctx, "report-7") == ("key:report-7", None)
    assert task_identity(ctx, "")[0] == "nightly/upload/scheduled__1/-1"


def test_upload_identity_puts_each_argument_in_its_place() -> None:
    ctx = fake_context("r1")
    identity = upload_identity(ctx, "42", "a.pdf", None, "size=5", item="/data/a.pdf")
    assert identity == UploadIdentity("nightly/upload/r1/-1", "/data/a.pdf", "42", "a.pdf", "", "size=5")
    keyed = upload_identity(ctx, "42", "a.pdf", "D", "size=5", idempotency_key="k")
    assert (keyed.task, keyed.item, keyed.description) == ("key:k", "", "D")


def test_content_identity_lists_size_time_and_every_version_field_in_order() -> None:
    assert content_identity(5) == "size=5"
    assert content_identity(5, mtime_ns=0) == "size=5;mtime_ns=0"
    info = {"mtime": 2, "ETag": '"e"', "VersionId": "v1", "etag": "", "md5": None, "generation": 0, "size": 5}
    assert content_identity(5, info) == 'size=5;VersionId=v1;ETag="e";generation=0;mtime=2'
    every = ("VersionId", "version_id", "ETag", "etag", "md5", "generation", "LastModified", "mtime")
    assert content_identity(1, {name: "x" for name in every}) == "size=1;" + ";".join(f"{n}=x" for n in every)


def test_the_digesting_opener_hashes_what_is_read_once_the_whole_file_was_read() -> None:
    data = b"0123456789"
    opener = DigestingOpener(lambda: io.BytesIO(data), len(data))
    assert (opener.sha256, opener.md5) == (None, None)  # unknown until read
    with opener() as stream:
        assert stream.read(4) == b"0123"
        assert stream.read() == b"456789"
        assert (opener.sha256, opener.md5) == (None, None)  # not yet seen the end
        assert stream.read(4) == b""
    assert opener.sha256 == hashlib.sha256(data).hexdigest() and opener.md5 == hashlib.md5(data).hexdigest()
    reader = opener()
    assert (opener.sha256, opener.md5) == (None, None)  # a new read starts over
    reader.read(3)
    reader.read()
    reader.close()
    assert (opener.sha256, opener.md5) == (None, None)  # ended early: 3 + 7 bytes is the file...
    short = DigestingOpener(lambda: io.BytesIO(data[:9]), len(data))
    with short() as stream:
        while stream.read(4):
            pass
    assert (short.sha256, short.md5) == (None, None)  # ...but 9 bytes of a promised 10 is not


def test_sha256_of_reads_the_whole_file_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (1024 * 1024 * 2 + 5))
    assert sha256_of(lambda: path.open("rb")) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wire_filename_writes_quotes_as_browsers_do() -> None:
    assert wire_filename('a"b".pdf') == "a%22b%22.pdf"
    assert wire_filename("plain.pdf") == "plain.pdf"


def candidate(record_id: str, **fields: Any) -> JsonDict:
    return {
        "id": record_id,
        "description": "Nightly",
        "patient": {"links": {"self": f"{LINK}42"}},
        "processing_completed": True,
        "filename": "a%22b.pdf",
        "size": 5,
        "archived_at": None,
        **fields,
    }


def test_screening_keeps_this_patients_unarchived_records_with_this_description_name_and_size() -> None:
    records = [
        candidate("10"),
        candidate("9", size="5"),  # a string size is read as a number
        "not a record",
        candidate("1", archived_at="2026-01-01"),
        candidate("2", description="Nightly "),
        candidate("3", description=None),
        candidate("4", patient={"links": {"self": f"{LINK}420"}}),
        candidate("5", filename='a"b.pdf'),  # as given, not as S3 stores it
        candidate("6", size=6),
        candidate("7", size="five"),
        candidate("8", processing_completed=None, filename=None, size=None),
        candidate("11", patient=None),  # no link: kept (the look-up asked for this patient's records)
        candidate("12", processing_completed="true"),  # only True is processed
    ]
    ready, pending = screen_candidates(records, IDENTITY, 5)
    assert [r["id"] for r in ready] == ["9", "10", "11"]
    assert [r["id"] for r in pending] == ["8", "12"]
    assert screen_candidates([candidate("3", description=None)], replace(IDENTITY, description=""), 5)[0]


def test_screening_orders_by_numeric_id_with_unreadable_ids_first() -> None:
    ready, _ = screen_candidates([candidate("100"), candidate("20"), candidate("x")], IDENTITY, 5)
    assert [r["id"] for r in ready] == ["x", "20", "100"]


def test_the_marker_leaves_255_characters_at_most() -> None:
    marker = IDENTITY.marker
    assert describe_with_marker("", marker) == marker
    fits = "x" * (255 - len(marker) - 1)
    assert describe_with_marker(fits, marker) == f"{fits} {marker}"
    with pytest.raises(ClinikoInputError) as refused:
        describe_with_marker(fits + "y", marker)
    assert str(refused.value) == (
        "description is 237 characters long; Cliniko takes at most 255, and description_marker=True adds 19 "
        f"characters (' {marker}'), which leaves 236. Shorten the description to 236 characters or fewer."
    )


def test_the_outcomes_summary_names_every_fact() -> None:
    outcome = UploadOutcome({"id": 7}, True, "why", sha256="s", md5="m", verification="content")
    assert outcome.summary(IDENTITY) == {
        "attachment_id": "7",
        "reused": True,
        "reason": "why",
        "identity": IDENTITY.key,
        "sha256": "s",
        "md5": "m",
        "verification": "content",
    }
    assert UploadOutcome({"id": 7}, False, "uploaded").summary(None)["identity"] is None
    assert UploadOutcome({}, False, "x").verification == "none"


# --- the journal's entries ----------------------------------------------------------------------------------


def test_a_journal_entry_merges_facts_and_reads_back_for_its_identity_only(tmp_path: Path) -> None:
    journal = UploadJournal("secret", tmp_path / "j")
    assert journal.read("k1") == {}
    journal.write("k1", sha256="ab")
    journal.write("k1", attachment_id="7")
    assert journal.read("k1") == {"identity": "k1", "sha256": "ab", "attachment_id": "7"}
    entry = json.loads((tmp_path / "j" / "k1.json").read_text())
    assert json.loads(entry["payload"]) == {"attachment_id": "7", "identity": "k1", "sha256": "ab"}
    # An entry copied under another identity's name is not that identity's.
    (tmp_path / "j" / "k2.json").write_bytes((tmp_path / "j" / "k1.json").read_bytes())
    assert journal.read("k2") == {}
    assert UploadJournal("another key", tmp_path / "j").read("k1") == {}


@pytest.mark.parametrize(
    ("entry", "damaged"),
    [
        (b"not json", True),
        (b"{}", True),
        (b"[1]", True),
        (b'{"payload": "{}"}', True),
        (b'{"payload": 1, "hmac": "x"}', False),  # not signed: simply not ours
        (b'{"payload": "{}", "hmac": "0"}', False),
    ],
)
def test_a_damaged_entry_reads_as_nothing_with_one_warning(
    tmp_path: Path, entry: bytes, damaged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    journal = UploadJournal("secret", tmp_path / "j")
    journal.write("k", sha256="ab")
    (tmp_path / "j" / "k.json").write_bytes(entry)
    assert journal.read("k") == {} and journal.read("k") == {}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = (
        f"Cliniko upload journal: cannot use {tmp_path / 'j'} (an entry is damaged; it is ignored and "
        "rewritten by the next try); a retry on this worker asks Cliniko instead. Fix: make the directory a "
        "private one of this user (mode 0700), or set CLINIKO_STATE_DIR to one."
    )
    assert warned == ([expected] if damaged else [])


def test_an_entry_over_the_limit_is_not_parsed(tmp_path: Path) -> None:
    journal = UploadJournal("secret", tmp_path / "j")
    journal.write("k", note="x" * (JOURNAL_ENTRY_LIMIT - 200))
    assert journal.read("k")["note"]  # just under the limit: read
    journal.write("k", note="x" * JOURNAL_ENTRY_LIMIT)
    assert journal.read("k") == {}


def test_a_signed_payload_that_is_not_an_object_reads_as_nothing(tmp_path: Path) -> None:
    journal = UploadJournal("secret", tmp_path / "j")
    payload = json.dumps(["k"])
    (tmp_path / "j").mkdir(mode=0o700)
    signed = {"payload": payload, "hmac": journal._sign(payload)}
    (tmp_path / "j" / "k.json").write_text(json.dumps(signed))
    assert journal.read("k") == {}
