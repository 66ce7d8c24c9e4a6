"""``check``, ``patients`` and ``try-upload``: what a team runs before its first night.

The same commands run as ``airflow cliniko <command>`` where Airflow loads provider CLI commands (3.3+)
and as the console script ``cliniko <command>`` everywhere. Connections are read as Airflow's own CLI
reads them (environment, secrets backends, then the metadata database), so a connection made in the
web UI is found outside a task too. Every line goes to stdout; a problem names its fix; the exit code
is 0 when everything worked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from cliniko_provider.exceptions import ClinikoError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.utils.budget import user_id_of
from cliniko_provider.utils.settings import (
    ClinikoSettings,
    ConnectionLike,
    base_url_for_shard,
    normalise_base_url,
    shard_from_api_key,
)
from cliniko_provider.utils.upload import resolve_source
from cliniko_provider.utils.validation import one_line

TRY_UPLOAD_DESCRIPTION = "Airflow Cliniko provider: try-upload test file (safe to delete)"
OK, FAIL = "ok  ", "FAIL"


class CommandLineHook(ClinikoHook):
    """A hook on a connection already read, for commands run outside a task.

    :param connection: the connection, as Airflow's CLI reads it.
    :param max_attempts: attempts per request, instead of the connection's (``check`` asks once).
    """

    def __init__(self, connection: ConnectionLike, *, max_attempts: int | None = None) -> None:
        super().__init__(connection.conn_id)
        self._connection = connection
        self._max_attempts = max_attempts
        self._loaded: ClinikoSettings | None = None

    @property
    def settings(self) -> ClinikoSettings:
        """The connection's settings, read once."""
        if self._loaded is None:
            settings = ClinikoSettings.from_connection(self._connection)
            if self._max_attempts is not None:
                settings = dataclasses.replace(settings, max_attempts=self._max_attempts)
            self._loaded = self._remember(settings)
        return self._loaded


def read_connection(conn_id: str) -> ConnectionLike:
    """Read a connection as ``airflow connections get`` does: environment, secrets backends, database.

    :param conn_id: the connection id.
    """
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"  # as Airflow's CLI: the metadata database may be read
    from airflow.models.connection import Connection

    connection: ConnectionLike = Connection.get_connection_from_secrets(conn_id)
    return connection


