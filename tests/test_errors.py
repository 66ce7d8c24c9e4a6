"""The one redaction: what a Redactor blanks out, and what it must leave readable."""

from __future__ import annotations

import base64

import pytest

from cliniko_provider.exceptions import ClinikoAuthError
from cliniko_provider.utils.errors import REDACTED, Redactor, error_for_answer, excerpt, redact

REAL_SHAPED_KEY = "MS0xMjM0NTY3ODkwMTIzNDU2Nzg5LWFiY2RlZmdoaWprbG1ub3A-au2"
CREDENTIALS = base64.b64encode(f"{REAL_SHAPED_KEY}:".encode()).decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: Basic {CREDENTIALS}", "Authorization: Basic ***"),
        ("authorization=bearer abcdefgh12345678", "authorization=bearer ***"),
        (f"user {REAL_SHAPED_KEY} unknown", "user *** unknown"),
        (f'{{"Authorization": "{REAL_SHAPED_KEY}"}}', '{"Authorization": "***"}'),
        (
            "policy=eyJleHBpcmF0aW9uIjoiMjAyNCJ9&x-amz-signature=0123456789abcdef",
            "policy=***&x-amz-signature=***",
        ),
        ('"X-Amz-Signature": "0123456789abcdef0123"', '"X-Amz-Signature": "***"'),
        ("<StringToSign>eyJleHBpcmF0aW9u</StringToSign>", "<StringToSign>***</StringToSign>"),
        ("<SignatureProvided>0123abcd</SignatureProvided>", "<SignatureProvided>***</SignatureProvided>"),
    ],
)
def test_secret_shapes_are_blanked_whatever_the_key(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        'Invalid according to Policy: Policy Condition failed: ["eq", "$key", "a/b"]',
        "Basic auth failed",
        "Patient attachment 123 has signature pending",
        "Cliniko answered 422 to POST /patient_attachments: Upload url is invalid",
        "key StAnDiNsEcReT-au1 is short",  # not a real key's shape: only known keys are blanked
    ],
)
def test_ordinary_messages_stay_readable(text: str) -> None:
    assert redact(text) == text


def test_known_secrets_are_blanked_wherever_they_appear() -> None:
    short_key = "StAnDiNsEcReT-au1"
    credentials = base64.b64encode(f"{short_key}:".encode()).decode()
    redactor = Redactor([short_key, credentials, "abc"])  # too short to blank: ignored
    assert redactor(f"x{short_key}y {credentials} abc") == f"x{REDACTED}y {REDACTED} abc"
    redactor.add("presign-policy-value")
    assert redactor("policy was presign-policy-value") == "policy was ***"


def test_error_for_answer_redacts_message_and_field_errors() -> None:
    body = (
        f'{{"message": "Rejected Authorization: Basic {CREDENTIALS}", '
        f'"errors": {{"Basic {CREDENTIALS}": ["user {REAL_SHAPED_KEY}"]}}}}'
    )
    error = error_for_answer(401, body, "GET /user")
    assert isinstance(error, ClinikoAuthError)
    assert CREDENTIALS not in str(error) and REAL_SHAPED_KEY not in str(error)
    assert error.message == "Rejected Authorization: Basic ***"
    assert error.errors == {"Basic ***": "user ***"}
    assert (
        "dGhlLWtleQ"
        not in error_for_answer(500, "token dGhlLWtleQ", "GET /", Redactor(["dGhlLWtleQ"])).message
    )


def test_an_excerpt_of_an_unusable_body_is_redacted() -> None:
    assert excerpt(f"<html>Authorization: Basic {CREDENTIALS}</html>".encode()) == (
        "<html>Authorization: Basic ***</html>"
    )
