"""Private local state (rate budget, upload journal) under local attack, some of it by a real other uid."""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator
from cliniko_provider.utils import private_state
from cliniko_provider.utils.budget import PROCESS_BUDGETS, MachineBudget
from cliniko_provider.utils.idempotency import JOURNAL_ENTRY_LIMIT, UploadJournal
from cliniko_provider.utils.private_state import (
    PrivateDir,
    UnsafeStateError,
    check_name,
    read_at_most,
    state_root,
)
from tests.helpers import fake_context, write_file

NOBODY = 65534
KEY = "a" * 64  # an identity key, as UploadIdentity.key gives
NOW = 1_000.0
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as, or give files to, another uid"
)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def journal(directory: Path, secret: str = "secret-au1") -> UploadJournal:
    return UploadJournal(secret, directory)


def written(tmp_path: Path) -> tuple[UploadJournal, Path]:
    """A journal in ``tmp_path/state`` holding one entry (attachment 1) for ``KEY``, and that entry's path."""
    entries = journal(tmp_path / "state")
    entries.write(KEY, attachment_id="1")
    return entries, tmp_path / "state" / f"{KEY}.json"


def as_another_user(shared: Path, action: Callable[[int], None]) -> None:
    """Run ``action(fd of shared)`` in a child process whose uid and gid are ``nobody``'s.

    The child reaches ``shared`` through a descriptor opened before it dropped root, as another local
    user reaches ``/tmp``: the test's own parent directories stay closed to it.
    """
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action(fd)
            code = 0
        finally:
            os._exit(code)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def shared_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A world-writable sticky temp directory (as ``/tmp`` is), the default home of the state directory."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.delenv("CLINIKO_STATE_DIR", raising=False)
    return shared


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A file of the victim's that no link may get written through."""
    path = tmp_path / "precious"
    path.write_text("keep me")
    os.chmod(path, 0o666)  # even writable by all, so only the code's own checks protect it
    return path


def plant_squat(precious: Path) -> Callable[[int], None]:
    """What a squatter does first: make the victim's default state directory, open, full of traps."""

    def squat(fd: int) -> None:
        name = "cliniko-0"  # the victim's (root's) default state directory
        os.mkdir(name, 0o777, dir_fd=fd)
        os.chmod(name, 0o777, dir_fd=fd)
        for sub in ("rate", "uploads"):
            os.mkdir(f"{name}/{sub}", 0o777, dir_fd=fd)
            os.chmod(f"{name}/{sub}", 0o777, dir_fd=fd)
        os.symlink(str(precious), f"{name}/uploads/{KEY}.json", dir_fd=fd)
        os.mkfifo(f"{name}/rate/cliniko-rate-kid.json", dir_fd=fd)
        entry = {"payload": json.dumps({"identity": KEY, "attachment_id": "666"}), "hmac": "0" * 64}
        with open(
            os.open(f"{name}/uploads/planted.json", os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd), "w"
        ) as f:
            json.dump(entry, f)

    return squat


def tree(path: Path) -> list[tuple[str, int, int]]:
    """Every name under ``path`` with its owner and type bits (what a squatter planted)."""
    return sorted(
        (str(p.relative_to(path)), p.lstat().st_uid, stat.S_IFMT(p.lstat().st_mode)) for p in path.rglob("*")
    )


# --- the directory ----------------------------------------------------------------------------------------


def test_one_variable_names_the_directory_and_the_old_one_still_works_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("CLINIKO_STATE_DIR")
    assert state_root() == (tmp_path / f"cliniko-{os.geteuid()}", None)
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "named"))
    assert state_root() == (tmp_path / "named", None)
    monkeypatch.delenv("CLINIKO_STATE_DIR")
    monkeypatch.setenv("CLINIKO_RATE_STATE_DIR", str(tmp_path / "old"))
    budget = MachineBudget("kid", 2, 65)
    assert budget.reserve(NOW) == 0 and budget.reserve(NOW + 1) == 0
    assert budget.path == tmp_path / "old" / "rate" / "cliniko-rate-kid.json" and budget.path.exists()
    assert warnings(caplog) == [
        "Cliniko rate budget: CLINIKO_RATE_STATE_DIR is deprecated; set CLINIKO_STATE_DIR instead"
    ]
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "new"))
    caplog.clear()
    entries = journal(Path())  # an explicit directory: no variable read, no line
    assert entries.directory == Path() and warnings(caplog) == []
    default = UploadJournal("secret-au1")
    default.write(KEY, sha256="ab")
    default.write(KEY, attachment_id="7")
    assert default.directory == tmp_path / "new" / "uploads"
    assert default.read(KEY) == {"identity": KEY, "sha256": "ab", "attachment_id": "7"}
    assert warnings(caplog) == [
        "Cliniko upload journal: CLINIKO_RATE_STATE_DIR is deprecated and ignored: CLINIKO_STATE_DIR is set"
    ]


