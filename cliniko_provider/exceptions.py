"""Errors raised by the Cliniko provider.

Errors that retrying cannot fix (bad configuration, bad input, Cliniko's 4xx answers) also derive
from ``AirflowFailException`` so the task fails at once instead of burning its retries.
"""

from __future__ import annotations

from collections.abc import Mapping

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException


class ClinikoError(AirflowException):
    """Base class of every error raised by this provider."""


class ClinikoConfigError(ClinikoError, AirflowFailException):
    """The Cliniko connection is unusable (missing or malformed key, User-Agent or base URL)."""


class ClinikoInputError(ClinikoError, AirflowFailException):
    """An argument given to a hook, operator or sensor is invalid."""


class ClinikoPermanentError(ClinikoError, AirflowFailException):
    """A failure that retrying cannot fix, e.g. reported by a trigger event marked not retryable."""


class ClinikoConnectionError(ClinikoError):
    """Cliniko could not be reached (after retries)."""


class ClinikoAnswerError(ClinikoError):
    """Cliniko (or what stands at the connection's host) answered with something unusable: not JSON, not
    an object, too large, or a link off the base URL."""


MESSAGE_LIMIT = 300  # characters of a server's message kept in an exception (and so in XCom)


def capped(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Return ``text`` cut to ``limit`` characters, marking the cut with an ellipsis.

    :param text: the text (e.g. a server's error message).
    :param limit: the most characters returned.
    """
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class ClinikoAPIError(ClinikoError):
    """Cliniko answered with an error status.

    :param status: the HTTP status code.
    :param message: Cliniko's message (``message`` field or plain-text body).
    :param errors: Cliniko's field errors (``{"field": "problem"}``), empty when none.
    :param request: ``"METHOD /path"`` of the failed call (never includes credentials).
    """

    def __init__(
        self, status: int, message: str, errors: Mapping[str, str] | None = None, request: str = ""
    ) -> None:
        self.status = status
        self.message = capped(message)
        self.errors = {
            capped(str(name), 60): capped(str(problem), 120) for name, problem in (errors or {}).items()
        }
        self.request = capped(request, 120)
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"Cliniko answered {self.status}"
        if self.request:
            text += f" to {self.request}"
        text += f": {self.message}"
        if self.errors:
            text += (
                " (" + capped("; ".join(f"{name} {problem}" for name, problem in self.errors.items())) + ")"
            )
        hint = self.hint()
        return f"{text.rstrip('.')}. {hint}" if hint else text

    def hint(self) -> str:
        """Return what the user can do about this error (empty when nothing specific)."""
        return ""

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status, self.message, self.errors, self.request))


class ClinikoClientError(ClinikoAPIError, AirflowFailException):
    """A 4xx answer other than 429: the request itself is wrong, so it is not retried."""


class ClinikoAuthError(ClinikoClientError):
    """401: the API key is wrong, revoked or belongs to another shard."""

    def hint(self) -> str:
        return (
            "Check the API key in the connection's Password field (Cliniko: My Info > Manage API keys) "
            "and that its shard suffix (e.g. -au1) matches the account"
        )


class ClinikoPermissionError(ClinikoClientError):
    """403: the key's user may not do this."""

    def hint(self) -> str:
        return "The API key's Cliniko user lacks permission for this; use a key of a user who has it"


class ClinikoNotFoundError(ClinikoClientError):
    """404: no such record in this account."""

    def hint(self) -> str:
        return "Check the id, and that the API key belongs to the account holding the record"


class ClinikoValidationError(ClinikoClientError):
    """422: Cliniko rejected the request's fields."""


class ClinikoStorageLimitError(ClinikoValidationError):
    """The account's file storage is full (free-trial accounts have a cap)."""

    def hint(self) -> str:
        return "Free space in Cliniko (archive old files) or upgrade the account; retrying will not help"


class ClinikoRateLimitError(ClinikoAPIError):
    """429 answers went on past the retry budget."""

    def hint(self) -> str:
        return (
            "Too many requests for this API key (Cliniko allows 200 a minute): run fewer uploads at "
            "once, e.g. with an Airflow pool"
        )


class ClinikoServerError(ClinikoAPIError):
    """5xx answers went on past the retry budget."""

    def hint(self) -> str:
        return "Cliniko had a server error; the task's own retries may succeed later"


class S3UploadError(ClinikoError):
    """S3 refused the file upload.

    :param status: the HTTP status from S3 (0 when the connection broke).
    :param code: S3's error ``Code`` (e.g. ``AccessDenied``).
    :param message: S3's error ``Message``.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = capped(code, 60)
        self.message = capped(message)
        super().__init__(f"S3 refused the upload ({status} {self.code}): {self.message}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status, self.code, self.message))


class S3UploadRejectedError(S3UploadError, AirflowFailException):
    """S3 refused the upload for a reason a retry cannot fix (size, policy conditions, form)."""


class ClinikoAttachmentGoneError(ClinikoError, AirflowFailException):
    """The attachment waited on is archived, deleted or never existed, so it will never be processed.

    :param attachment_id: the attachment id.
    :param reason: ``"archived"`` or ``"not_found"`` (deleted, or never existed in this account).
    :param archived_at: when it was archived (for ``"archived"``).
    :param message: the full message, when already written (e.g. carried by a trigger event).
    """

    def __init__(
        self,
        attachment_id: str,
        reason: str,
        archived_at: str | None = None,
        message: str | None = None,
    ) -> None:
        self.attachment_id = attachment_id
        self.reason = reason
        self.archived_at = archived_at
        if message:
            text = message
        elif reason == "archived":
            text = (
                f"Cliniko attachment {attachment_id} was archived at {archived_at}, so it will never finish "
                "processing. Restore it in Cliniko or upload the file again, then clear this task"
            )
        else:
            text = (
                f"Cliniko attachment {attachment_id} does not exist: it was deleted, or never existed in "
                "the account of this connection's API key. Check the attachment id (e.g. the upload "
                "task's XCom) and that the connection's key belongs to the account holding it"
            )
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.attachment_id, self.reason, self.archived_at, str(self)))


class S3IntegrityError(ClinikoError):
    """S3 holds other bytes than were sent: its ETag is not the MD5 of the file, even after sending it again.

    Retryable: the task's retries send the file anew (nothing was created in Cliniko for it).
    """


class ClinikoIntegrityError(ClinikoError, AirflowFailException):
    """What Cliniko made of a file differs from what was sent (its size, name or bytes), once processed.

    Not retried: a retry would find the same attachment. The message names the attachment to check.
    """


class ClinikoDeferralError(ClinikoError):
    """Airflow ended a deferred wait for Cliniko's processing before the trigger reported.

    Its deferral timeout passed (the triggerer down or behind) or the trigger failed in the triggerer.
    Retryable: the attachment exists; a retry finds it (uploading nothing again) and waits anew.
    """


class ClinikoBatchError(ClinikoError):
    """Some uploads of a batch failed, and retrying the task may fix at least one of them."""


class ClinikoBatchFinalError(ClinikoBatchError, AirflowFailException):
    """Some uploads of a batch failed, each for a reason retrying cannot fix (bad input, 4xx answers)."""


class ClinikoReconcileError(ClinikoError, AirflowFailException):
    """Attachments a manifest lists are missing, archived or changed in Cliniko.

    Not retried: a retry would find the same.
    """
