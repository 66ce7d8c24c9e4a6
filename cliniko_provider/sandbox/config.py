"""Sandbox settings: the command-line values, some of which the control endpoints change at run time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_API_KEY = "sandbox-api-key-au1"
DEFAULT_SHARD = "au1"
# Cliniko's documented shard pattern: two letters then one or two digits.
SHARD_PATTERN = re.compile(r"^[a-z]{2}\d{1,2}$", re.IGNORECASE)
MAX_OBJECT_SIZE = 5 * 1024**3
S3_ACCESS_KEY_ID = "AKIACLINIKOSANDBOX00"

_REGION_BY_SHARD_PREFIX = {
    "au": "ap-southeast-2",
    "uk": "eu-west-2",
    "eu": "eu-central-1",
    "ca": "ca-central-1",
    "us": "us-east-1",
}


def shard_of(api_key: str) -> str:
    """The shard named by the key's suffix after its last `-`; keys without one belong to au1."""
    _, dash, suffix = api_key.rpartition("-")
    return suffix.lower() if dash and SHARD_PATTERN.match(suffix) else DEFAULT_SHARD


def strip_shard(api_key: str) -> str:
    """The key without its shard suffix (Cliniko accepts a key with or without it)."""
    head, dash, suffix = api_key.rpartition("-")
    return head if dash and SHARD_PATTERN.match(suffix) else api_key


def region_of(shard: str) -> str:
    return _REGION_BY_SHARD_PREFIX.get(shard[:2], "us-east-1")


def bucket_of(shard: str) -> str:
    return f"cliniko-sandbox-{shard}"


def parse_rate_limit(text: str) -> tuple[int, float]:
    """`N/SECONDS` -> (N, SECONDS), e.g. `200/60`."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*", text)
    if not match or int(match[1]) < 1 or float(match[2]) <= 0:
        raise ValueError(f"rate limit must look like N/SECONDS, e.g. 200/60, not {text!r}")
    return int(match[1]), float(match[2])


def parse_same_user_key(text: str) -> tuple[str, str]:
    """`NEW_KEY=KEY` -> (NEW_KEY, KEY): a second API key of the user of KEY."""
    new_key, equals, key = text.partition("=")
    if not equals or not new_key.strip() or not key.strip():
        raise ValueError(f"must look like NEW_KEY=KEY, not {text!r}")
    return new_key.strip(), key.strip()


@dataclass
class SandboxSettings:
    """Everything the server needs to know; the fault fields may change while it runs."""

    data_dir: Path
    host: str = "127.0.0.1"  # the address it listens on
    api_keys: list[str] = field(default_factory=lambda: [DEFAULT_API_KEY])
    # Extra key -> the accepted key whose user it also belongs to (one account, one user, one rate limit).
    same_user_keys: dict[str, str] = field(default_factory=dict)
    processing_delay: float = 2.0
    processing_delay_per_mb: float = 0.01
    rate_limit: int = 200
    rate_window: float = 60.0
    storage_limit: int | None = None
    presign_ttl: int = 900
    fail_rate: float = 0.0
    throttle_rate: float = 0.0
    seed: int | None = None
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    idle_timeout: float = 30.0  # seconds a request body may stop arriving
    seed_example_patients: bool = False  # create the example DAGs' patients in every account
    # One-shot: cut the connection of the next S3 upload after this many body bytes.
    s3_reset_after_bytes: int | None = None
    # Counted down: the next N S3 uploads are stored with their first byte flipped (ETag and bytes
    # then differ from what was sent); the next N processed attachments get a record `size` one byte
    # more than their file, or have one byte of their content flipped (size unchanged).
    corrupt_s3_objects: int = 0
    corrupt_processed_sizes: int = 0
    corrupt_processed_contents: int = 0
