"""The error map: what Cliniko's answers mean, as typed exceptions (error statuses, unusable bodies).

Also the one place secrets are taken out of text: every message bound for a log, an exception or XCom
that may hold a server's words goes through a :class:`Redactor`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from cliniko_provider.exceptions import (
    ClinikoAnswerError,
    ClinikoAPIError,
    ClinikoAuthError,
    ClinikoClientError,
    ClinikoNotFoundError,
    ClinikoPermissionError,
    ClinikoRateLimitError,
    ClinikoServerError,
    ClinikoStorageLimitError,
    ClinikoValidationError,
)
from cliniko_provider.utils.validation import one_line

EXCERPT_LIMIT = 80
REDACTED = "***"

# Shapes of secrets a server may echo, whatever the key: "Basic <credentials>", an Authorization header
# or a presign's policy or signature given as name and value, S3's StringToSign / SignatureProvided,
# and a Cliniko API key (ends with its shard). Each keeps its name and loses its value.
SECRET_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(basic|bearer)(\s+)[A-Za-z0-9+/=_.~-]{8,}"), rf"\1\2{REDACTED}"),
    (
        re.compile(
            r"(?i)\b(authorization|x-amz-signature|x-amz-security-token|signature|policy|api[_ -]?key)"
            r"([\"']?\s*[:=]\s*[\"']?)(?!basic\b|bearer\b)[A-Za-z0-9+/=_.~%-]{12,}"
        ),
        rf"\1\2{REDACTED}",
    ),
    (
        re.compile(r"(?i)(<(stringtosign|stringtosignbytes|signatureprovided|canonicalrequest)>)[^<]*"),
        rf"\1{REDACTED}",
    ),
    (re.compile(r"\b[A-Za-z0-9+/_]{20,}={0,2}-[a-z]{2}[0-9]{1,2}\b"), REDACTED),
)


class Redactor:
    """Takes secrets out of text bound for a log, an exception or XCom.

    Blanks the secrets it was given (a connection's API key and Basic credentials, a presign's policy
    and signature) wherever they appear, and anything shaped like a secret (:data:`SECRET_SHAPES`),
    known or not.

    :param secrets: secrets to blank out; more can be added with :meth:`add`.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Blank these out too (values shorter than 4 characters are ignored: they would blank words).

        :param secrets: the secrets.
        """
        self._secrets.update(secret for secret in secrets if len(secret) >= 4)

    def __call__(self, text: str) -> str:
        """Return ``text`` with every known secret and every secret-shaped value blanked out.

        :param text: the text.
        """
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        for pattern, replacement in SECRET_SHAPES:
            text = pattern.sub(replacement, text)
        return text


def redact(text: str) -> str:
    """Return ``text`` with every secret-shaped value blanked out (for text no connection is known for).

    :param text: the text.
    """
    return Redactor()(text)


def excerpt(content: bytes, limit: int = EXCERPT_LIMIT) -> str:
    """Return the start of a body as one short line of printable text (for messages).

    :param content: the body.
    :param limit: the most characters returned.
    """
    text = redact(one_line(content[: limit * 4].decode("utf-8", "replace")))
    text = "".join(char if char.isprintable() else "?" for char in text)
    return text[:limit] + ("..." if len(text) > limit else "")


def decode_json_object(content: bytes, content_type: str, what: str) -> dict[str, Any]:
    """Decode an answer that must be a JSON object; otherwise raise a clear :class:`ClinikoAnswerError`.

    :param content: the body.
    :param content_type: the answer's ``Content-Type`` (named in the message).
    :param what: the request, ``"METHOD /path"``.
    """
    data: Any = None
    try:
        data = json.loads(content)
        kind = f"JSON that is not an object ({type(data).__name__})"
    except ValueError:  # UnicodeDecodeError included
        kind = "something that is not JSON"
    if isinstance(data, dict):
        return data
    raise ClinikoAnswerError(
        f"Cliniko answered {what} with {kind}: Content-Type {excerpt(content_type.encode(), 60)!r}, body "
        f"starting {excerpt(content)!r}. Check that the connection's host is Cliniko's API (e.g. "
        "https://api.au1.cliniko.com/v1, or leave it empty) and not a web page or a proxy."
    )


_CLIENT_ERRORS: dict[int, type[ClinikoClientError]] = {
    401: ClinikoAuthError,
    403: ClinikoPermissionError,
    404: ClinikoNotFoundError,
    422: ClinikoValidationError,
}


def error_for_answer(
    status: int, body: str, request: str, redactor: Redactor | None = None
) -> ClinikoAPIError:
    """Build the typed error for a failed answer, carrying Cliniko's message and field errors, redacted.

    :param status: the HTTP status.
    :param body: the answer's text (JSON or plain text).
    :param request: ``"METHOD /path"`` of the call.
    :param redactor: blanks the connection's secrets out (default: secret-shaped values only).
    """
    clean = redactor or Redactor()
    message, raw_errors = parse_error_body(body)
    message = clean(message)
    errors = {clean(name): clean(problem) for name, problem in raw_errors.items()}
    if not message:
        message = {401: "unauthorised", 404: "not found", 429: "rate limit exceeded"}.get(status, "error")
    if status == 429:
        return ClinikoRateLimitError(status, message, errors, request)
    if status >= 500:
        return ClinikoServerError(status, message, errors, request)
    if status == 422 and any("storage" in str(problem).lower() for problem in errors.values()):
        return ClinikoStorageLimitError(status, message, errors, request)
    error_type = _CLIENT_ERRORS.get(status, ClinikoClientError)
    return error_type(status, message, errors, request)


def parse_error_body(body: str) -> tuple[str, dict[str, str]]:
    """Return Cliniko's message and field errors from an error body (JSON or plain text).

    :param body: the answer's text.
    """
    text = body.strip()
    try:
        data = json.loads(text) if text.startswith("{") else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return text[:300], {}
    raw_errors = data.get("errors") or {}
    errors: dict[str, str] = {}
    if isinstance(raw_errors, dict):
        for field_name, problem in raw_errors.items():
            errors[str(field_name)] = (
                ", ".join(map(str, problem)) if isinstance(problem, list) else str(problem)
            )
    return str(data.get("message") or data.get("error") or "")[:300], errors
