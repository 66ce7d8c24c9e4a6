"""S3 POST policy and SigV4 signature checks, written independently of boto3 (which signs).

`check_form` applies the rules of `shared/reference/s3-post.md` to the form fields that came
before the file, once the file part's name is known; `check_size` applies the policy's
`content-length-range` once the file has been read. Failures raise `S3Error`, which renders
the XML body S3 answers with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from xml.sax.saxutils import escape

from cliniko_provider.sandbox.config import MAX_OBJECT_SIZE

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_KEY_BYTES = 1024
# Fields S3 never requires the policy to name.
_UNCOVERED_FIELDS = frozenset({"x-amz-signature", "file", "policy"})
# Fields every SigV4 POST policy must name.
_REQUIRED_CONDITIONS = ("bucket", "x-amz-algorithm", "x-amz-credential", "x-amz-date")


@dataclass
class S3Error(Exception):
    status: int
    code: str
    message: str
    details: dict[str, str | int] = field(default_factory=dict)

    def xml(self) -> str:
        extra = "".join(f"<{name}>{escape(str(value))}</{name}>" for name, value in self.details.items())
        request_id = secrets.token_hex(8).upper()
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{escape(self.message)}</Message>{extra}"
            f"<RequestId>{request_id}</RequestId><HostId>{secrets.token_urlsafe(24)}</HostId></Error>"
        )


def policy_error(reason: str) -> S3Error:
    return S3Error(403, "AccessDenied", f"Invalid according to Policy: {reason}")


def missing_field(name: str) -> S3Error:
    return S3Error(
        400,
        "InvalidArgument",
        f"Bucket POST must contain a field named '{name}'.  If it is specified, please check the order"
        " of the fields.",
        {"ArgumentName": name, "ArgumentValue": ""},
    )


def signing_key(secret_key: str, day: str, region: str) -> bytes:
    """The SigV4 key: HMAC chain over "AWS4"+secret, date, region, "s3", "aws4_request"."""
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign_policy(policy_b64: str, secret_key: str, day: str, region: str) -> str:
    return hmac.new(signing_key(secret_key, day, region), policy_b64.encode(), hashlib.sha256).hexdigest()


def substitute_filename(fields: Mapping[str, str], filename: str) -> dict[str, str]:
    """Replace `${filename}` in every value but the policy and signature, as S3 does."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return {
        name: value if name in ("policy", "x-amz-signature") else value.replace("${filename}", base)
        for name, value in fields.items()
    }


@dataclass(frozen=True)
class Policy:
    expiration: datetime
    conditions: list[Any]
    size_range: tuple[int, int]


def _decode_policy(policy_b64: str) -> Policy:
    try:
        document = json.loads(base64.b64decode(policy_b64, validate=True))
        text = document["expiration"]  # Python 3.10's fromisoformat does not read a trailing 'Z'
        expiration = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        conditions = document["conditions"]
        if not isinstance(conditions, list) or expiration.tzinfo is None:
            raise ValueError("conditions")
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise S3Error(400, "InvalidPolicyDocument", "Invalid Policy: Invalid JSON.") from None
    size_range = (0, MAX_OBJECT_SIZE)
    for condition in conditions:
        if isinstance(condition, list) and condition and condition[0] == "content-length-range":
            try:
                size_range = (int(condition[1]), int(condition[2]))
            except (IndexError, TypeError, ValueError):
                raise S3Error(
                    400, "InvalidPolicyDocument", "Invalid Policy: Invalid content-length-range."
                ) from None
    return Policy(expiration, conditions, size_range)