class Report:
    """Numbered, plain lines on a stream; counts the problems.

    :param out: where the lines go.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.problems = 0

    def line(self, text: str) -> None:
        """Write one line.

        :param text: the line.
        """
        print(text, file=self.out, flush=True)

    def ok(self, what: str, text: str) -> None:
        """Write a step that worked.

        :param what: the step.
        :param text: what it found.
        """
        self.line(f"  {OK}  {what}: {text}")

    def fail(self, what: str, text: str) -> None:
        """Write a step that failed, with its fix.

        :param what: the step.
        :param text: the problem and its fix.
        """
        self.problems += 1
        self.line(f"  {FAIL}  {what}: {one_line(text)}")


def check(connection: ConnectionLike, out: IO[str]) -> int:
    """Check a connection step by step: key and shard, base URL, User-Agent, reachability, user, budget.

    :param connection: the connection to check.
    :param out: where the report goes.
    """
    report = Report(out)
    report.line(f"Cliniko connection {connection.conn_id!r}")
    api_key = (connection.password or "").strip()
    shard = None
    if not api_key:
        report.fail("API key", "none. Fix: put the key in the connection's Password (API key) field.")
    else:
        try:
            shard = shard_from_api_key(api_key)
            report.ok("API key", f"set ({len(api_key)} characters), shard {shard}")
        except ClinikoError as error:
            report.fail("API key", str(error))
    if connection.host:
        try:
            report.ok("Base URL", f"{normalise_base_url(connection.host)} (the connection's host)")
        except ClinikoError as error:
            report.fail("Base URL", str(error))
    elif shard is not None:
        report.ok("Base URL", f"{base_url_for_shard(shard)} (from the key's shard)")
    if report.problems:
        return _verdict(report)
    hook = CommandLineHook(connection, max_attempts=1)
    try:
        settings = hook.settings
    except ClinikoError as error:
        report.fail("Settings", str(error))
        return _verdict(report)
    report.ok("User-Agent", settings.user_agent)
    started = time.monotonic()
    try:
        answer = hook.request("GET", "/user")
        user = answer.json_object("GET /user")
    except ClinikoError as error:
        report.fail("Reachable", str(error))
        return _verdict(report)
    report.ok("Reachable", f"GET /user answered {answer.status} in {time.monotonic() - started:.2f} s")
    name = " ".join(str(user.get(part) or "") for part in ("first_name", "last_name")).strip()
    report.ok("Key's user", f"{name or '(no name)'} (user {user.get('id')})")
    shared = (
        f"shared cluster-wide through Redis connection {settings.redis_conn_id!r}"
        if settings.redis_conn_id
        else "shared by this machine's processes"
    )
    owner = user_id_of(user)
    whose = f"for user {owner} (every key of that user draws on it)" if owner else "for this key alone"
    budget = f"{settings.requests_per_minute:g} requests a minute {whose}, {shared}"
    remaining = answer.headers.get("X-RateLimit-Remaining")
    if remaining is not None:
        budget += f"; Cliniko says {remaining} left in this window"
    problem = getattr(hook.budget, "problem", None)  # the request just sent tried the shared budget
    if problem:
        report.fail(
            "Rate budget",
            f"{problem} Uploads still go on, but each machine paces the key alone, so Cliniko may answer "
            "429 (waited out).",
        )
    elif not getattr(hook.budget, "sharing", True):
        report.fail(
            "Rate budget",
            "this machine's processes cannot share the key's budget (the warning above names the "
            "directory and the fix); each process paces the key alone.",
        )
    else:
        report.ok("Rate budget", budget)
    return _verdict(report)


def patients(
    connection: ConnectionLike, out: IO[str], references: Sequence[str] = (), emails: Sequence[str] = ()
) -> int:
    """List the patients with a given ``old_reference_id`` (your own id) or email.

    :param connection: the Cliniko connection.
    :param out: where the lines go.
    :param references: ``old_reference_id`` values.
    :param emails: email addresses.
    """
    report = Report(out)
    if not references and not emails:
        report.fail("patients", "nothing to look for. Fix: give --reference REF or --email EMAIL.")
        return _verdict(report)
    hook = CommandLineHook(connection)
    searches = [("reference", value, "old_reference_id") for value in references] + [
        ("email", value, "email") for value in emails
    ]
    for kind, value, field_name in searches:
        try:
            found = list(hook.find_patients(**{field_name: value}))  # type: ignore[arg-type]
        except ClinikoError as error:
            report.fail(f"{kind} {value}", str(error))
            continue
        if not found:
            report.line(f"{kind} {value}: no patient")
        for patient in found:
            name = f"{patient.get('first_name') or ''} {patient.get('last_name') or ''}".strip()
            report.line(
                f"{kind} {value}: patient {patient.get('id')} {name} <{patient.get('email') or ''}> "
                f"reference {patient.get('old_reference_id') or '-'}"
            )
    return _verdict(report, quiet=True)


def try_upload(
    connection: ConnectionLike,
    out: IO[str],
    patient_id: str,
    *,
    file_path: str | None = None,
    timeout: float = 300.0,
    poll_interval: float = 2.0,
    keep: bool = False,
) -> int:
    """Upload one small file to one (test) patient, wait for processing, verify its bytes, archive it.

    :param connection: the Cliniko connection.
    :param out: where every step is written.
    :param patient_id: the (test) patient's Cliniko id.
    :param file_path: the file to upload; default a small text file written for the trial.
    :param timeout: seconds to wait for Cliniko's processing.
    :param poll_interval: seconds between checks while waiting.
    :param keep: leave the attachment in place instead of archiving it.
    """
    report = Report(out)
    hook = CommandLineHook(connection)
    with tempfile.TemporaryDirectory(prefix="cliniko-try-upload-") as scratch:
        if file_path is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            path = Path(scratch) / f"cliniko-try-upload-{stamp}.txt"
            path.write_text(f"A test file from the Airflow Cliniko provider ({stamp}). Safe to delete.\n")
            file_path = str(path)
        steps: list[tuple[str, Callable[[], str]]] = []
        state: dict[str, Any] = {}

        def patient() -> str:
            record = hook.get_patient(patient_id)
            name = f"{record.get('first_name') or ''} {record.get('last_name') or ''}".strip()
            return f"patient {record.get('id')} {name}"

        def read_file() -> str:
            source = state["source"] = resolve_source(file_path)
            digest = hashlib.sha256()
            with source.opener() as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            state["sha256"] = digest.hexdigest()
            return f"{source.uri} ({source.size} bytes, sha256 {state['sha256'][:12]}...)"

        def upload() -> str:
            started = time.monotonic()
            uploaded = hook.upload_to_patient(patient_id, state["source"], state["source"].name)
            state["upload_url"] = uploaded.upload_url
            checked = "S3's ETag matches the bytes sent" if uploaded.etag_verified else "S3 sent no MD5 ETag"
            return f"presigned and posted to S3 in {time.monotonic() - started:.1f} s ({checked})"

        def create() -> str:
            record = hook.create_attachment(patient_id, state["upload_url"], TRY_UPLOAD_DESCRIPTION)
            state["attachment_id"] = str(record["id"])
            return f"attachment {record['id']} ({hook.settings.base_url}/patient_attachments/{record['id']})"

        def wait() -> str:
            started = time.monotonic()
            record = hook.wait_for_processing(
                state["attachment_id"], poll_interval=poll_interval, timeout=timeout
            )
            state["record"] = record
            return f"processed at {record.get('processed_at')} after {time.monotonic() - started:.1f} s"

        def verify() -> str:
            record = state["record"]
            problems = []
            if str(record.get("filename")) != state["source"].name:
                problems.append(f"file name {record.get('filename')!r}, sent {state['source'].name!r}")
            if record.get("size") is not None and int(record["size"]) != state["source"].size:
                problems.append(f"size {record.get('size')}, sent {state['source'].size}")
            if hook.attachment_sha256(state["attachment_id"]) != state["sha256"]:
                problems.append("its content differs from the file sent")
            if problems:
                raise ClinikoError("Cliniko's record does not match: " + "; ".join(problems))
            return "file name, size and content (sha256) match"

        steps = [
            ("1. Patient", patient),
            ("2. File", read_file),
            ("3. Upload", upload),
            ("4. Attachment", create),
            ("5. Processing", wait),
            ("6. Verify", verify),
        ]
        report.line(f"Trying one upload to patient {patient_id} through connection {connection.conn_id!r}")
        try:
            for what, step in steps:
                try:
                    report.ok(what, step())
                except ClinikoError as error:
                    report.fail(what, str(error))
                    break
        finally:
            if "attachment_id" in state:
                if keep:
                    report.ok("7. Archive", f"skipped (--keep): attachment {state['attachment_id']} stays")
                else:
                    try:
                        hook.archive_attachment(state["attachment_id"])
                        report.ok("7. Archive", f"attachment {state['attachment_id']} archived")
                    except ClinikoError as error:
                        report.fail("7. Archive", str(error))
    return _verdict(report)


def _verdict(report: Report, *, quiet: bool = False) -> int:
    if report.problems:
        report.line(f"{report.problems} problem(s): see the FAIL line(s) above for the fix.")
        return 1
    if not quiet:
        report.line("All good.")
    return 0


# --- argument parsing, shared by `airflow cliniko` and `cliniko` ---------------------------------------

# (flags, argparse keyword arguments) per command: Airflow's ``Arg`` takes the same keywords.
CONN_ID: tuple[tuple[str, ...], dict[str, Any]] = (
    ("--conn-id",),
    {"default": "cliniko_default", "help": "the Cliniko connection id (default: %(default)s)"},
)
ARGUMENTS: dict[str, list[tuple[tuple[str, ...], dict[str, Any]]]] = {
    "check": [CONN_ID],
    "patients": [
        CONN_ID,
        (("--reference",), {"action": "append", "help": "an old_reference_id (your own id); repeatable"}),
        (("--email",), {"action": "append", "help": "an email address; repeatable"}),
    ],
    "try-upload": [
        (("patient_id",), {"help": "the Cliniko id of a test patient"}),
        CONN_ID,
        (("--file",), {"help": "the file to upload (default: a small text file written for the trial)"}),
        (
            ("--timeout",),
            {"type": float, "default": 300.0, "help": "seconds to wait for processing (default: 300)"},
        ),
        (("--keep",), {"action": "store_true", "help": "keep the attachment (default: archive it)"}),
    ],
}
DESCRIPTION = "Cliniko: check a connection, find patients, try one upload"
HELP = {
    "check": "Check a Cliniko connection: key, shard, URL, User-Agent, reachability, user, rate budget",
    "patients": "Find Cliniko patients by reference (old_reference_id) or email",
    "try-upload": "Upload one small file to a test patient, wait, verify, archive: a live trial",
}


def run(command: str, args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run one command from parsed arguments; return its exit code.

    :param command: ``check``, ``patients`` or ``try-upload``.
    :param args: the parsed arguments.
    :param out: where the lines go (default stdout).
    """
    stream = out or sys.stdout
    try:
        connection = read_connection(args.conn_id)
    except Exception as error:  # Airflow's not-found error differs between versions
        print(
            f"  {FAIL}  Connection {args.conn_id!r}: {one_line(str(error)) or type(error).__name__}. Fix: "
            "create it (web UI: Admin > Connections, type Cliniko; or AIRFLOW_CONN_"
            f"{args.conn_id.upper()}), or pass --conn-id.",
            file=stream,
        )
        return 1
    if command == "check":
        return check(connection, stream)
    if command == "patients":
        return patients(connection, stream, args.reference or (), args.email or ())
    return try_upload(
        connection, stream, args.patient_id, file_path=args.file, timeout=args.timeout, keep=args.keep
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``cliniko`` console script's parser."""
    parser = argparse.ArgumentParser(prog="cliniko", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, arguments in ARGUMENTS.items():
        sub = commands.add_parser(name, help=HELP[name], description=HELP[name])
        for flags, options in arguments:
            sub.add_argument(*flags, **options)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``cliniko`` console script.

    :param argv: the arguments (default ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    return run(args.command, args)


def _exit_with(code: int) -> None:
    if code:
        raise SystemExit(code)


def check_command(args: argparse.Namespace) -> None:
    """``airflow cliniko check``: exits 1 when a check failed.

    :param args: the parsed arguments.
    """
    _exit_with(run("check", args))


def patients_command(args: argparse.Namespace) -> None:
    """``airflow cliniko patients``: exits 1 when a look-up failed.

    :param args: the parsed arguments.
    """
    _exit_with(run("patients", args))


def try_upload_command(args: argparse.Namespace) -> None:
    """``airflow cliniko try-upload``: exits 1 when a step failed.

    :param args: the parsed arguments.
    """
    _exit_with(run("try-upload", args))
