"""Persistent sandbox state: accounts, patients, attachments and uploaded S3 objects.

Everything lives in memory and is written to `<data-dir>/state.json` (atomically, via a
temporary file and a rename) after every change, so a restart on the same data directory
resumes where the last run stopped, including attachments that were still processing.
Object bytes live in `<data-dir>/objects/` under random names (an S3 key is not a safe file
path), processed attachments in `<data-dir>/attachments/`.
The server runs on one event loop, so a change made without an `await` in between is atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cliniko_provider.sandbox.config import shard_of, strip_shard

STATE_FILE = "state.json"
STATE_VERSION = 1
# Ids look like Cliniko's: 64-bit, well above 2**53, increasing with time.
_ID_EPOCH_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z


class _Owned(Protocol):
    account_id: int


Record = TypeVar("Record", bound=_Owned)


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_digest(api_key: str) -> str:
    """Accounts are stored under a digest of the key (without shard), never the key itself."""
    return hashlib.sha256(strip_shard(api_key).encode()).hexdigest()


@dataclass
class Account:
    id: int
    user_id: int
    shard: str
    key_digest: str
    created_at: str


@dataclass
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


@dataclass
class StoredObject:
    """An object POSTed to a bucket, waiting in its temp prefix to become an attachment."""

    bucket: str
    key: str
    path: str  # relative to the data dir
    size: int
    etag: str
    created_at: str
    claimed_by: int | None = None  # the attachment made from it


@dataclass
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
    process_after: float  # epoch seconds
    created_at: str
    updated_at: str
    archived_at: str | None = None
    processed_at: str | None = None
    processing_completed: bool = False
    filename: str | None = None
    content_type: str | None = None
    size: int | None = None
    content_path: str | None = None  # relative to the data dir, once processed


class Store:
    """The sandbox's records, kept in memory and mirrored to `state.json`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.objects_dir = data_dir / "objects"
        self.attachments_dir = data_dir / "attachments"
        for directory in (self.objects_dir, self.attachments_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.s3_secret_key = secrets.token_urlsafe(30)
        self.last_id = 0
        self.accounts: dict[str, Account] = {}
        self.patients: dict[int, Patient] = {}
        self.attachments: dict[int, Attachment] = {}
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self._load()

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.data_dir / STATE_FILE
        if not path.exists():
            return
        state = json.loads(path.read_text())
        if state.get("version") != STATE_VERSION:
            raise RuntimeError(f"{path}: unsupported state version {state.get('version')!r}")
        self.s3_secret_key = state["s3_secret_key"]
        self.last_id = state["last_id"]
        self.accounts = {row["key_digest"]: Account(**row) for row in state["accounts"]}
        self.patients = {row["id"]: Patient(**row) for row in state["patients"]}
        self.attachments = {row["id"]: Attachment(**row) for row in state["attachments"]}
        objects = (StoredObject(**row) for row in state["objects"])
        self.objects = {(obj.bucket, obj.key): obj for obj in objects}

    def save(self) -> None:
        state = {
            "version": STATE_VERSION,
            "s3_secret_key": self.s3_secret_key,
            "last_id": self.last_id,
            "accounts": [dataclasses.asdict(row) for row in self.accounts.values()],
            "patients": [dataclasses.asdict(row) for row in self.patients.values()],
            "attachments": [dataclasses.asdict(row) for row in self.attachments.values()],
            "objects": [dataclasses.asdict(row) for row in self.objects.values()],
        }
        temporary = self.data_dir / f"{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.data_dir / STATE_FILE)

    # -- ids and accounts --------------------------------------------------------------------

    def new_id(self) -> int:
        self.last_id = max(self.last_id + 1, (int(time.time() * 1000) - _ID_EPOCH_MS) << 22)
        return self.last_id

    def ensure_account(self, api_key: str) -> Account:
        digest = key_digest(api_key)
        account = self.accounts.get(digest)
        if account is None:
            account = Account(self.new_id(), self.new_id(), shard_of(api_key), digest, utc_now_iso())
            self.accounts[digest] = account
            self.save()
        return account

    def account_for_key(self, api_key: str) -> Account | None:
        """The account of a configured key, given with or without its shard suffix."""
        return self.accounts.get(key_digest(api_key))

    # -- records -----------------------------------------------------------------------------

    def owned(self, records: dict[int, Record], record_id: int, account: Account) -> Record | None:
        record = records.get(record_id)
        return record if record is not None and record.account_id == account.id else None

    def account_patients(self, account: Account) -> Iterator[Patient]:
        return (p for p in self.patients.values() if p.account_id == account.id)

    def account_attachments(self, account: Account) -> Iterator[Attachment]:
        return (a for a in self.attachments.values() if a.account_id == account.id)

    def storage_used(self, account: Account) -> int:
        """Bytes of every attachment of the account, archived ones included."""
        return sum(a.upload_size for a in self.account_attachments(account))

    def add_patient(self, account: Account, fields: dict[str, Any]) -> Patient:
        now = utc_now_iso()
        patient = Patient(id=self.new_id(), account_id=account.id, created_at=now, updated_at=now, **fields)
        self.patients[patient.id] = patient
        self.save()
        return patient

    def new_object_file(self) -> Path:
        return self.objects_dir / secrets.token_hex(16)

    def put_object(self, obj: StoredObject) -> None:
        """Store (or overwrite, as S3 does) an object; bytes an attachment claimed stay its own."""
        replaced = self.objects.get((obj.bucket, obj.key))
        if replaced is not None and replaced.claimed_by is None:
            (self.data_dir / replaced.path).unlink(missing_ok=True)
        self.objects[(obj.bucket, obj.key)] = obj
        self.save()

    def drop_object(self, bucket: str, key: str, path: str) -> None:
        """Forget an object if it is still the one stored from `path`."""
        obj = self.objects.get((bucket, key))
        if obj is not None and obj.path == path:
            del self.objects[(bucket, key)]
