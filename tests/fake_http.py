"""Transport-level HTTP fakes: a ``requests`` adapter that answers from a script and records requests."""

from __future__ import annotations

import io
import json as jsonlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3
from requests.adapters import BaseAdapter


@dataclass
class Answer:
    """One scripted answer: a status, a body and headers; or an exception to raise instead."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    raise_error: Exception | None = None


class ScriptedAdapter(BaseAdapter):
    """Answers each request with the next scripted answer (or ``route(request)``), recording requests."""

    def __init__(self, answers: list[Answer] | None = None, route: Callable[[Any], Answer] | None = None):
        super().__init__()
        self.answers = list(answers or [])
        self.route = route
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self.requests.append(request)
        answer = self.route(request) if self.route else self.answers.pop(0)
        if answer.raise_error is not None:
            raise answer.raise_error
        response = requests.Response()
        response.status_code = answer.status
        body = answer.body
        if isinstance(body, (dict, list)):
            content = jsonlib.dumps(body).encode()
            response.headers["Content-Type"] = "application/json"
        elif isinstance(body, bytes):
            content = body
        else:
            content = (body or "").encode()
        # streamed like a real adapter's answer: a urllib3 response over the bytes
        response.raw = urllib3.HTTPResponse(io.BytesIO(content), preload_content=False)
        response.headers.update(answer.headers)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


class FakeClock:
    """A clock that only moves when something sleeps, recording every sleep."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