def _check_signature(fields: Mapping[str, str], bucket_region: str, access_key: str, secret_key: str) -> None:
    if fields["x-amz-algorithm"] != ALGORITHM:
        raise S3Error(
            400,
            "InvalidRequest",
            "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.",
        )
    credential = fields["x-amz-credential"]
    parts = credential.split("/")
    if len(parts) != 5 or parts[3] != "s3" or parts[4] != "aws4_request" or len(parts[1]) != 8:
        raise S3Error(400, "InvalidArgument", f"Invalid credential: {credential!r}")
    if parts[0] != access_key:
        raise S3Error(
            403,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
            {"AWSAccessKeyId": parts[0]},
        )
    if parts[2] != bucket_region:
        raise S3Error(
            400,
            "AuthorizationQueryParametersError",
            f"Error parsing the X-Amz-Credential parameter; the region '{parts[2]}' is wrong;"
            f" expecting '{bucket_region}'",
            {"Region": bucket_region},
        )
    expected = sign_policy(fields["policy"], secret_key, parts[1], parts[2])
    if not hmac.compare_digest(expected, fields["x-amz-signature"].lower()):
        raise S3Error(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided."
            " Check your key and signing method.",
            {"AWSAccessKeyId": parts[0]},
        )


def _condition_named_fields(conditions: list[Any]) -> set[str]:
    named: set[str] = set()
    for condition in conditions:
        if isinstance(condition, dict):
            named.update(name.lower() for name in condition)
        elif isinstance(condition, list) and len(condition) == 3 and isinstance(condition[1], str):
            named.add(condition[1].lstrip("$").lower())
    return named


def _check_condition(condition: Any, values: Mapping[str, str]) -> None:
    if isinstance(condition, dict):
        for name, expected in condition.items():
            _check_condition(["eq", f"${name}", expected], values)
        return
    if not isinstance(condition, list) or len(condition) != 3:
        raise S3Error(400, "InvalidPolicyDocument", f"Invalid Policy: Invalid Condition: {condition!r}")
    op, target, expected = condition
    if op == "content-length-range":
        return
    if op not in ("eq", "starts-with") or not isinstance(target, str) or not target.startswith("$"):
        raise S3Error(400, "InvalidPolicyDocument", f"Invalid Policy: Invalid Condition: {condition!r}")
    actual = values.get(target[1:].lower())
    passed = actual is not None and (actual == expected if op == "eq" else actual.startswith(str(expected)))
    if not passed:
        raise policy_error(f"Policy Condition failed: {json.dumps(condition)}")


def check_form(
    fields: Mapping[str, str],
    *,
    bucket: str,
    bucket_region: str,
    access_key: str,
    secret_key: str,
    now: datetime | None = None,
) -> Policy:
    """Check the fields sent before the file (names lower-cased, `${filename}` replaced)."""
    for name in ("key", "policy", "x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-signature"):
        if name not in fields:
            raise missing_field(name)
    if len(fields["key"].encode()) > MAX_KEY_BYTES:
        raise S3Error(400, "KeyTooLongError", "Your key is too long")
    _check_signature(fields, bucket_region, access_key, secret_key)
    policy = _decode_policy(fields["policy"])
    if (now or datetime.now(timezone.utc)) >= policy.expiration:
        raise policy_error("Policy expired.")
    named = _condition_named_fields(policy.conditions)
    for required in _REQUIRED_CONDITIONS:
        if required not in named:
            raise S3Error(
                400, "InvalidPolicyDocument", f"Invalid Policy: Policy missing condition: {required}"
            )
    extra = [
        name
        for name in fields
        if name not in _UNCOVERED_FIELDS and not name.startswith("x-ignore-") and name not in named
    ]
    if extra:
        raise policy_error(f"Extra input fields: {', '.join(extra)}")
    values = {**fields, "bucket": bucket}
    for condition in policy.conditions:
        _check_condition(condition, values)
    return policy


def too_large(proposed: int, maximum: int) -> S3Error:
    return S3Error(
        400,
        "EntityTooLarge",
        "Your proposed upload exceeds the maximum allowed size",
        {"ProposedSize": proposed, "MaxSizeAllowed": maximum},
    )


def check_size(size: int, policy: Policy) -> None:
    minimum, maximum = policy.size_range
    if size > min(maximum, MAX_OBJECT_SIZE):
        raise too_large(size, min(maximum, MAX_OBJECT_SIZE))
    if size < minimum:
        raise S3Error(
            400,
            "EntityTooSmall",
            "Your proposed upload is smaller than the minimum allowed size",
            {"ProposedSize": size, "MinSizeAllowed": minimum},
        )
