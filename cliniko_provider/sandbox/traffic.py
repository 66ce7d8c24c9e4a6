"""Traffic shaping and accounting: the per-key rate limit, injected faults and request stats."""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

Fault = Literal["fail", "throttle"]


class RateLimiter:
    """A sliding window of `limit` requests per `window` seconds for each user (all of a user's keys)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._seen: dict[str, deque[float]] = {}

    def admit(self, key: str, now: float) -> int | None:
        """Record a request and return None, or return the epoch second when one is allowed again."""
        seen = self._seen.setdefault(key, deque())
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) >= self.limit:
            return math.ceil(seen[0] + self.window)
        seen.append(now)
        return None


class FaultInjector:
    """Draws the injected faults; `--seed` makes the sequence reproducible."""

    def __init__(self, seed: int | None) -> None:
        self.random = random.Random(seed)

    def draw(self, fail_rate: float, throttle_rate: float) -> Fault | None:
        roll = self.random.random()
        if roll < fail_rate:
            return "fail"
        if roll < fail_rate + throttle_rate:
            return "throttle"
        return None

    def failure_status(self) -> int:
        return self.random.choice((500, 502, 503))


def mask_key(api_key: str) -> str:
    """How stats name a key: enough to tell keys apart, never the whole secret."""
    return f"{api_key[:4]}…{api_key[-6:]}" if len(api_key) > 12 else f"…{api_key[-4:]}"


@dataclass
class Stats:
    requests_by_route: Counter[str] = field(default_factory=Counter)
    requests_by_key: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    injected_throttles: int = 0
    injected_failures: int = 0
    bytes_received: int = 0
    uploads: int = 0
    content_reads: int = 0  # GET /patient_attachments/{id}/content answered with the file
    content_bytes: int = 0  # bytes of content those answers carried
    corrupted: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests_total": sum(self.requests_by_route.values()),
            "requests_by_route": dict(self.requests_by_route),
            "requests_by_key": dict(self.requests_by_key),
            "rate_limited": self.rate_limited,
            "injected_throttles": self.injected_throttles,
            "injected_failures": self.injected_failures,
            "bytes_received": self.bytes_received,
            "uploads": self.uploads,
            "content_reads": self.content_reads,
            "content_bytes": self.content_bytes,
            "corrupted": dict(self.corrupted),
        }
