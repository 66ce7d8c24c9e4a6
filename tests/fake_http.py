"""Transport-level HTTP fakes: a ``requests`` adapter that answers from a script and records requests."""

from __future__ import annotations

import io
import json as jsonlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
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


# What ``GET /user`` answers unless a test scripts it: the hooks ask it once per API key, to pace the
# key on its user's rate budget (see cliniko_provider.utils.budget.user_budget).
USER = {"id": 1001, "first_name": "Test", "last_name": "User"}


def is_user_look_up(method: str | None, url: str) -> bool:
    """True for ``GET /user`` (the hooks' one look-up of the key's user)."""
    return method == "GET" and urlsplit(url).path.endswith("/v1/user")


def after_look_up(sent: list[Any]) -> list[Any]:
    """The requests after the first, which must be the hooks' one ``GET /user`` (and the only one).

    :param sent: recorded requests (``requests.PreparedRequest`` or ``httpx.Request``).
    """
    assert sent and is_user_look_up(sent[0].method, str(sent[0].url)), "a hook asks GET /user first"
    rest = sent[1:]
    assert not any(is_user_look_up(r.method, str(r.url)) for r in rest), "GET /user once per key"
    return rest


class ScriptedAdapter(BaseAdapter):
    """Answers each request with the next scripted answer (or ``route(request)``), recording requests.

    ``GET /user`` is answered with ``user`` (and recorded like any request) unless ``user`` is None:
    then the script or the route answers it too.
    """

    def __init__(
        self,
        answers: list[Answer] | None = None,
        route: Callable[[Any], Answer] | None = None,
        user: Mapping[str, Any] | None = USER,
    ):
        super().__init__()
        self.answers = list(answers or [])
        self.route = route
        self.user = user
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self.requests.append(request)
        if self.user is not None and is_user_look_up(request.method, str(request.url)):
            answer = Answer(200, dict(self.user))
        else:
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


def answering_user(
    handler: Callable[[httpx.Request], httpx.Response],
    user: Mapping[str, Any] = USER,
    asked: list[httpx.Request] | None = None,
) -> Callable[[httpx.Request], httpx.Response]:
    """An ``httpx.MockTransport`` handler that answers ``GET /user`` with ``user`` (recording it in
    ``asked``), else asks ``handler``."""

    def answer(request: httpx.Request) -> httpx.Response:
        if is_user_look_up(request.method, str(request.url)):
            if asked is not None:
                asked.append(request)
            return httpx.Response(200, json=dict(user))
        return handler(request)

    return answer


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
