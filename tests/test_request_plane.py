"""Hostile answers against plain loopback HTTP stand-ins: what each now gets.

Each stand-in answers from a script and records every request it gets (path and headers), so a test
can prove what was, and was not, sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from cliniko_provider.exceptions import (
    ClinikoAnswerError,
    ClinikoAuthError,
    ClinikoConnectionError,
    ClinikoError,
    ClinikoServerError,
    S3UploadError,
    S3UploadRejectedError,
)
from cliniko_provider.hooks import cliniko as hook_module
from cliniko_provider.hooks.cliniko import ClinikoAsyncHook, ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator, ClinikoBatchUploadOperator
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger
from cliniko_provider.utils.budget import PROCESS_BUDGETS, MachineBudget, key_id, user_budget
from tests.conftest import REPO, connection_json
from tests.fake_http import USER, is_user_look_up
from tests.helpers import fake_context

KEY = "StAnDiNsEcReT-au1"


@dataclass
class Reply:
    status: int = 200
    body: bytes | Callable[[], Iterator[bytes]] = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class StandIn:
    """A loopback HTTP server answering each request with the next scripted reply (the last one repeats).

    ``GET /v1/user`` (the hooks' look-up of the key's user) is answered with :data:`USER` and counted
    in :attr:`looked_up`, not in :attr:`seen`.
    """

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies) or [Reply()]
        self.seen: list[Seen] = []
        self.looked_up = 0
        self.answers_user = True  # False: GET /v1/user gets the scripted replies too
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if stand_in.answers_user and is_user_look_up(self.command, self.path):
                    stand_in.looked_up += 1
                    reply = Reply(body=json.dumps(USER).encode())
                else:
                    stand_in.seen.append(Seen(self.command, self.path, dict(self.headers)))
                    reply = stand_in.replies.pop(0) if len(stand_in.replies) > 1 else stand_in.replies[0]
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if callable(reply.body) and "Content-Length" in reply.headers:  # sent as it comes
                    self.end_headers()
                    try:
                        for chunk in reply.body():
                            self.wfile.write(chunk)
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                elif callable(reply.body):
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for chunk in reply.body():
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client stopped reading: what a size cap does
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)

            do_GET = do_POST = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_ins() -> Iterator[Callable[..., StandIn]]:
    made: list[StandIn] = []

    def make(*replies: Reply) -> StandIn:
        made.append(StandIn(*replies))
        return made[-1]

    yield make
    for item in made:
        item.close()


def use(monkeypatch: pytest.MonkeyPatch, stand_in: StandIn, **extra: Any) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, f"{stand_in.url}/v1", **extra))
    PROCESS_BUDGETS.clear()


def page(items: list[dict[str, Any]], next_url: str | None) -> Reply:
    body = {"patients": items, "links": {"next": next_url} if next_url else {}, "total_entries": 3}
    return Reply(body=json.dumps(body).encode())


# --- links from answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("elsewhere", ["other-port", "other-host", "https", "userinfo"])
def test_links_next_off_the_base_url_is_never_requested(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, elsewhere: str
) -> None:
    other = stand_ins(page([{"id": "2"}], None))
    api = stand_ins()
    port = api.url.rsplit(":", 1)[1]
    next_url = {
        "other-port": f"{other.url}/v1/patients?page=2",
        "other-host": f"http://localhost:{port}/v1/patients?page=2",
        "https": f"https://127.0.0.1:{port}/v1/patients?page=2",
        "userinfo": f"http://127.0.0.1:{port}@{other.url.removeprefix('http://')}/v1/patients",
    }[elsewhere]
    api.replies = [page([{"id": "1"}], next_url)]
    use(monkeypatch, api)
    patients = ClinikoHook().find_patients()
    assert next(patients)["id"] == "1"
    with pytest.raises(ClinikoAnswerError, match=r"not the connection's base URL.*not following it"):
        next(patients)
    assert [seen.path for seen in api.seen] == ["/v1/patients?per_page=100"]
    assert api.looked_up == 1  # the key's user, before the first call
    assert other.seen == [] and other.looked_up == 0


def test_links_next_on_the_base_url_is_followed(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = stand_ins()
    api.replies = [page([{"id": "1"}], f"{api.url}/v1/patients?page=2"), page([{"id": "2"}], None)]
    use(monkeypatch, api)
    assert [p["id"] for p in ClinikoHook().find_patients()] == ["1", "2"]
    assert all("Authorization" in seen.headers for seen in api.seen)


# --- bodies that are not what was asked for ---------------------------------------------------------


HTML = b"<!doctype html><html><head><title>Sign in</title></head><body>" + b"x" * 5000 + b"</body></html>"


def test_html_200_is_a_clear_error_naming_what_came(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = stand_ins(Reply(body=HTML, headers={"Content-Type": "text/html; charset=utf-8"}))
    api.answers_user = False
    use(monkeypatch, api)
    with pytest.raises(ClinikoAnswerError) as caught:
        ClinikoHook().get_patient(1)
    message = str(caught.value)
    assert "Cliniko answered GET /patients/1 with something that is not JSON" in message
    assert "Content-Type 'text/html; charset=utf-8'" in message
    assert "'<!doctype html><html><head><title>Sign in</title></head><body>xxxxxxxxxxxxxxxxxx...'" in message
    assert len(message) < 500
    # the key's user could not be learned from the same page (its own budget serves): one try each
    assert [seen.path for seen in api.seen] == ["/v1/user", "/v1/patients/1"]
    ok, reason = ClinikoHook().test_connection()
    assert not ok and "not JSON" in reason and "Check that the connection's host" in reason


@pytest.mark.parametrize(("body", "kind"), [(b"[]", "list"), (b"null", "NoneType"), (b'"x"', "str")])
def test_json_that_is_not_an_object_is_a_clear_error(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, body: bytes, kind: str
) -> None:
    api = stand_ins(Reply(body=body))
    api.answers_user = False
    use(monkeypatch, api)
    with pytest.raises(ClinikoAnswerError, match=rf"JSON that is not an object \({kind}\)"):
        ClinikoHook().get_patient(1)
    ok, reason = ClinikoHook().test_connection()
    assert not ok and "not an object" in reason


async def test_async_html_200_is_the_same_clear_error(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, stand_ins(Reply(body=HTML, headers={"Content-Type": "text/html"})))
    hook = ClinikoAsyncHook()
    try:
        with pytest.raises(
            ClinikoAnswerError, match="GET /patient_attachments/1 with something that is not JSON"
        ):
            await hook.aget_attachment(1)
    finally:
        await hook.aclose()


def endless() -> Iterator[bytes]:
    while True:
        yield b"[" * 65536


def test_an_api_answer_past_the_cap_is_refused_without_reading_it_all(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hook_module, "MAX_ANSWER_BYTES", 100_000)
    use(monkeypatch, stand_ins(Reply(body=endless)))
    with pytest.raises(ClinikoAnswerError, match=r"larger than 97\.7 KiB; not reading it"):
        ClinikoHook().get_patient(1)


async def test_async_api_answer_past_the_cap_is_refused(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hook_module, "MAX_ANSWER_BYTES", 100_000)
    use(monkeypatch, stand_ins(Reply(body=endless)))
    hook = ClinikoAsyncHook()
    try:
        with pytest.raises(ClinikoAnswerError, match="larger than"):
            await hook.aget_attachment(1)
    finally:
        await hook.aclose()


def test_an_answer_exactly_at_the_cap_is_read(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = json.dumps({"id": "1", "pad": "x" * 1000}).encode()
    monkeypatch.setattr(hook_module, "MAX_ANSWER_BYTES", len(body))
    use(monkeypatch, stand_ins(Reply(body=body)))
    assert ClinikoHook().get_patient(1)["id"] == "1"
    monkeypatch.setattr(hook_module, "MAX_ANSWER_BYTES", len(body) - 1)
    with pytest.raises(ClinikoAnswerError, match="larger than"):
        ClinikoHook().get_patient(1)


def test_a_huge_error_body_is_capped_in_the_exception(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    message = "no " * 2_000_000
    api = stand_ins(
        Reply(422, json.dumps({"message": message, "errors": {"f" * 500: ["bad " * 500]}}).encode())
    )
    use(monkeypatch, api)
    with pytest.raises(Exception) as caught:
        ClinikoHook().get_patient(1)
    assert len(str(caught.value)) < 800


def test_a_megabytes_s3_error_body_is_read_capped_and_cut_in_the_message(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    huge = b"<Error><Code>AccessDenied</Code><Message>" + b"m" * 3_000_000 + b"</Message></Error>"
    s3 = stand_ins(Reply(400, body=huge, headers={"Content-Type": "application/xml"}))
    use(monkeypatch, stand_ins())
    source = tmp_path / "a.txt"
    source.write_bytes(b"abc")
    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    with pytest.raises(S3UploadRejectedError) as caught:
        ClinikoHook().upload_file(presign, lambda: source.open("rb"), 3, "a.txt")
    assert len(str(caught.value)) <= 400 and "HTTP400" in str(caught.value)
    assert "Authorization" not in s3.seen[0].headers


# --- creates -----------------------------------------------------------------------------------------


def test_create_patient_is_never_repeated_after_a_5xx(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = stand_ins(Reply(502, b'{"message": "bad gateway"}'), Reply(201, b'{"id": "9"}'))
    use(monkeypatch, api)
    with pytest.raises(ClinikoServerError, match="502"):
        ClinikoHook().create_patient("Ann", "Lee")
    assert [seen.method for seen in api.seen] == ["POST"]


# --- 429s with absurd resets -------------------------------------------------------------------------

ABSURD = {
    "a-day-ahead": lambda: {"X-RateLimit-Reset": str(int(time.time()) + 86_400)},
    "milliseconds": lambda: {"X-RateLimit-Reset": str(int(time.time() * 1000) + 5000)},
    "not-a-number": lambda: {"X-RateLimit-Reset": "soon"},
    "retry-after-a-day": lambda: {"Retry-After": "86400"},
}

SECOND_PROCESS = """
import sys, time
from cliniko_provider.hooks.cliniko import ClinikoHook
hook = ClinikoHook()
hook.prepare()  # the key's user, as remembered on this machine: its budget holds the 429
print(hook.budget.reserve(time.time()))
"""


def second_process_wait(state_dir: Path) -> float:
    """How long a second process of the same key is told to wait before its first request."""
    env = {**os.environ, "CLINIKO_STATE_DIR": str(state_dir)}
    done = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def sleeper(slept: list[float]) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    return sleep


@pytest.mark.parametrize("kind", sorted(ABSURD))
def test_an_absurd_429_is_answered_within_its_bound_and_shared_with_no_one(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    api = stand_ins(Reply(429, b"{}", {"Content-Type": "application/json", **ABSURD[kind]()}), Reply())
    use(monkeypatch, api, max_rate_limit_wait=2)
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path))
    slept: list[float] = []
    hook = ClinikoHook(sleep=sleeper(slept))
    assert hook.get_patient(1) == {}
    assert len(api.seen) == 2 and 0 < sum(slept) <= 2
    other = MachineBudget(key_id(KEY), 200, 2, state_dir=tmp_path / "rate")  # what another process reads
    assert other.reserve(time.time()) == 0


@pytest.mark.slow  # two Python processes importing Airflow
def test_a_second_process_of_the_key_is_held_by_a_sane_429_and_not_by_an_absurd_one(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    day_ahead = {"Content-Type": "application/json", **ABSURD["a-day-ahead"]()}
    api = stand_ins(Reply(429, b"{}", day_ahead), Reply())
    use(monkeypatch, api, max_rate_limit_wait=60)
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path))
    assert ClinikoHook(sleep=lambda seconds: None).get_patient(1) == {}
    assert second_process_wait(tmp_path) == 0
    sane = {"Content-Type": "application/json", "Retry-After": "50"}
    api.replies = [Reply(429, b"{}", sane), Reply()]
    assert ClinikoHook(sleep=lambda seconds: None).get_patient(1) == {}
    assert 0 < second_process_wait(tmp_path) <= 50  # the contrast: a usable reset is shared


@pytest.mark.parametrize("kind", sorted(ABSURD))
async def test_async_absurd_429_is_answered_within_its_bound_and_shared_with_no_one(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    api = stand_ins(Reply(429, b"{}", {"Content-Type": "application/json", **ABSURD[kind]()}), Reply())
    use(monkeypatch, api, max_rate_limit_wait=2)
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path))
    slept: list[float] = []

    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    hook = ClinikoAsyncHook(asleep=asleep)
    try:
        assert await hook.aget_attachment(1) == {}
    finally:
        await hook.aclose()
    assert len(api.seen) == 2 and 0 < sum(slept) <= 2
    other = MachineBudget(key_id(KEY), 200, 2, state_dir=tmp_path / "rate")
    assert other.reserve(time.time()) == 0


# --- deadlines: a whole answer within the connection's timeout ------------------------------------------


def trickle() -> Iterator[bytes]:
    """One byte every half second, for ever: never trips a per-read timeout of 1 s."""
    while True:
        yield b" "
        time.sleep(0.5)


def steady() -> Iterator[bytes]:
    """A body that never ends, at 100 KiB/s: under the size cap for far longer than the deadline."""
    while True:
        yield b"[" * 1024
        time.sleep(0.01)


TRICKLES = {
    "chunked": lambda: Reply(body=trickle),
    "content-length": lambda: Reply(body=trickle, headers={"Content-Length": "100000"}),
    "never-ending": lambda: Reply(body=steady, headers={"Content-Length": "1000000000000"}),
}
DEADLINE_MESSAGE = (
    r"after {attempts} attempt\(s\): no complete answer within the 1 s deadline \(the connection's "
    r"'timeout' extra, which bounds connect, answer and body together\).*the task's retries may succeed"
)


@pytest.mark.parametrize("kind", sorted(TRICKLES))
def test_an_answer_that_never_ends_ends_at_the_deadline(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    api = stand_ins(TRICKLES[kind]())
    use(monkeypatch, api, timeout=1, max_attempts=2)
    slept: list[float] = []
    hook = ClinikoHook(sleep=slept.append)
    hook.settings  # noqa: B018 - the connection is read before the clock starts
    started = time.monotonic()
    with pytest.raises(ClinikoConnectionError, match=DEADLINE_MESSAGE.format(attempts=2)) as caught:
        hook.get_patient(1)
    elapsed = time.monotonic() - started
    assert not isinstance(caught.value, AirflowFailException)  # retryable: the task's retries may help
    assert len(api.seen) == 2 and len(slept) == 1  # retried once, like a broken connection
    # the overshoot is ~20 ms on a quiet machine; the bound leaves room for a loaded one
    assert 2.0 <= elapsed < 3.0, f"two attempts of a 1 s deadline took {elapsed:.2f} s"


def test_an_answer_within_the_deadline_is_read_whole(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow() -> Iterator[bytes]:
        for part in (b'{"id": ', b'"1"}'):
            time.sleep(0.3)
            yield part

    use(monkeypatch, stand_ins(Reply(body=slow)), timeout=1)
    assert ClinikoHook().get_patient(1) == {"id": "1"}


@pytest.mark.parametrize("kind", sorted(TRICKLES))
async def test_async_answer_that_never_ends_ends_at_the_deadline(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    api = stand_ins(TRICKLES[kind]())
    use(monkeypatch, api, timeout=1, max_attempts=1)
    hook = ClinikoAsyncHook()
    await hook.aget_settings()
    started = time.monotonic()
    try:
        with pytest.raises(ClinikoConnectionError, match=DEADLINE_MESSAGE.format(attempts=1)):
            await hook.aget_attachment(1)
    finally:
        await hook.aclose()
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0, f"a 1 s deadline took {elapsed:.2f} s"


def test_s3s_answer_that_never_ends_ends_at_the_deadline_after_the_body(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3 = stand_ins(Reply(201, body=trickle, headers={"Content-Type": "application/xml"}))
    use(monkeypatch, stand_ins(), timeout=1, max_attempts=1)
    source = tmp_path / "a.txt"
    source.write_bytes(b"abc")
    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    started = time.monotonic()
    with pytest.raises(S3UploadError, match=r"\(0 Timeout\): S3's answer: no complete answer within the 1 s"):
        ClinikoHook().upload_file(presign, lambda: source.open("rb"), 3, "a.txt")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0, f"a 1 s deadline took {elapsed:.2f} s"


async def test_a_trigger_deadline_inside_a_hung_round_fires_within_one_poll_interval(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = stand_ins(Reply(body=trickle))  # the status check never ends (until its own 30 s deadline)
    use(monkeypatch, api, timeout=30)
    monkeypatch.setenv("CLINIKO_RATE_STATE_DIR", str(tmp_path))
    learner = ClinikoHook()  # the key's user known first, so the round's status check is the first call
    user_budget(learner.settings, learner._look_up_user)
    assert api.looked_up == 1
    started = time.time()
    asked = ProcessingCompletedTrigger("1", poll_interval=0.5, deadline=started + 1.0)  # asked at 0.5 s
    late = ProcessingCompletedTrigger("2", poll_interval=5.0, deadline=started + 1.5)  # joins in the round

    async def fire(trigger: ProcessingCompletedTrigger, after: float) -> tuple[dict[str, Any], float]:
        await asyncio.sleep(after)
        events = [event.payload async for event in trigger.run()]
        return events[0], time.time() - (trigger.deadline or 0)

    (first, first_over), (second, second_over) = await asyncio.wait_for(
        asyncio.gather(fire(asked, 0), fire(late, 0.7)), timeout=10
    )
    assert len(api.seen) == 1 and "q%5B%5D=id%3A%3D1&" in api.seen[0].path  # the round asking about "1"
    assert first["reason"] == second["reason"] == "timeout"
    assert "Cliniko had not answered the status check in flight" in first["message"]
    # asked: a tenth of its interval more (50 ms measured); the bound is one poll interval
    assert 0.05 <= first_over < 0.5, f"fired {first_over:.3f} s after its deadline"
    assert 0 <= second_over < 0.5, f"fired {second_over:.3f} s after its deadline"  # not asked: on time


# --- secrets a server echoes ----------------------------------------------------------------------------

CREDENTIALS = base64.b64encode(f"{KEY}:".encode()).decode()
SECRETS = (KEY, CREDENTIALS)


def echoing(status: int) -> Reply:
    """An error answer that echoes the request's Authorization header and the key, as a proxy may."""
    body = {
        "message": f"Rejected header Authorization: Basic {CREDENTIALS} (user {KEY})",
        "errors": {"authorization": [f"Basic {CREDENTIALS}"]},
    }
    return Reply(status, json.dumps(body).encode())