def test_directories_and_files_are_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "deep" / "state"))
    old = os.umask(0)  # the most permissive umask: modes come from the code alone
    try:
        UploadJournal("s").write(KEY, sha256="ab")
        MachineBudget("kid", 2, 65).reserve(NOW)
    finally:
        os.umask(old)
    root = tmp_path / "deep" / "state"
    for directory in (root, root / "uploads", root / "rate"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for file in (root / "uploads" / f"{KEY}.json", root / "rate" / "cliniko-rate-kid.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert sorted(p.name for p in (root / "uploads").iterdir()) == [f"{KEY}.json"]  # no temp file left


@pytest.mark.parametrize("mode", [0o777, 0o750, 0o701, 0o1777])
def test_a_loose_directory_of_ours_is_refused_and_left_as_it_is(
    tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, mode)
    (state / f"{KEY}.json").write_text("{}")
    entries = journal(state)
    entries.write(KEY, sha256="ab")
    assert entries.read(KEY) == {}
    assert (state / f"{KEY}.json").read_text() == "{}" and len(list(state.iterdir())) == 1
    assert stat.S_IMODE(state.stat().st_mode) == mode  # not "repaired": it may be shared on purpose
    assert warnings(caplog) == [
        f"Cliniko upload journal: cannot use {state} ([Errno 1] the directory's mode {mode:04o} lets "
        "other users in); a retry on this worker asks Cliniko instead. Fix: make the directory a private "
        "one of this user (mode 0700), or set CLINIKO_STATE_DIR to one."
    ]
    budget = MachineBudget("kid", 2, 65, state_dir=state, clock=lambda: NOW)
    assert budget.reserve(NOW) == 0 and not budget.sharing


@pytest.mark.parametrize("where", ["root", "sub"])
def test_a_symlinked_directory_is_refused_even_to_a_private_one_of_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    root = tmp_path / "state"
    if where == "root":
        root.symlink_to(real)
    else:
        root.mkdir(mode=0o700)
        (root / "uploads").symlink_to(real)
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(root))
    with pytest.raises(UnsafeStateError) as raised:
        PrivateDir("x", "uploads").open_dir()
    assert raised.value.strerror == "not a directory (or a symlink)"
    entries = UploadJournal("s")
    entries.write(KEY, sha256="ab")
    assert entries.read(KEY) == {} and list(real.iterdir()) == []


def test_a_file_where_the_directory_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(UnsafeStateError) as raised:
        PrivateDir("x", "rate", tmp_path / "state").open_dir()
    assert raised.value.errno == 20  # ENOTDIR


def test_missing_parents_are_made_but_a_missing_root_under_a_dir_fd_is_not_retried(tmp_path: Path) -> None:
    fd = PrivateDir("x", "rate", tmp_path / "a" / "b" / "c").open_dir()
    os.close(fd)
    assert (tmp_path / "a" / "b" / "c").is_dir()
    with pytest.raises(FileNotFoundError):
        private_state._open_private_dir(Path("no/such"), os.open(tmp_path, os.O_RDONLY))


@needs_root
def test_a_directory_squatted_by_another_user_is_never_used(
    shared_tmp: Path, precious: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another uid makes ``<tmp>/cliniko-0`` first, 0777, with a symlink, a FIFO and a forged entry."""
    as_another_user(shared_tmp, plant_squat(precious))
    squatted = shared_tmp / "cliniko-0"
    planted = tree(squatted)
    entries = UploadJournal("secret-au1")
    started = time.monotonic()
    entries.write(KEY, attachment_id="1", sha256="ab")
    assert entries.read(KEY) == {} and entries.read("planted") == {}
    budget = MachineBudget("kid", 2, 65, clock=lambda: NOW)
    assert [budget.reserve(NOW), budget.reserve(NOW)] == [0, 0] and not budget.sharing
    assert time.monotonic() - started < 5  # no FIFO was waited on
    assert precious.read_text() == "keep me" and tree(squatted) == planted
    assert {entry[1] for entry in planted} == {NOBODY}
    assert warnings(caplog) == [
        f"Cliniko upload journal: cannot use {squatted / 'uploads'} ([Errno 1] the directory belongs to user "
        "id 65534); a retry on this worker asks Cliniko instead. Fix: make the directory a private one of "
        "this user (mode 0700), or set CLINIKO_STATE_DIR to one.",
        f"Cliniko rate budget: cannot share the request budget with this machine's other processes through "
        f"{squatted / 'rate'} ([Errno 1] the directory belongs to user id 65534); this process keeps its own "
        "budget and tries again in 60 s. Fix: make the directory a private one of this user (mode 0700), or "
        "set CLINIKO_STATE_DIR to one.",
    ]


@needs_root
def test_a_sub_directory_of_another_user_in_our_root_is_refused(
    tmp_path: Path, precious: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "state"
    (root / "uploads").mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    os.chown(root / "uploads", NOBODY, NOBODY)
    os.symlink(precious, root / "uploads" / f"{KEY}.json")
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(root))
    with pytest.raises(UnsafeStateError, match="belongs to user id 65534"):
        PrivateDir("x", "uploads").open_dir()
    entries = UploadJournal("s")
    entries.write(KEY, sha256="ab")
    assert entries.read(KEY) == {}
    assert precious.read_text() == "keep me" and (root / "uploads" / f"{KEY}.json").is_symlink()


# --- the entries --------------------------------------------------------------------------------------------


def test_a_symlinked_entry_is_not_read_nor_written_through(
    tmp_path: Path, precious: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries, entry = written(tmp_path)
    good = entry.read_text()
    precious.write_text(good)  # a valid entry behind the link: still not read
    entry.unlink()
    entry.symlink_to(precious)
    assert entries.read(KEY) == {}
    assert not entry.exists()  # the link itself was removed
    entries.write(KEY, attachment_id="2")
    assert precious.read_text() == good and not entry.is_symlink()
    assert entries.read(KEY)["attachment_id"] == "2"
    assert warnings(caplog) == [f"Cliniko upload journal: {entry} was a symlink; replacing it"]


def test_a_dangling_symlink_entry_is_never_created_through(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / f"{KEY}.json").symlink_to(tmp_path / "made-through-the-link")
    entries = journal(state)
    entries.write(KEY, sha256="ab")
    assert not (tmp_path / "made-through-the-link").exists() and entries.read(KEY)["sha256"] == "ab"


@pytest.mark.parametrize("kind", ["fifo", "directory", "hardlink"])
def test_an_entry_that_is_not_a_plain_file_of_ours_is_refused_without_blocking(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    entries, entry = written(tmp_path)
    if kind == "fifo":
        entry.unlink()
        os.mkfifo(entry)
    elif kind == "directory":
        entry.unlink()
        entry.mkdir()
    else:
        os.link(entry, tmp_path / "second-name")
    started = time.monotonic()
    assert entries.read(KEY) == {}
    assert time.monotonic() - started < 5
    if kind == "directory":  # cannot be unlinked: the journal gives up on it, saying why
        assert "[Errno 21] Is a directory" in warnings(caplog)[1] and len(warnings(caplog)) == 2
        return
    assert not entry.exists() and len(warnings(caplog)) == 1
    assert "was not a regular file of this user; replacing it" in warnings(caplog)[0]
    entries.write(KEY, attachment_id="2")
    assert stat.S_ISREG(entry.lstat().st_mode) and entries.read(KEY)["attachment_id"] == "2"
    if kind == "hardlink":
        assert "attachment_id" in (tmp_path / "second-name").read_text()  # the other name kept its own


@needs_root
def test_an_entry_owned_by_another_user_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries, entry = written(tmp_path)
    os.chown(entry, NOBODY, NOBODY)
    assert entries.read(KEY) == {} and not entry.exists()
    assert "not a regular file of this user" in warnings(caplog)[0]


def test_temp_files_are_created_exclusively_never_through_a_planted_name(
    tmp_path: Path, precious: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    entries, entry = written(tmp_path)
    state = entry.parent
    monkeypatch.setattr(private_state.secrets, "token_hex", lambda n: "f" * 2 * n)
    temp = state / f".{KEY}.json.{os.getpid()}.{'f' * 16}.tmp"
    temp.symlink_to(precious)
    (state / f"{KEY}.{os.getpid()}.tmp").symlink_to(precious)  # the name the old journal used
    entries.write(KEY, attachment_id="2")
    assert precious.read_text() == "keep me" and temp.is_symlink()
    assert entries.read(KEY)["attachment_id"] == "1"  # that write was dropped
    assert "File exists" in warnings(caplog)[0] and len(warnings(caplog)) == 1


def test_a_write_that_fails_leaves_no_temp_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / f"{KEY}.json").mkdir(parents=True)
    os.chmod(state, 0o700)
    (state / f"{KEY}.json" / "x").write_text("")  # a non-empty directory: the rename fails
    journal(state).write(KEY, sha256="ab")
    assert sorted(p.name for p in state.iterdir()) == [f"{KEY}.json"]


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"payload": 1, "hmac": "x"}', b"\xff", b"{}", b" " * (JOURNAL_ENTRY_LIMIT + 1)],
)
def test_damaged_entries_are_ignored_with_one_warning_and_rewritten(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    entries, entry = written(tmp_path)
    entry.write_bytes(content)
    assert entries.read(KEY) == {} and entries.read(KEY) == {}
    entries.write(KEY, sha256="ab")
    assert entries.read(KEY) == {"identity": KEY, "sha256": "ab"}
    if content == b'{"payload": 1, "hmac": "x"}':
        assert warnings(caplog) == []  # well-formed but unsigned: another key's, or forged
    else:
        assert len(warnings(caplog)) == 1 and "an entry is damaged" in warnings(caplog)[0]


def test_an_entry_just_at_the_size_limit_is_read(tmp_path: Path) -> None:
    entries, entry = written(tmp_path)
    entry.write_bytes(entry.read_bytes().ljust(JOURNAL_ENTRY_LIMIT))
    assert entries.read(KEY)["attachment_id"] == "1"


def test_entries_of_another_key_or_identity_are_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal(state, "other-key").write(KEY, attachment_id="1")
    assert journal(state).read(KEY) == {}
    journal(state).write(KEY, attachment_id="2")
    os.replace(state / f"{KEY}.json", state / f"{'b' * 64}.json")
    assert journal(state).read("b" * 64) == {}


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a\0b", "..", "."])
def test_names_that_are_not_plain_entries_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot name a private state file"):
        check_name(name)
    directory = PrivateDir("x", "rate", tmp_path / "state")
    with pytest.raises(ValueError):
        directory.write(name, b"x")
    with pytest.raises(ValueError):
        directory.read(name, 10)
    with pytest.raises(ValueError):
        directory.open_shared(name)
    assert list((tmp_path / "state").iterdir()) == []


def test_the_journal_drops_an_identity_that_cannot_name_an_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries = journal(tmp_path / "state")
    entries.write("../escape", sha256="ab")
    assert entries.read("../escape") == {} and not (tmp_path / "escape.json").exists()
    assert len(warnings(caplog)) == 1


def test_check_name_takes_a_plain_name() -> None:
    assert check_name("cliniko-rate-kid.json") == "cliniko-rate-kid.json"
    with pytest.raises(ValueError):
        PrivateDir("x", "../up")


def test_read_at_most_reads_on_after_a_short_read() -> None:
    import socket

    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # each send is read on its own
    with one, two:
        one.send(b"abc")
        one.send(b"d")
        one.send(b"e")
        assert read_at_most(two.fileno(), 4) == b"abcd"


def test_read_at_most_reads_across_short_reads_and_stops_at_the_count() -> None:
    reader, writer = os.pipe()
    os.write(writer, b"abc")
    os.write(writer, b"defgh")
    os.close(writer)
    try:
        assert read_at_most(reader, 5) == b"abcde"
        assert read_at_most(reader, 0) == b""
        assert read_at_most(reader, 10) == b"fgh"
    finally:
        os.close(reader)


def test_read_cuts_a_long_file_one_byte_past_the_limit(tmp_path: Path) -> None:
    directory = PrivateDir("x", "rate", tmp_path / "state")
    directory.write("f", b"0123456789")
    assert directory.read("f", 4) == b"01234"
    assert directory.read("f", 10) == b"0123456789"
    assert directory.read("missing", 4) is None


def test_open_shared_tightens_our_file_and_makes_a_missing_one(tmp_path: Path) -> None:
    directory = PrivateDir("x", "rate", tmp_path / "state")
    fd = directory.open_shared("f")
    os.close(fd)
    os.chmod(tmp_path / "state" / "f", 0o644)
    fd = directory.open_shared("f")
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 and os.fstat(fd).st_uid == os.geteuid()
    os.close(fd)


def test_a_fifo_at_the_budget_file_is_replaced_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    budget = MachineBudget("kid", 2, 65, state_dir=state, clock=lambda: NOW)
    os.mkfifo(budget.path)
    old = os.umask(0)
    try:
        assert budget.reserve(NOW) == 0 and budget.sharing
    finally:
        os.umask(old)
    assert stat.S_ISREG(budget.path.lstat().st_mode) and stat.S_IMODE(budget.path.stat().st_mode) == 0o600
    assert warnings(caplog) == [
        f"Cliniko rate budget: {budget.path} was not a regular file of this user; replacing it"
    ]


# --- a real upload with a poisoned state directory --------------------------------------------------------


def upload(hook: ClinikoHook, patient: str, source: Path, try_number: int) -> dict[str, Any]:
    op = ClinikoAttachmentUploadOperator(
        task_id="upload", patient_id=patient, file_path=str(source), description="Nightly"
    )
    op.hook = hook
    return op.execute(fake_context("manual__1", try_number))


@needs_root
def test_uploads_succeed_exactly_once_with_a_squatted_then_a_poisoned_state_dir(
    sandbox_conn: str, shared_tmp: Path, precious: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_another_user(shared_tmp, plant_squat(precious))
    squatted = shared_tmp / "cliniko-0"
    planted = tree(squatted)
    hook = ClinikoHook(sandbox_conn, sleep=lambda seconds: time.sleep(min(seconds, 0.2)))
    patient = str(hook.create_patient("Ada", f"State-{uuid.uuid4().hex[:8]}")["id"])
    source = write_file(tmp_path, "report.pdf", 20_000)
    first = upload(hook, patient, source, 1)
    retried = upload(hook, patient, source, 2)  # no journal to help: found at Cliniko
    assert retried["id"] == first["id"]
    assert tree(squatted) == planted and precious.read_text() == "keep me"

    # Our own private directory now; a second file's first try fills it, then every entry it holds is
    # replaced: the journal's by a FIFO (a read would hang), the budget's by a symlink (written through).
    mine = tmp_path / "mine"
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(mine))
    PROCESS_BUDGETS.clear()  # this process's budget would try the squatted directory again in a minute
    other = write_file(tmp_path, "other.pdf", 30_000, seed=3)
    second = upload(ClinikoHook(sandbox_conn), patient, other, 1)
    journal_entries, budget_entries = list((mine / "uploads").iterdir()), list((mine / "rate").iterdir())
    # the budget's: the key's window (its GET /user), its user's window, and which user the key is
    assert len(journal_entries) == 1 and len(budget_entries) == 3
    for entry in journal_entries:
        entry.unlink()
        os.mkfifo(entry)
    for entry in budget_entries:
        entry.unlink()
        entry.symlink_to(precious)
    PROCESS_BUDGETS.clear()
    started = time.monotonic()
    assert upload(ClinikoHook(sandbox_conn), patient, other, 2)["id"] == second["id"]
    assert time.monotonic() - started < 30
    assert precious.read_text() == "keep me"
    assert not journal_entries[0].exists()  # removed (a reused record writes nothing new)
    assert all(stat.S_ISREG(entry.lstat().st_mode) for entry in budget_entries)
    ids = sorted(item["id"] for item in hook.list_attachments(patient_id=patient))
    assert ids == sorted([first["id"], second["id"]])
