"""The running sandbox: settings, state, traffic rules, presigning and the processing loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from cliniko_provider.sandbox.config import (
    MAX_OBJECT_SIZE,
    S3_ACCESS_KEY_ID,
    SandboxSettings,
    bucket_of,
    region_of,
)
from cliniko_provider.sandbox.examples import seed_example_patients
from cliniko_provider.sandbox.store import (
    Account,
    Attachment,
    Patient,
    Store,
    StoredObject,
    key_digest,
    utc_now_iso,
)
from cliniko_provider.sandbox.traffic import FaultInjector, RateLimiter, Stats

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("cliniko_provider.sandbox")

_PRESIGNED_FIELD_ORDER = (
    "key",
    "policy",
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-algorithm",
    "x-amz-date",
    "success_action_status",
    "acl",
)
_MB = 1024 * 1024


class StorageLimitReached(Exception):
    """The account has no file storage left (see the package docstring for the answer chosen)."""


class Sandbox:
    """Holds everything one server needs; the HTTP layers call into it."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.store = Store(settings.data_dir)
        self.accounts_by_key = {key: self.store.ensure_account(key) for key in settings.api_keys}
        self.seeded = 0  # example patients created at start-up
        if settings.seed_example_patients:
            for account in self.accounts_by_key.values():
                self.seeded += len(seed_example_patients(self.store, account))
        self.stats = Stats()
        self.faults = FaultInjector(settings.seed)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_window)
        self.buckets = {bucket_of(account.shard): account.shard for account in self.accounts_by_key.values()}
        self._s3_clients: dict[str, S3Client] = {}
        self._wake_processor = asyncio.Event()
        # Open connections by client address, so the S3 endpoint can cut one (test support).
        self.transports: dict[tuple[str, int], asyncio.Transport] = {}

    def account_for_key(self, api_key: str) -> Account | None:
        """The account of a configured key (or of the key whose user a ``--same-user-key`` shares);
        storage use is read afresh from the store."""
        digest = key_digest(api_key)
        for extra, key in self.settings.same_user_keys.items():
            if key_digest(extra) == digest:
                api_key = key
        account = self.store.account_for_key(api_key)
        configured = {known.id for known in self.accounts_by_key.values()}
        return account if account is not None and account.id in configured else None

    # -- storage limit -------------------------------------------------------------------

    def storage_left(self, account: Account) -> int:
        if self.settings.storage_limit is None:
            return MAX_OBJECT_SIZE
        return min(MAX_OBJECT_SIZE, self.settings.storage_limit - self.store.storage_used(account))

    # -- presigned posts -----------------------------------------------------------------

    def _s3_client(self, shard: str) -> S3Client:
        client = self._s3_clients.get(shard)
        if client is None:
            import boto3  # imported late: it takes a second, and only presigning needs it
            from botocore.config import Config

            client = boto3.client(
                "s3",
                region_name=region_of(shard),
                aws_access_key_id=S3_ACCESS_KEY_ID,
                aws_secret_access_key=self.store.s3_secret_key,
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
            self._s3_clients[shard] = client
        return client

    def presigned_post(self, account: Account, patient: Patient, bucket_url: str) -> dict[str, Any]:
        """What `GET /patients/{id}/attachment_presigned_post` answers."""
        size_left = self.storage_left(account)
        if size_left <= 0:
            raise StorageLimitReached
        key = f"{account.id}/patients/{patient.id}/attachments/temp/{uuid.uuid4()}/${{filename}}"
        post = self._s3_client(account.shard).generate_presigned_post(
            bucket_of(account.shard),
            key,
            Fields={"success_action_status": "201", "acl": "private"},
            Conditions=[
                {"acl": "private"},
                {"success_action_status": "201"},
                ["content-length-range", 0, size_left],
            ],
            ExpiresIn=self.settings.presign_ttl,
        )
        fields = post["fields"]
        return {"url": bucket_url, "fields": {name: fields[name] for name in _PRESIGNED_FIELD_ORDER}}

    # -- attachments and their processing --------------------------------------------------

    def create_attachment(
        self, account: Account, patient: Patient, obj: StoredObject, description: str | None
    ) -> Attachment:
        if self.settings.storage_limit is not None and obj.size > self.storage_left(account):
            raise StorageLimitReached
        now = utc_now_iso()
        delay = self.settings.processing_delay + self.settings.processing_delay_per_mb * obj.size / _MB
        attachment = Attachment(
            id=self.store.new_id(),
            account_id=account.id,
            patient_id=patient.id,
            user_id=account.user_id,
            description=description,
            upload_size=obj.size,
            upload_filename=obj.key.rsplit("/", 1)[-1],
            source_bucket=obj.bucket,
            source_key=obj.key,
            source_path=obj.path,
            process_after=time.time() + delay,
            created_at=now,
            updated_at=now,
        )
        self.store.add_attachment(attachment)
        self._wake_processor.set()
        return attachment

    def wake_processor(self) -> None:
        """Have the processing loop look again at what falls due (after a change of schedule)."""
        self._wake_processor.set()

    def _finish_processing(self, attachment: Attachment) -> None:
        """Move the upload out of temp into the attachment's own place and fill in the record.

        The file moves first: after a crash between the two steps the next run finds it moved.
        """
        source = self.store.data_dir / attachment.source_path
        target = self.store.attachments_dir / str(attachment.id)
        if source.exists():
            os.replace(source, target)
        elif not target.exists():
            log.warning("attachment %s: uploaded object is missing; left unprocessed", attachment.id)
            self.store.update_attachment(attachment, process_after=float("inf"))
            return
        size = target.stat().st_size
        settings = self.settings
        if settings.corrupt_processed_contents > 0 and size > 0:
            settings.corrupt_processed_contents -= 1
            self.stats.corrupted["processed_contents"] += 1
            _flip_first_byte(target)
        if settings.corrupt_processed_sizes > 0:
            settings.corrupt_processed_sizes -= 1
            self.stats.corrupted["processed_sizes"] += 1
            size += 1
        now = utc_now_iso()
        with self.store.transaction():
            self.store.drop_object(attachment.source_bucket, attachment.source_key, attachment.source_path)
            self.store.update_attachment(
                attachment,
                content_path=str(target.relative_to(self.store.data_dir)),
                filename=attachment.upload_filename,
                content_type=mimetypes.guess_type(attachment.upload_filename)[0]
                or "application/octet-stream",
                size=size,
                processed_at=now,
                updated_at=now,
                processing_completed=True,
            )

    async def process_forever(self) -> None:
        """Finish attachments as they fall due; runs for the server's lifetime, resumes after restarts."""
        while True:
            now = time.time()
            due = self.store.due_attachments(now)
            for attachment in due:
                self._finish_processing(attachment)
                await asyncio.sleep(0)  # a long batch must not hold up the requests
            if due:
                continue
            next_due = self.store.next_due() or now + 60
            self._wake_processor.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._wake_processor.wait(), timeout=min(60.0, max(0.01, next_due - now))
                )


def _flip_first_byte(path: os.PathLike[str]) -> None:
    """Flip the first byte of a file in place (the `corrupt_processed_contents` fault)."""
    with open(path, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