def test_an_echoed_authorization_header_is_redacted_in_exceptions_xcom_and_logs(
    stand_ins: Callable[..., StandIn],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    api = stand_ins()
    use(monkeypatch, api, max_attempts=2)
    caplog.set_level(logging.DEBUG)
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 report")
    seen: dict[str, str] = {}

    api.replies = [echoing(503), echoing(401)]  # the 503 is logged by the retry runner, the 401 raised
    with pytest.raises(ClinikoAuthError) as caught:
        ClinikoHook(sleep=lambda seconds: None).get_patient(1)
    seen["exception"] = str(caught.value)

    api.replies = [echoing(401)]
    ctx = fake_context()
    single = ClinikoAttachmentUploadOperator(task_id="upload", patient_id="1", file_path=str(report))
    with pytest.raises(ClinikoAuthError):
        single.execute(ctx)
    seen["single cliniko_error"] = ctx["ti"].pushed["cliniko_error"]

    api.replies = [echoing(401)]
    ctx = fake_context()
    batch = ClinikoBatchUploadOperator(
        task_id="upload_batch", uploads=[{"patient_id": "1", "file_path": str(report)}]
    )
    with pytest.raises(ClinikoError) as batch_error:
        batch.execute(ctx)
    seen["batch exception"] = str(batch_error.value)
    seen["batch cliniko_error"] = ctx["ti"].pushed["cliniko_error"]
    seen["batch results"] = json.dumps(ctx["ti"].pushed["return_value"])
    printed = capfd.readouterr()
    seen["logs"] = "\n".join((caplog.text, printed.out, printed.err))  # stdlib and Airflow's structlog

    assert (
        "GET /patients/1: 503 (Rejected header Authorization: Basic ***" in seen["logs"]
    )  # the retry's line
    for where, text in seen.items():
        assert "Authorization: Basic ***" in text or where == "batch results", where
        for secret in SECRETS:
            assert secret not in text, f"{where} holds a secret: {text}"
    assert (
        "Cliniko answered 401 to GET /patients/1: Rejected header Authorization: Basic *** (user ***)"
        in (seen["exception"])
    )


def test_a_trickling_download_ends_at_its_deadline_and_a_steady_one_earns_time(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    def two_mib_a_second() -> Iterator[bytes]:
        for _ in range(30):  # 3 MiB in 1.5 s: longer than the 1 s deadline, earning 1 s per MiB
            yield b"x" * 104_858
            time.sleep(0.05)

    api = stand_ins(Reply(body=trickle, headers={"Content-Length": "1000000"}))
    use(monkeypatch, api, timeout=1, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(ClinikoConnectionError, match=DEADLINE_MESSAGE.format(attempts=1)):
        ClinikoHook().attachment_sha256(1)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0, f"a 1 s deadline took {elapsed:.2f} s"
    api.replies = [Reply(body=two_mib_a_second)]
    expected = hashlib.sha256(b"".join(two_mib_a_second())).hexdigest()
    started = time.monotonic()
    assert ClinikoHook().attachment_sha256(1) == expected
    assert time.monotonic() - started > 1.2  # it did outlast the bare deadline


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_download_hashes_every_byte_up_to_max_bytes(
    stand_ins: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    data = b"".join(bytes([65 + i]) * 100_000 for i in range(5))
    headers = {"Content-Length": str(len(data))} if framing == "content-length" else {}
    use(monkeypatch, stand_ins(Reply(body=lambda: iter([data[:150_000], data[150_000:]]), headers=headers)))
    hook = ClinikoHook()
    assert hook.attachment_sha256(1) == hashlib.sha256(data).hexdigest()
    assert hook.attachment_sha256(1, max_bytes=123_456) == hashlib.sha256(data[:123_456]).hexdigest()
