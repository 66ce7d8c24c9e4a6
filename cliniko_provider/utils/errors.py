"""The error map: what Cliniko's answers mean, as typed exceptions (error statuses, unusable bodies)."""

from __future__ import annotations

import json
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


def excerpt(content: bytes, limit: int = EXCERPT_LIMIT) -> str:
    """Return the start of a body as one short line of printable text (for messages).

    :param content: the body.
    :param limit: the most characters returned.
    """
    text = one_line(content[: limit * 4].decode("utf-8", "replace"))
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


def error_for_answer(status: int, body: str, request: str) -> ClinikoAPIError:
    """Build the typed error for a failed answer, carrying Cliniko's message and field errors.

    :param status: the HTTP status.
    :param body: the answer's text (JSON or plain text).
    :param request: ``"METHOD /path"`` of the call.
    """
    message, errors = parse_error_body(body)
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
