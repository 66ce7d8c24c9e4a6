"""The error map: what Cliniko's error answers mean, as typed exceptions."""

from __future__ import annotations

import json

from cliniko_provider.exceptions import (
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
