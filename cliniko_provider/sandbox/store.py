"""Persistent sandbox state: accounts, patients, attachments and uploaded S3 objects.

Records live in `<data-dir>/sandbox.db`, a SQLite database in WAL mode: each change is one
small transaction, committed before the answer that acknowledges it goes out, so a write costs
the same with 10 or 10,000 records and a `kill -9` loses nothing acknowledged (WAL with
`synchronous=NORMAL` is durable across process crashes; only a power cut may lose the last
commits, never corrupt the file). Object bytes live in `<data-dir>/objects/` under random names
(an S3 key is not a safe file path), processed attachments in `<data-dir>/attachments/`.
The data dir is made private (0700): the database holds the S3 signing secret.
The server runs on one event loop and one connection, so a change made without an `await` in
between is atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from cliniko_provider.sandbox.config import shard_of, strip_shard

DATABASE_FILE = "sandbox.db"
LEGACY_STATE_FILE = "state.json"  # the store before SQLite; imported once, then renamed
SCHEMA_VERSION = 1
# Ids look like Cliniko's: 64-bit, well above 2**53, increasing with time.
_ID_EPOCH_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, shard TEXT NOT NULL,
    key_digest TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, storage_used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL, first_name TEXT NOT NULL,
    last_name TEXT NOT NULL, email TEXT, date_of_birth TEXT, old_reference_id TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, archived_at TEXT, extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS patients_old_reference_id ON patients (account_id, old_reference_id);
CREATE INDEX IF NOT EXISTS patients_email ON patients (account_id, email);
CREATE INDEX IF NOT EXISTS patients_last_name ON patients (account_id, last_name);
CREATE INDEX IF NOT EXISTS patients_created_at ON patients (account_id, created_at);
CREATE TABLE IF NOT EXISTS attachments (
    id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL, patient_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL, description TEXT, upload_size INTEGER NOT NULL,
    upload_filename TEXT NOT NULL, source_bucket TEXT NOT NULL, source_key TEXT NOT NULL,
    source_path TEXT NOT NULL, process_after REAL NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, archived_at TEXT, processed_at TEXT,
    processing_completed INTEGER NOT NULL DEFAULT 0, filename TEXT, content_type TEXT, size INTEGER,
    content_path TEXT
);
CREATE INDEX IF NOT EXISTS attachments_patient ON attachments (account_id, patient_id);
CREATE INDEX IF NOT EXISTS attachments_created_at ON attachments (account_id, created_at);
CREATE INDEX IF NOT EXISTS attachments_pending ON attachments (process_after)
    WHERE processing_completed = 0;
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    etag TEXT NOT NULL, created_at TEXT NOT NULL, claimed_by INTEGER, PRIMARY KEY (bucket, key)
);
"""


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_digest(api_key: str) -> str:
    """Accounts are stored under a digest of the key (without shard), never the key itself."""
    return hashlib.sha256(strip_shard(api_key).encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    id: int
    user_id: int
    shard: str
    key_digest: str
    created_at: str
    storage_used: int = 0


@dataclass(frozen=True)
class Patient:
    id: int
    account_id: int
    first_name: str
    last_name: str
    email: str | None
    date_of_birth: str | None
    old_reference_id: str | None
    created_at: str
    updated_at: str
    archived_at: str | None = None
    # Fields of Cliniko's patient schema the sandbox does not model, kept as given and echoed.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredObject:
    """An object POSTed to a bucket, waiting in its temp prefix to become an attachment."""

    bucket: str
    key: str
    path: str  # relative to the data dir
    size: int
    etag: str
    created_at: str
    claimed_by: int | None = None  # the attachment made from it


@dataclass(frozen=True)
class Attachment:
    id: int
    account_id: int
    patient_id: int
    user_id: int
    description: str | None
    upload_size: int
    upload_filename: str
    source_bucket: str
    source_key: str
    source_path: str  # the temp object's bytes, relative to the data dir
    process_after: float  # epoch seconds; infinity when it can never be processed
    created_at: str
    updated_at: str
    archived_at: str | None = None
    processed_at: str | None = None
    processing_completed: bool = False
    filename: str | None = None
    content_type: str | None = None
    size: int | None = None
    content_path: str | None = None  # relative to the data dir, once processed


Record = TypeVar("Record", Patient, Attachment)
_TABLES: dict[type[Any], str] = {Patient: "patients", Attachment: "attachments"}


@dataclass(frozen=True)
class Query:
    """A list request as SQL: a WHERE clause over one table's whitelisted columns, and an ORDER BY."""

    where: str
    params: Sequence[Any]
    order_by: str


def _casefold(text: str | None) -> str | None:
    return text.casefold() if isinstance(text, str) else text


class Store:
    """The sandbox's records in `sandbox.db`; every method commits before it returns."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.objects_dir = data_dir / "objects"
        self.attachments_dir = data_dir / "attachments"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (data_dir, self.objects_dir, self.attachments_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            directory.chmod(0o700)
        path = data_dir / DATABASE_FILE
        # Autocommit; multi-statement changes use `transaction()`.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.create_function("casefold", 1, _casefold, deterministic=True)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{path}{suffix}").chmod(0o600)
        version = self._meta("schema_version")
        if version is not None and int(version) != SCHEMA_VERSION:
            raise RuntimeError(f"{path}: unsupported schema version {version}")
        self._import_legacy_state()
        secret = self._meta("s3_secret_key")
        if secret is None:
            secret = secrets.token_urlsafe(30)
            self._set_meta("s3_secret_key", secret)
            self._set_meta("schema_version", str(SCHEMA_VERSION))
        self.s3_secret_key = secret
        self.last_id: int = max(
            self.db.execute(
                "SELECT MAX(COALESCE((SELECT MAX(MAX(id, user_id)) FROM accounts), 0),"
                " COALESCE((SELECT MAX(id) FROM patients), 0),"
                " COALESCE((SELECT MAX(id) FROM attachments), 0))"
            ).fetchone()
        )

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, name: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def _import_legacy_state(self) -> None:
        """Bring a data dir written before the SQLite store (`state.json`) over, once."""
        legacy = self.data_dir / LEGACY_STATE_FILE
        if not legacy.exists() or self._meta("s3_secret_key") is not None:
            return
        state = json.loads(legacy.read_text())
        with self.transaction():
            self._set_meta("s3_secret_key", state["s3_secret_key"])
            self._set_meta("schema_version", str(SCHEMA_VERSION))
            for row in state["accounts"]:
                self._insert("accounts", row)
            for row in state["patients"]:
                self._insert("patients", {**row, "extra": "{}"})
            for row in state["attachments"]:
                self._insert("attachments", row)
            for row in state["objects"]:
                self._insert("objects", row)
            for attachment in state["attachments"]:
                self.db.execute(
                    "UPDATE accounts SET storage_used = storage_used + ? WHERE id = ?",
                    (attachment["upload_size"], attachment["account_id"]),
                )
        legacy.chmod(0o600)
        legacy.rename(legacy.with_name(f"{LEGACY_STATE_FILE}.imported"))

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))

    # -- ids and accounts --------------------------------------------------------------------

    def new_id(self) -> int:
        self.last_id = max(self.last_id + 1, (int(time.time() * 1000) - _ID_EPOCH_MS) << 22)
        return self.last_id

    def ensure_account(self, api_key: str) -> Account:
        account = self.account_for_key(api_key)
        if account is None:
            account = Account(
                self.new_id(), self.new_id(), shard_of(api_key), key_digest(api_key), utc_now_iso()
            )
            self._insert("accounts", dataclasses.asdict(account))
        return account

    def account_for_key(self, api_key: str) -> Account | None:
        """The account of a key, given with or without its shard suffix."""
        row = self.db.execute(
            "SELECT * FROM accounts WHERE key_digest = ?", (key_digest(api_key),)
        ).fetchone()
        return None if row is None else Account(**row)

    def storage_used(self, account: Account) -> int:
        """Bytes of every attachment of the account, archived ones included."""
        row = self.db.execute("SELECT storage_used FROM accounts WHERE id = ?", (account.id,)).fetchone()
        return int(row[0]) if row else 0

    # -- records -----------------------------------------------------------------------------

    @staticmethod
    def _patient(row: sqlite3.Row) -> Patient:
        return Patient(**{**dict(row), "extra": json.loads(row["extra"])})

    @staticmethod
    def _attachment(row: sqlite3.Row) -> Attachment:
        return Attachment(**{**dict(row), "processing_completed": bool(row["processing_completed"])})

    def patient(self, account: Account, patient_id: int) -> Patient | None:
        row = self.db.execute(
            "SELECT * FROM patients WHERE id = ? AND account_id = ?", (patient_id, account.id)
        ).fetchone()
        return None if row is None else self._patient(row)

    def attachment(self, account: Account, attachment_id: int) -> Attachment | None:
        row = self.db.execute(
            "SELECT * FROM attachments WHERE id = ? AND account_id = ?", (attachment_id, account.id)
        ).fetchone()
        return None if row is None else self._attachment(row)

    def add_patient(self, account: Account, fields: dict[str, Any], extra: dict[str, Any]) -> Patient:
        now = utc_now_iso()
        patient = Patient(
            id=self.new_id(), account_id=account.id, created_at=now, updated_at=now, extra=extra, **fields
        )
        self._insert("patients", {**dataclasses.asdict(patient), "extra": json.dumps(extra)})
        return patient

    def archive(self, record: Patient | Attachment) -> None:
        """Archive a patient or attachment, keeping its first `archived_at`."""
        now = utc_now_iso()
        self.db.execute(
            f"UPDATE {_TABLES[type(record)]} SET archived_at = ?, updated_at = ? WHERE id = ?",
            (record.archived_at or now, now, record.id),
        )

    def delete_attachment(self, attachment_id: int) -> bool:
        """Remove an attachment record and its bytes, as if deleted in Cliniko; False if there is none."""
        row = self.db.execute("SELECT * FROM attachments WHERE id = ?", (attachment_id,)).fetchone()
        if row is None:
            return False
        attachment = self._attachment(row)
        with self.transaction():
            self.db.execute("DELETE FROM attachments WHERE id = ?", (attachment_id,))
            self.db.execute(
                "UPDATE accounts SET storage_used = MAX(0, storage_used - ?) WHERE id = ?",
                (attachment.upload_size, attachment.account_id),
            )
        if attachment.content_path:
            (self.data_dir / attachment.content_path).unlink(missing_ok=True)
        return True

    def list_records(
        self, kind: type[Record], account: Account, query: Query, offset: int, limit: int
    ) -> tuple[list[Record], int]:
        """One page of an account's records matching `query`, and how many match in all."""
        table = _TABLES[kind]
        where = f"account_id = ? AND {query.where}"
        params: tuple[Any, ...] = (account.id, *query.params)
        total = int(self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", params).fetchone()[0])
        if offset >= total:
            return [], total
        rows = self.db.execute(
            f"SELECT * FROM {table} WHERE {where} ORDER BY {query.order_by} LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
        build = self._patient if kind is Patient else self._attachment
        return [build(row) for row in rows], total  # type: ignore[misc]

    def add_attachment(self, attachment: Attachment) -> None:
        """Record a new attachment, claiming its uploaded object and counting its size against storage."""
        with self.transaction():
            self._insert("attachments", dataclasses.asdict(attachment))
            self.db.execute(
                "UPDATE objects SET claimed_by = ? WHERE bucket = ? AND key = ?",
                (attachment.id, attachment.source_bucket, attachment.source_key),
            )
            self.db.execute(
                "UPDATE accounts SET storage_used = storage_used + ? WHERE id = ?",
                (attachment.upload_size, attachment.account_id),
            )

    def due_attachments(self, now: float, limit: int = 500) -> list[Attachment]:
        rows = self.db.execute(
            "SELECT * FROM attachments WHERE processing_completed = 0 AND process_after <= ?"
            " ORDER BY process_after LIMIT ?",
            (now, limit),
        ).fetchall()
        return [self._attachment(row) for row in rows]

    def reschedule_processing(self, process_after: float) -> int:
        """Make every attachment still processing fall due at ``process_after``; return how many."""
        with self.transaction():
            cursor = self.db.execute(
                "UPDATE attachments SET process_after = ? WHERE processing_completed = 0", (process_after,)
            )
        return int(cursor.rowcount)

    def next_due(self) -> float | None:
        """When the next attachment still processing falls due (epoch seconds), if any."""
        row = self.db.execute(
            "SELECT MIN(process_after) FROM attachments WHERE processing_completed = 0"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def update_attachment(self, attachment: Attachment, **changes: Any) -> Attachment:
        updated = dataclasses.replace(attachment, **changes)
        assignments = ", ".join(f"{name} = ?" for name in changes)
        self.db.execute(
            f"UPDATE attachments SET {assignments} WHERE id = ?", (*changes.values(), attachment.id)
        )
        return updated

    def counts(self) -> dict[str, int]:
        """How many records of each kind, for `/_sandbox/stats`."""
        row = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM patients), (SELECT COUNT(*) FROM attachments),"
            " (SELECT COUNT(*) FROM attachments WHERE processing_completed = 0),"
            " (SELECT COUNT(*) FROM objects)"
        ).fetchone()
        return dict(
            zip(("patients", "attachments", "attachments_processing", "temp_objects"), row, strict=True)
        )

    # -- S3 objects --------------------------------------------------------------------------

    def new_object_file(self) -> Path:
        return self.objects_dir / secrets.token_hex(16)

    def object(self, bucket: str, key: str) -> StoredObject | None:
        row = self.db.execute("SELECT * FROM objects WHERE bucket = ? AND key = ?", (bucket, key)).fetchone()
        return None if row is None else StoredObject(**row)

    def put_object(self, obj: StoredObject) -> None:
        """Store (or overwrite, as S3 does) an object; bytes an attachment claimed stay its own."""
        replaced = self.object(obj.bucket, obj.key)
        self.db.execute(
            "INSERT OR REPLACE INTO objects (bucket, key, path, size, etag, created_at, claimed_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            dataclasses.astuple(obj),
        )
        if replaced is not None and replaced.claimed_by is None:
            (self.data_dir / replaced.path).unlink(missing_ok=True)

    def drop_object(self, bucket: str, key: str, path: str) -> None:
        """Forget an object if it is still the one stored from `path`."""
        self.db.execute("DELETE FROM objects WHERE bucket = ? AND key = ? AND path = ?", (bucket, key, path))
