"""The one retry and rate-limit policy shared by the sync hook, the async hook and the S3 upload."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RATE_LIMIT_MARGIN = 0.5  # seconds added to X-RateLimit-Reset, which has one-second resolution


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a request again, and how long to wait first.

    :param max_attempts: attempts in all, the first included.
    :param backoff_base: first backoff in seconds; doubles each attempt.
    :param backoff_max: ceiling of one backoff.
    :param max_rate_limit_wait: longest wait for a 429 to clear; a later reset is an error.
    """

    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_rate_limit_wait: float = 65.0

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Exponential backoff with jitter: half fixed, half random.

        :param attempt: the attempt that just failed (1 for the first).
        :param rand: a source of floats in [0, 1).
        """
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return float(ceiling / 2 + ceiling / 2 * rand())

    def rate_limit_wait(self, headers: Mapping[str, str], now: float) -> float | None:
        """Seconds until the rate limit resets, from ``X-RateLimit-Reset`` or ``Retry-After``.

        :param headers: the 429 answer's headers (case-insensitive mapping).
        :param now: the current UNIX time.
        """
        reset = headers.get("X-RateLimit-Reset") or headers.get("x-ratelimit-reset")
        if reset:
            try:
                return max(0.0, float(reset) - now) + RATE_LIMIT_MARGIN
            except ValueError:
                pass
        retry_after = headers.get("Retry-After") or headers.get("retry-after")
        if retry_after:
            try:
                return max(0.0, float(retry_after))
            except ValueError:
                try:
                    return max(0.0, parsedate_to_datetime(retry_after).timestamp() - now)
                except (TypeError, ValueError):
                    pass
        return None

    def delay(
        self,
        attempt: int,
        status: int | None,
        headers: Mapping[str, str],
        now: float,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before trying again, or ``None`` when the failure is final.

        :param attempt: the attempt that just failed (1 for the first).
        :param status: the HTTP status, or ``None`` for a connection error or timeout.
        :param headers: the answer's headers (empty for a connection error).
        :param now: the current UNIX time.
        :param rand: a source of floats in [0, 1).
        """
        if attempt >= self.max_attempts or not is_retryable(status):
            return None
        if status == 429:
            wait = self.rate_limit_wait(headers, now)
            if wait is None:
                return self.backoff(attempt, rand)
            return wait if wait <= self.max_rate_limit_wait else None
        return self.backoff(attempt, rand)


def is_retryable(status: int | None) -> bool:
    """True for connection errors (``None``), 429 and 5xx.

    :param status: the HTTP status, or ``None`` when no answer came.
    """
    return status is None or status == 429 or status >= 500
