"""Bad input, through the upload operator (and ``test_connection`` where it fits), against the sandbox.

Every case must fail with a message that names the problem *and* the fix, must send nothing to S3 and
make no attachment. The cases and their messages go to ``tests/reports/bad_input.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cliniko_provider.exceptions import (
    ClinikoAuthError,
    ClinikoConfigError,
    ClinikoConnectionError,
    ClinikoError,
    ClinikoInputError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from tests.conftest import SANDBOX_KEY, connection_json
from tests.faults.conftest import record_bad_input, run_upload, sandbox_stats, task_context
from tests.helpers import write_file

FIVE_GIB = 5 * 1024**3


@dataclass
class Setup:
    """What a case needs: a patient of the sandbox, a good file, a scratch dir, and the sandbox."""

    sandbox: SandboxProcess
    patient: str
    good_file: Path
    scratch: Path
    monkeypatch: pytest.MonkeyPatch
    conn: dict[str, Any] = field(default_factory=dict)

    def connect(self, api_key: str = SANDBOX_KEY, host: str | None = "", **extra: Any) -> None:
        """Point ``cliniko_default`` at a connection (default: the sandbox with the tests' key)."""
        value = connection_json(api_key, self.sandbox.base_url if host == "" else host, **extra)
        if "user_agent" in extra and extra["user_agent"] is None:
            data = json.loads(value)
            data["extra"].pop("user_agent")
            value = json.dumps(data)
        self.monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", value)


@dataclass(frozen=True)
class Case:
    """One bad input: how to provoke it, the error expected, and what the message must say.

    :param name: the case, as the table shows it.
    :param run: provokes the error, given the set-up.
    :param error: the exception type expected (``None``: ``test_connection`` answers ``(False, message)``).
    :param problem: a pattern naming the problem.
    :param fix: a pattern naming the fix.
    """

    name: str
    run: Callable[[Setup], object]
    error: type[Exception] | None
    problem: str
    fix: str


def hook() -> ClinikoHook:
    return ClinikoHook(sleep=lambda seconds: None)  # retries of the "down" case take no time


def upload(setup: Setup, **kwargs: Any) -> object:
    kwargs.setdefault("patient_id", setup.patient)
    kwargs.setdefault("file_path", setup.good_file)
    return run_upload(hook(), task_context(), **kwargs)


def with_conn(api_key: str = SANDBOX_KEY, host: str | None = "", **extra: Any) -> Callable[[Setup], object]:
    def run(setup: Setup) -> object:
        setup.connect(api_key, host, **extra)
        return upload(setup)

    return run


def with_args(**kwargs: Any) -> Callable[[Setup], object]:
    return lambda setup: upload(setup, **kwargs)


def with_file(make: Callable[[Path], str]) -> Callable[[Setup], object]:
    return lambda setup: upload(setup, file_path=make(setup.scratch))


def connection_test(
    api_key: str = SANDBOX_KEY, host: str | None = "", **extra: Any
) -> Callable[[Setup], object]:
    def run(setup: Setup) -> object:
        setup.connect(api_key, host, **extra)
        return hook().test_connection()

    return run


def key_without_suffix(setup: Setup) -> object:
    """A key with no shard suffix is an old au1 key; this one is not the sandbox's, so 401."""
    setup.connect("oldstyleunsuffixedkey", host=None)
    assert ClinikoHook().settings.base_url == "https://api.au1.cliniko.com/v1"
    setup.connect("oldstyleunsuffixedkey")
    return upload(setup)


def empty_file(scratch: Path) -> str:
    (scratch / "empty.csv").write_bytes(b"")
    return str(scratch / "empty.csv")


def fifo(scratch: Path) -> str:
    os.mkfifo(scratch / "pipe.csv")
    return str(scratch / "pipe.csv")


def over_5_gib(scratch: Path) -> str:
    path = scratch / "huge.bin"
    with path.open("wb") as handle:
        handle.truncate(FIVE_GIB + 1)  # sparse: no disk space used
    return str(path)


def unreadable(setup: Setup) -> object:
    """A file the worker may not read. Tests run as root, whom chmod 000 does not stop: then the file's
    open raises PermissionError as the OS would for another user."""
    path = write_file(setup.scratch, "secret.csv", 100)
    path.chmod(0)
    if os.geteuid() == 0:
        original = pathlib.Path.open

        def refuse(self: pathlib.Path, *args: Any, **kwargs: Any) -> Any:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self, *args, **kwargs)

        setup.monkeypatch.setattr(pathlib.Path, "open", refuse)
    return upload(setup, file_path=path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def down_host() -> str:
    return f"http://127.0.0.1:{closed_port()}/v1"


CHECK_KEY = r"Check the API key"
PLAIN_NAME = r"Pass a plain file name"
CASES = [
    Case("API key empty", with_conn(""), ClinikoConfigError, r"has no API key", r"Password field"),
    Case("API key wrong", with_conn("wrong-key-au1"), ClinikoAuthError, r"answered 401", CHECK_KEY),
    Case(
        "API key without shard suffix (au1, then 401)",
        key_without_suffix,
        ClinikoAuthError,
        r"answered 401",
        CHECK_KEY,
    ),
    Case(
        "API key with a malformed suffix (-a1)",
        with_conn("abc-a1"),
        ClinikoConfigError,
        r"shard suffix is malformed",
        r"Copy the whole key",
    ),
    Case(
        "User-Agent missing",
        with_conn(user_agent=None),
        ClinikoConfigError,
        r"has no User-Agent",
        r"Set the extra field 'user_agent'",
    ),
    Case(
        "User-Agent without a contact email",
        with_conn(user_agent="Reports"),
        ClinikoConfigError,
        r"User-Agent 'Reports'",
        r"app name and a contact email, e\.g\.",
    ),
    Case(
        "http:// to a remote host",
        with_conn(host="http://cliniko.example.com/v1"),
        ClinikoConfigError,
        r"Plain http:// is refused",
        r"Use https://",
    ),
    Case(
        "extra max_attempts not a number",
        with_conn(max_attempts="many"),
        ClinikoConfigError,
        r"'max_attempts' must be a number, got 'many'",
        r"set it to a number such as 5, or remove it",
    ),
    Case(
        "patient_id empty",
        with_args(patient_id=""),
        ClinikoInputError,
        r"patient_id must be a Cliniko numeric id",
        r"pass its 'id'",
    ),
    Case(
        "patient_id not numeric",
        with_args(patient_id="WH-1001"),
        ClinikoInputError,
        r"got 'WH-1001'",
        r"find_patients",
    ),
    Case(
        "patient_id unknown",
        with_args(patient_id="999999"),
        ClinikoInputError,
        r"has no such patient",
        r"Check the id",
    ),
    Case(
        "file_path empty",
        with_args(file_path=""),
        ClinikoInputError,
        r"file_path is empty",
        r"give the path or URI",
    ),
    Case(
        "file missing",
        with_file(lambda d: str(d / "missing.csv")),
        ClinikoInputError,
        r"no such file",
        r"Check the path",
    ),
    Case("file is a directory", with_file(str), ClinikoInputError, r"is a directory", r"give one file"),
    Case(
        "file empty (0 bytes)",
        with_file(empty_file),
        ClinikoInputError,
        r"is empty \(0 bytes\)",
        r"Check the step that wrote it",
    ),
    Case(
        "file unreadable",
        unreadable,
        ClinikoInputError,
        r"cannot be opened for reading \(PermissionError",
        r"read access",
    ),
    Case(
        "file is a FIFO", with_file(fifo), ClinikoInputError, r"not a regular file", r"regular file and give"
    ),
    Case(
        "file over 5 GiB (sparse)",
        with_file(over_5_gib),
        ClinikoInputError,
        r"at most 5 GiB",
        r"Split or compress",
    ),
    Case(
        "filename with a slash",
        with_args(filename="2026/report.csv"),
        ClinikoInputError,
        r"contains '/'",
        PLAIN_NAME,
    ),
    Case(
        "filename with a line break",
        with_args(filename="report\n.csv"),
        ClinikoInputError,
        r"holds U\+000A",
        PLAIN_NAME,
    ),
    Case("filename '..'", with_args(filename=".."), ClinikoInputError, r"is a path step", PLAIN_NAME),
    Case(
        "filename with a right-to-left override (U+202E)",
        with_args(filename="invoice\u202efdp.exe"),
        ClinikoInputError,
        r"holds U\+202E \(RIGHT-TO-LEFT OVERRIDE\)",
        PLAIN_NAME,
    ),
    Case(
        "filename with a line separator (U+2028)",
        with_args(filename="a\u2028b.csv"),
        ClinikoInputError,
        r"holds U\+2028 \(LINE SEPARATOR\)",
        PLAIN_NAME,
    ),
    Case(
        "filename with a next-line control (U+0085)",
        with_args(filename="a\x85b.csv"),
        ClinikoInputError,
        r"holds U\+0085",
        PLAIN_NAME,
    ),
    Case(
        "filename of 300 characters",
        with_args(filename="r" * 296 + ".csv"),
        ClinikoInputError,
        r"300 bytes long .*at most 255",
        PLAIN_NAME,
    ),
    Case("filename blank", with_args(filename="   "), ClinikoInputError, r"is empty", PLAIN_NAME),
    Case(
        "description of 300 characters",
        with_args(description="d" * 300),
        ClinikoInputError,
        r"300 characters long; Cliniko takes at most 255",
        r"Shorten it",
    ),
    Case(
        "description of 240 with description_marker=True (fits 255, not with the marker)",
        with_args(description="d" * 240, description_marker=True),
        ClinikoInputError,
        r"description_marker=True adds 19 characters",
        r"Shorten the description to 236",
    ),
    Case(
        "object-storage URI of an unknown scheme",
        with_args(file_path="nosuchfs://bucket/a.csv"),
        ClinikoInputError,
        # Airflow's own words: 3.1 with universal-pathlib 0.2, then 3.2+
        r"No filesystem registered for scheme nosuchfs|Unsupported filesystem: 'nosuchfs'",
        r"Install the Airflow provider",
    ),
    Case(
        "object-storage URI without a scheme",
        with_args(file_path="://bucket/a.csv"),
        ClinikoInputError,
        r"not a valid URI",
        r"with its scheme",
    ),
    Case(
        "sandbox down",
        lambda setup: with_conn(host=down_host())(setup),
        ClinikoConnectionError,
        r"Could not reach Cliniko at http://127\.0\.0\.1:\d+/v1 .*Connection refused",
        r"Is `cliniko-sandbox` running\? Start it",
    ),
    Case(
        "test_connection: wrong key",
        connection_test("wrong-key-au1"),
        None,
        r"answered 401 to GET /user",
        CHECK_KEY,
    ),
    Case(
        "test_connection: sandbox down",
        lambda setup: connection_test(host=down_host())(setup),
        None,
        r"Could not reach Cliniko",
        r"Is `cliniko-sandbox` running\? Start it",
    ),
    Case(
        "test_connection: User-Agent missing",
        connection_test(user_agent=None),
        None,
        r"has no User-Agent",
        r"Set the extra field 'user_agent'",
    ),
]


@pytest.fixture
def setup(sandbox: SandboxProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(SANDBOX_KEY, sandbox.base_url))
    patient = str(ClinikoHook().create_patient("Bad", "Input")["id"])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Setup(sandbox, patient, write_file(tmp_path, "report.csv", 500), scratch, monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_with_the_problem_and_the_fix(setup: Setup, case: Case) -> None:
    uploads_before = sandbox_stats(setup.sandbox)["uploads"]
    if case.error is None:
        answer = case.run(setup)
        assert isinstance(answer, tuple)
        ok, message = answer
        assert ok is False, message
        kind = "test_connection -> False"
    else:
        with pytest.raises(case.error) as caught:
            case.run(setup)
        message, kind = str(caught.value), type(caught.value).__name__
        assert isinstance(caught.value, ClinikoError)
    record_bad_input(case.name, kind, message)
    assert re.search(case.problem, message), f"the message does not name the problem: {message}"
    assert re.search(case.fix, message), f"the message does not name the fix: {message}"
    assert SANDBOX_KEY not in message
    setup.connect()
    assert sandbox_stats(setup.sandbox)["uploads"] == uploads_before  # nothing reached S3
    assert list(ClinikoHook().list_attachments(patient_id=setup.patient, include_archived=True)) == []


def test_there_are_at_least_20_cases() -> None:
    assert len(CASES) >= 20
    assert len({case.name for case in CASES}) == len(CASES)
