"""Hooks for Cliniko's REST API: ``ClinikoHook`` (requests) and ``ClinikoAsyncHook`` (httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import TracebackType
from typing import Any, TypeVar

import httpx
import requests
import requests.adapters
import urllib3
import urllib3.connection
from airflow.providers.common.compat.sdk import AirflowSensorTimeout
from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from cliniko_provider.exceptions import (
    ClinikoAnswerError,
    ClinikoAPIError,
    ClinikoAttachmentGoneError,
    ClinikoConnectionError,
    ClinikoError,
    ClinikoInputError,
    ClinikoIntegrityError,
    ClinikoNotFoundError,
    S3UploadError,
)
from cliniko_provider.utils.budget import (
    PROCESS_BUDGETS,
    RateBudget,
    auser_budget,
    budget_for,
    key_id,
    user_budget,
)
from cliniko_provider.utils.budget_redis import RedisBudget
from cliniko_provider.utils.errors import Redactor, decode_json_object, error_for_answer, redact
from cliniko_provider.utils.idempotency import DigestingOpener
from cliniko_provider.utils.integrity import S3Upload, check_processed_record, s3_mismatch
from cliniko_provider.utils.retry import (
    API_CALL,
    API_CREATE,
    S3_UPLOAD,
    S3_UPLOAD_REFRESHING,
    CallRules,
    Deadline,
    DeadlineExceeded,
    Failure,
    RetryPolicy,
    RetryRunner,
    final,
)
from cliniko_provider.utils.s3_form import (
    CHUNK_SIZE,
    MultipartBody,
    Opener,
    Progress,
    answered_etag,
    etag_md5,
    expected_key,
    join_upload_url,
    parse_s3_xml,
    s3_error,
)
from cliniko_provider.utils.settings import ClinikoSettings, is_loopback_url
from cliniko_provider.utils.upload import (
    UploadProgress,
    UploadSource,
    format_bytes,
    guess_content_type,
)
from cliniko_provider.utils.validation import check_description, one_line, validate_id

JsonDict = dict[str, Any]
Params = Mapping[str, Any] | list[tuple[str, Any]] | None
PER_PAGE = 100
CHUNK = 64 * 1024
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # an API answer larger than this is refused, not read
MAX_ERROR_BYTES = 64 * 1024  # of an error answer (and of S3's answers), only this much is read
DOWNLOAD_PROGRESS_BYTES = 1024 * 1024  # a file's download earns one more `timeout` per MiB received


@dataclass(frozen=True)
class Answer:
    """A successful API answer, its body read whole (at most ``MAX_ANSWER_BYTES``).

    :param status: the HTTP status.
    :param headers: the headers.
    :param content: the body.
    """

    status: int
    headers: Mapping[str, str] = field(repr=False)
    content: bytes = field(repr=False)

    def json_object(self, what: str) -> JsonDict:
        """Decode the body as a JSON object, or raise a clear error naming what came instead.

        :param what: the request, for the message (``"GET /patients"``).
        """
        return decode_json_object(self.content, self.headers.get("Content-Type", ""), what)


def read_capped(chunks: Iterable[bytes], cap: int, deadline: Deadline | None = None) -> bytes:
    """Read a streamed body, stopping once it holds more than ``cap`` bytes (at most ``cap + 1`` kept).

    :param chunks: the body's chunks.
    :param cap: the bytes wanted at most.
    :param deadline: when the whole body must be in; checked after each chunk (a read that blocks is
        ended by :class:`DeadlineWatch`).
    :raises DeadlineExceeded: the deadline passed before the body ended.
    """
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > cap:
            break
        if deadline is not None:
            deadline.check()
    return bytes(body[: cap + 1])


async def aread_capped(chunks: AsyncIterator[bytes], cap: int) -> bytes:
    """The async twin of :func:`read_capped` (its caller bounds the whole exchange by the deadline).

    :param chunks: the body's chunks.
    :param cap: the bytes wanted at most.
    """
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > cap:
            break
    return bytes(body[: cap + 1])


class DeadlineWatch:
    """Shuts the connection of one attempt when the attempt's deadline passes, whatever it is doing.

    ``requests`` bounds each socket read, not the whole exchange: a server sending one byte every half
    second (of its status line, headers or body) never trips a one-second read timeout, and one blocking
    read of a 64 KiB chunk can last for hours. The watch is entered before the request is sent; while it
    is, the hook's connections (``_WatchedAdapter``) register with it as they connect and send, so
    connect, send, status line, headers and body are bounded together. A socket it shut reads as dropped
    and urllib3 never reuses it. On leaving, a fired watch raises :class:`DeadlineExceeded` (what was read
    may have been cut short), whatever error the shut socket gave meanwhile.

    :param deadline: when the attempt must be done, or None: no deadline until :meth:`arm` gives one.
    """

    def __init__(self, deadline: Deadline | None = None) -> None:
        self.fired = False
        self._deadline = deadline
        self._connection: urllib3.connection.HTTPConnection | None = None
        self._socket: socket.socket | None = None
        self._done = False
        self._changed = threading.Condition()
        self._watcher = threading.Thread(target=self._watch, name="cliniko-deadline", daemon=True)
        self._token: contextvars.Token[DeadlineWatch | None] | None = None

    def __enter__(self) -> DeadlineWatch:
        self._token = _ATTEMPT_WATCH.set(self)
        self._watcher.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        with self._changed:  # once left, the watch shuts nothing (the connection may serve another call)
            self._done = True
            self._changed.notify()
        if self._token is not None:
            _ATTEMPT_WATCH.reset(self._token)
        if self.fired and self._deadline is not None:
            raise DeadlineExceeded(self._deadline.reason()) from error

    @property
    def deadline(self) -> Deadline | None:
        """The deadline watched, or None before :meth:`arm` gives one."""
        return self._deadline

    def arm(self, deadline: Deadline) -> None:
        """Give the watch its deadline, or a new one in place of the current.

        :param deadline: when the attempt (or what is left of it) must be done.
        """
        with self._changed:
            self._deadline = deadline
            self._changed.notify()

    def watch(self, connection: urllib3.connection.HTTPConnection, sock: socket.socket | None = None) -> None:
        """Watch the connection the attempt now uses (shut at once if the deadline has passed).

        :param connection: the connection.
        :param sock: its socket while the connection does not hold it yet (connecting).
        """
        with self._changed:
            self._connection, self._socket = connection, sock
            if self.fired:
                self._shut()

    def _watch(self) -> None:
        with self._changed:
            while not self._done:
                if self._deadline is None:
                    self._changed.wait()
                elif self._deadline.passed():
                    self.fired = True
                    self._shut()
                    return
                else:
                    # the deadline may move later meanwhile (Deadline.extend): look again when it is due
                    self._changed.wait(self._deadline.remaining())

    def _shut(self) -> None:
        current = getattr(self._connection, "sock", None)  # TLS: the wrapped socket, once there is one
        for sock in (current, self._socket):
            if sock is not None:
                with contextlib.suppress(OSError):
                    # wakes a connect, send or read blocked in its thread; the plain socket's shutdown, as
                    # a TLS socket's own would unwrap it under that read (a ValueError, not a broken read)
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


# The watch of the attempt running in this thread (or task): urllib3 makes the connections, so they
# cannot be handed the watch; a context variable is per thread, like an attempt.
_ATTEMPT_WATCH: contextvars.ContextVar[DeadlineWatch | None] = contextvars.ContextVar(
    "cliniko_attempt_watch", default=None
)


def _watched(connection: urllib3.connection.HTTPConnection, sock: socket.socket | None = None) -> None:
    watch = _ATTEMPT_WATCH.get()
    if watch is not None:
        watch.watch(connection, sock)


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    """A connection that registers with the running attempt's :class:`DeadlineWatch`."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watched(self, sock)  # covers the TLS handshake, which runs before :meth:`request`
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watched(self)  # a kept-alive connection makes no new socket
        super().request(*args, **kwargs)

    def __str__(self) -> str:
        # error messages name the connection: urllib3's own class, not this wrapper
        plain = (
            "HTTPSConnection" if isinstance(self, urllib3.connection.HTTPSConnection) else "HTTPConnection"
        )
        return f"{plain}(host={self.host!r}, port={self.port!r})"


class _WatchedHTTPSConnection(_WatchedHTTPConnection, urllib3.connection.HTTPSConnection):
    """The HTTPS twin of :class:`_WatchedHTTPConnection`."""


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """``requests``' adapter whose connections a :class:`DeadlineWatch` can shut (also via an HTTP proxy)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Make the pool manager, with pools of watched connections."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.PoolManager:
        """Return the proxy's pool manager, with pools of watched connections (not for SOCKS proxies).

        :param proxy: the proxy's URL.
        :param proxy_kwargs: passed to ``requests``.
        """
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def equality_filters(*filters: str, **equals: object) -> list[str]:
    """Combine raw ``q[]`` filters (``"email:=a@b.c"``) and equality keyword filters into one list.

    :param filters: filters in Cliniko's ``field:<op>value`` form.
    :param equals: ``field=value`` pairs, each meaning ``field:=value``.
    """
    return [*filters, *(f"{name}:={value}" for name, value in equals.items() if value is not None)]


def check_processed(record: JsonDict) -> bool:
    """Return True when Cliniko has finished processing the attachment; raise if it never will.

    :param record: an attachment record from Cliniko.
    :raises ClinikoAttachmentGoneError: the record is archived.
    """
    archived_at = record.get("archived_at")
    if archived_at:
        raise ClinikoAttachmentGoneError(str(record.get("id")), "archived", archived_at=str(archived_at))
    return record.get("processing_completed") is True


class _ClinikoBase(BaseHook):
    """What the sync and async hooks share: connection, policy, budget and request bookkeeping."""

    conn_name_attr = "cliniko_conn_id"
    default_conn_name = "cliniko_default"
    conn_type = "cliniko"
    hook_name = "Cliniko"

    def __init__(
        self,
        cliniko_conn_id: str = default_conn_name,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__()
        self.cliniko_conn_id = cliniko_conn_id
        self._clock = clock
        self._rand = rand
        self._settings: ClinikoSettings | None = None
        self.redactor = Redactor()
        """Blanks this connection's secrets (and anything shaped like one) out of messages."""

    def _remember(self, settings: ClinikoSettings) -> ClinikoSettings:
        self._keep_secret(*settings.secrets)
        self._settings = settings
        return settings

    def _keep_secret(self, *secrets: str) -> None:
        """Keep secrets out of messages (:attr:`redactor`) and out of Airflow's logs (its masker)."""
        for secret in secrets:
            mask_secret(secret)
        self.redactor.add(*secrets)

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy from the connection's settings."""
        settings = self._require_settings()
        return RetryPolicy(
            max_attempts=settings.max_attempts, max_rate_limit_wait=settings.max_rate_limit_wait
        )

    @property
    def budget(self) -> RateBudget:
        """This process's request budget for the Cliniko user behind the connection's API key (the
        key's own budget until that user is learned)."""
        settings = self._require_settings()
        return budget_for(settings, owner=PROCESS_BUDGETS.owner_of(key_id(settings.api_key), self._clock()))

    def _require_settings(self) -> ClinikoSettings:
        if self._settings is None:
            raise ClinikoError("Connection settings not loaded yet")
        return self._settings

    def _runner(
        self,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Awaitable[object]] | None = None,
    ) -> RetryRunner:
        return RetryRunner(
            self.policy,
            self.budget,
            clock=self._clock,
            sleep=sleep,
            asleep=asleep,
            rand=self._rand,
            logger=self.log,
        )

    def _api_answer(
        self, status: int, headers: Mapping[str, str], content: bytes, what: str
    ) -> Answer | Failure:
        """Turn one API answer into the result (any status below 400) or a failure carrying its error."""
        if len(content) > MAX_ANSWER_BYTES and status < 400:
            raise ClinikoAnswerError(
                f"Cliniko's answer to {what} is larger than {format_bytes(MAX_ANSWER_BYTES)}; not "
                "reading it. Check the connection's host points at Cliniko's API."
            )
        if status < 400:
            return Answer(status, headers, content)
        text = content[:MAX_ERROR_BYTES].decode("utf-8", "replace")
        error = error_for_answer(status, text, what, self.redactor)
        return Failure(status, headers, final(error), error.message)

    def _connection_failure(
        self, error: BaseException, what: str, deadline: Deadline | None = None
    ) -> Failure:
        """The failure of an attempt that got no whole answer: the network's reason, or the deadline's."""
        late = deadline is not None and deadline.passed()
        reason = deadline.reason() if deadline is not None and late else self.redactor(network_reason(error))
        base_url = self._require_settings().base_url

        if late:
            advice = (
                "Raise the connection's timeout if answers are this slow by nature, or check the "
                "host/network; the task's retries may succeed."
            )
        elif is_loopback_url(base_url):
            advice = (
                "Is `cliniko-sandbox` running? Start it (`cliniko-sandbox --port <port> "
                "--seed-example-patients`) or fix the connection's host."
            )
        else:
            advice = "Check the host/network; the task's retries may succeed."

        def final(attempts: int) -> Exception:
            return ClinikoConnectionError(
                f"Could not reach Cliniko at {base_url} for {what} after {attempts} attempt(s): {reason}. "
                f"{advice}"
            )

        return Failure(None, {}, final, reason)

    @staticmethod
    def _next_link(page: JsonDict) -> str | None:
        links = page.get("links") or {}
        next_url = links.get("next") if isinstance(links, dict) else None
        return str(next_url) if next_url else None

    @staticmethod
    def _page_params(filters: Iterable[str], extra: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = [("per_page", PER_PAGE)]
        params += [("q[]", item) for item in filters]
        params += list((extra or {}).items())
        return params


class ClinikoHook(_ClinikoBase):
    """Calls Cliniko's REST API: auth, shard, User-Agent, retries, rate limit and pagination in one place.

    The connection's password is the API key; its shard suffix (``-au1``, ``-uk2``...) picks the base URL
    unless the host field overrides it (e.g. the sandbox). Extra field ``user_agent`` is required. Several
    threads may use one hook at once (each gets its own session; all draw from the key's rate budget).

    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param sleep: how to wait between attempts (injectable for tests).
    :param clock: the current UNIX time (injectable for tests).
    :param rand: a source of jitter in [0, 1) (injectable for tests).
    """

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Return the connection form's extra fields for Airflow 3.1 (3.2+ reads ``conn-fields``)."""
        from cliniko_provider.get_provider_info import connection_form_widgets

        return connection_form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Return the standard fields' behaviour for Airflow 3.1 (3.2+ reads ``ui-field-behaviour``)."""
        from cliniko_provider.get_provider_info import ui_field_behaviour

        return ui_field_behaviour()

    def __init__(
        self,
        cliniko_conn_id: str = _ClinikoBase.default_conn_name,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(cliniko_conn_id, clock=clock, rand=rand)
        self._sleep = sleep
        self._local = threading.local()
        self._first_sessions: dict[str, requests.Session] = {}
        self._sessions_lock = threading.Lock()
        self._etag_note_given = False  # said once per hook: S3's ETags here are no MD5

    @cached_property
    def settings(self) -> ClinikoSettings:
        """The validated connection settings."""
        return self._remember(ClinikoSettings.from_connection(self.get_connection(self.cliniko_conn_id)))

    def _require_settings(self) -> ClinikoSettings:
        return self.settings  # the sync hook loads its settings on first use

    @property
    def session(self) -> requests.Session:
        """This thread's ``requests`` session carrying auth, User-Agent and Accept."""
        return self._thread_session("api", self.settings.headers)

    def get_conn(self) -> requests.Session:
        """Return the configured ``requests`` session."""
        return self.session

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Params = None,
        json: JsonDict | None = None,
        idempotent: bool = True,
    ) -> Answer:
        """Send one API request through the retry runner; return the successful answer, its body read.

        :param method: HTTP method.
        :param path_or_url: path under the base URL (``/patients/1``), or an absolute URL on the base URL's
            scheme, host and port (a ``links.next``); any other URL is refused before a request is sent.
        :param params: query parameters.
        :param json: JSON body.
        :param idempotent: False for requests that must not be repeated after a 5xx (creates).
        """
        self.settings.url(path_or_url)  # a refused URL sends nothing, not even the look-up
        user_budget(self.settings, self._look_up_user, clock=self._clock)  # once per key, then remembered
        return self._send(method, path_or_url, params=params, json=json, idempotent=idempotent)

    def prepare(self) -> None:
        """Load the connection, learn the key's Cliniko user and read its rate budget's Redis connection.

        Call it before threads share this hook: the Airflow calls it makes (connections, at most one
        ``GET /user``) are then made once, on the calling thread, where requests would make them anyway.
        """
        budget = user_budget(self.settings, self._look_up_user, clock=self._clock)
        if isinstance(budget, RedisBudget):
            budget.connect()

    def _send(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Params = None,
        json: JsonDict | None = None,
        idempotent: bool = True,
    ) -> Answer:
        """:meth:`request` on the budget known now (without learning the key's user first)."""
        url = self.settings.url(path_or_url)
        what = self.settings.describe(method, url)

        def attempt() -> Answer | Failure:
            deadline = Deadline(self.settings.timeout)
            try:
                # the watch is left before the answer is closed: a connection back in the pool is not its
                with contextlib.ExitStack() as answers, DeadlineWatch(deadline):
                    response = answers.enter_context(
                        self.session.request(
                            method, url, params=params, json=json, timeout=self.settings.timeout, stream=True
                        )
                    )
                    content = read_capped(response.iter_content(CHUNK), MAX_ANSWER_BYTES, deadline)
                    status, headers = response.status_code, response.headers
            except (requests.RequestException, DeadlineExceeded) as error:
                return self._connection_failure(error, what, deadline)
            self.log.debug("Cliniko %s -> %s", what, status)
            return self._api_answer(status, headers, content, what)

        return self._runner(self._sleep).run(what, attempt, API_CALL if idempotent else API_CREATE)

    def _look_up_user(self) -> JsonDict:
        """The Cliniko user behind the key: one ``GET /user``, paced on the key's budget, not repeated."""
        return self._send("GET", "/user", idempotent=False).json_object("GET /user")

    def get_json(self, path_or_url: str, params: Params = None) -> JsonDict:
        """GET and decode a JSON object.

        :param path_or_url: path under the base URL or an absolute URL (see :meth:`request`).
        :param params: query parameters.
        """
        url = self.settings.url(path_or_url)
        return self.request("GET", url, params=params).json_object(self.settings.describe("GET", url))

    def paginate(self, path: str, resource: str, params: Params = None) -> Iterator[JsonDict]:
        """Yield every item of a list endpoint, fetching pages lazily by following ``links.next``.

        :param path: the list endpoint, e.g. ``/patients``.
        :param resource: the list's key in the answer, e.g. ``patients``.
        :param params: query parameters for the first page.
        """
        yield from self._pages_from(self.get_json(path, params), resource)

    # --- Patients -------------------------------------------------------------------------------------

    def get_patient(self, patient_id: int | str) -> JsonDict:
        """Return one patient.

        :param patient_id: the Cliniko patient id.
        """
        return self.get_json(f"/patients/{validate_id('patient_id', patient_id)}")

    def find_patients(
        self, *filters: str, include_archived: bool = False, **equals: object
    ) -> Iterator[JsonDict]:
        """Yield the patients matching every filter.

        ``find_patients(old_reference_id="A-17")`` or ``find_patients("email:=ann@example.com")``.

        :param filters: raw filters in Cliniko's ``field:<op>value`` form.
        :param include_archived: include archived patients.
        :param equals: ``field=value`` equality filters.
        """
        q = equality_filters(*filters, **equals)
        if include_archived:
            q.append("archived_at:*")
        return self.paginate("/patients", "patients", self._page_params(q))

    def create_patient(self, first_name: str, last_name: str, **fields: object) -> JsonDict:
        """Create a patient (used by demos and tests).

        A create: never repeated after a 5xx or a broken connection, since Cliniko may have made it; look
        the patient up (:meth:`find_patients`) before trying again.

        :param first_name: first name.
        :param last_name: last name.
        :param fields: other patient fields (``email``, ``old_reference_id``...).
        """
        body: JsonDict = {"first_name": first_name, "last_name": last_name, **fields}
        return self.request("POST", "/patients", json=body, idempotent=False).json_object("POST /patients")

    def match_patients(self, references: Iterable[str], emails: Iterable[str] = ()) -> dict[str, JsonDict]:
        """Find patients by ``old_reference_id`` and by email, in as few requests as possible.

        Reads the account's patient list when that takes fewer pages than one query per value would,
        else queries each value. Returns ``{value: patient}`` for every reference and email that matched
        (references first: an email never overrides a reference match).

        :param references: ``old_reference_id`` values (your own patient ids).
        :param emails: email addresses, the fallback.
        """
        wanted_refs = {str(value) for value in references if value}
        wanted_emails = {str(value).lower() for value in emails if value}
        if not wanted_refs and not wanted_emails:
            return {}
        first_page = self.get_json("/patients", self._page_params([]))
        pages = -(-int(first_page.get("total_entries") or 0) // PER_PAGE)
        found: dict[str, JsonDict] = {}
        if pages <= len(wanted_refs) + len(wanted_emails):
            everyone = self._pages_from(first_page, "patients")
            for patient in everyone:
                email = str(patient.get("email") or "").lower()
                if email in wanted_emails:
                    found.setdefault(email, patient)
                ref = str(patient.get("old_reference_id") or "")
                if ref in wanted_refs:
                    found[ref] = patient
            return found
        for ref in wanted_refs:
            found.update((ref, patient) for patient in self.find_patients(old_reference_id=ref))
        for email in wanted_emails:
            found.update((email, patient) for patient in self.find_patients(email=email))
        return found

    def _pages_from(self, page: JsonDict, resource: str) -> Iterator[JsonDict]:
        while True:
            yield from page.get(resource) or []
            next_url = self._next_link(page)
            if not next_url:
                return
            page = self.get_json(next_url)

    # --- Attachments ----------------------------------------------------------------------------------

    def get_presigned_post(self, patient_id: int | str) -> JsonDict:
        """Return ``{"url": ..., "fields": {...}}`` for uploading one file of a patient to S3.

        The fields hold a signed policy: never log them.

        :param patient_id: the Cliniko patient id.
        """
        presign = self.get_json(
            f"/patients/{validate_id('patient_id', patient_id)}/attachment_presigned_post"
        )
        fields = presign.get("fields")
        if not isinstance(presign.get("url"), str) or not isinstance(fields, dict):
            raise ClinikoError("Cliniko's presigned post has no 'url' or 'fields'")
        self._keep_secret(*(str(fields[name]) for name in ("policy", "x-amz-signature") if fields.get(name)))
        return presign

    def create_attachment(
        self, patient_id: int | str, upload_url: str, description: str | None = None
    ) -> JsonDict:
        """Create the attachment record for a file already uploaded to the presigned location.

        :param patient_id: the Cliniko patient id.
        :param upload_url: the presign ``url`` + S3's ``Key``.
        :param description: shown in Cliniko (at most 255 characters).
        """
        body: JsonDict = {"patient_id": validate_id("patient_id", patient_id), "upload_url": upload_url}
        if description:
            body["description"] = check_description(description)
        answer = self.request("POST", "/patient_attachments", json=body, idempotent=False)
        return answer.json_object("POST /patient_attachments")

    def get_attachment(self, attachment_id: int | str) -> JsonDict:
        """Return one attachment record.

        :param attachment_id: the attachment id.
        """
        return self.get_json(f"/patient_attachments/{validate_id('attachment_id', attachment_id)}")

    def processed_attachment(self, attachment_id: int | str) -> JsonDict | None:
        """Fetch the attachment once; return its record when Cliniko has processed it, else None.

        :param attachment_id: the attachment id.
        :raises ClinikoAttachmentGoneError: the attachment is archived, deleted or never existed.
        """
        try:
            record = self.get_attachment(attachment_id)
        except ClinikoNotFoundError:
            raise ClinikoAttachmentGoneError(str(attachment_id), "not_found") from None
        return record if check_processed(record) else None

    def wait_for_processing(
        self,
        attachment_id: int | str,
        *,
        poll_interval: float,
        timeout: float,
        expect: Mapping[str, Any] | None = None,
    ) -> JsonDict:
        """Poll one attachment until Cliniko has processed it; return the processed record.

        Every poll goes through the hook's retries and rate budget; it sleeps with the hook's ``sleep``.

        :param attachment_id: the attachment id.
        :param poll_interval: seconds between polls.
        :param timeout: seconds to wait in all before giving up.
        :param expect: what the processed record must show (``size``, ``filename``; see
            :func:`~cliniko_provider.utils.integrity.expectation`), or None.
        :raises ClinikoAttachmentGoneError: the attachment is archived, deleted or never existed.
        :raises AirflowSensorTimeout: it was not processed within ``timeout``.
        :raises ClinikoIntegrityError: the processed record does not show what ``expect`` says.
        """
        deadline = self._clock() + timeout
        while True:
            record = self.processed_attachment(attachment_id)
            if record is not None:
                check_processed_record(record, expect)
                return record
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise AirflowSensorTimeout(_not_processed_in_time(str(attachment_id), timeout))
            self._sleep(min(poll_interval, remaining))

    def wait_for_processing_of_many(
        self,
        attachment_ids: Iterable[int | str],
        *,
        poll_interval: float,
        timeout: float,
        expect: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, JsonDict | Exception]:
        """Poll many attachments, 100 per request, until each is processed or never will be.

        Returns each id's processed record, or the error :meth:`wait_for_processing` would raise for it
        (:class:`ClinikoAttachmentGoneError`, ``AirflowSensorTimeout``, ``ClinikoIntegrityError``).

        :param attachment_ids: the attachment ids.
        :param poll_interval: seconds between rounds.
        :param timeout: seconds to wait in all.
        :param expect: by attachment id, what its processed record must show (see
            :meth:`wait_for_processing`).
        """
        waiting = list(dict.fromkeys(validate_id("attachment_id", item) for item in attachment_ids))
        outcomes: dict[str, JsonDict | Exception] = {}
        deadline = self._clock() + timeout
        while waiting:
            for start in range(0, len(waiting), PER_PAGE):
                chunk = waiting[start : start + PER_PAGE]
                found = self.get_attachments(chunk)
                for attachment_id in chunk:
                    record = found.get(attachment_id)
                    try:
                        if record is None:
                            raise ClinikoAttachmentGoneError(attachment_id, "not_found")
                        if check_processed(record):
                            check_processed_record(record, (expect or {}).get(attachment_id))
                            outcomes[attachment_id] = record
                    except (ClinikoAttachmentGoneError, ClinikoIntegrityError) as error:
                        outcomes[attachment_id] = error
            waiting = [item for item in waiting if item not in outcomes]
            remaining = deadline - self._clock()
            if waiting and remaining <= 0:
                for item in waiting:
                    outcomes[item] = AirflowSensorTimeout(_not_processed_in_time(item, timeout))
                break
            if waiting:
                self._sleep(min(poll_interval, remaining))
        return outcomes

    def get_attachments(self, attachment_ids: Iterable[int | str]) -> dict[str, JsonDict]:
        """Return the records of many attachments, archived ones included, 100 per request.

        :param attachment_ids: attachment ids; ids missing from the answer do not exist (or were deleted).
        """
        ids = list(dict.fromkeys(validate_id("attachment_id", item) for item in attachment_ids))
        found: dict[str, JsonDict] = {}
        for start in range(0, len(ids), PER_PAGE):
            chunk = ids[start : start + PER_PAGE]
            for record in self.list_attachments(f"id:={','.join(chunk)}", include_archived=True):
                found[str(record.get("id"))] = record
        return found

    def list_attachments(
        self, *filters: str, patient_id: int | str | None = None, include_archived: bool = False
    ) -> Iterator[JsonDict]:
        """Yield attachment records matching the filters, of one patient or of the account.

        :param filters: raw filters such as ``"description:~nightly"`` or ``"id:=1,2,3"``.
        :param patient_id: only this patient's attachments.
        :param include_archived: include archived records.
        """
        q = list(filters)
        if include_archived:
            q.append("archived_at:*")
        path = "/patient_attachments"
        if patient_id is not None:
            path = f"/patients/{validate_id('patient_id', patient_id)}/patient_attachments"
        return self.paginate(path, "patient_attachments", self._page_params(q))

    def archive_attachment(self, attachment_id: int | str) -> None:
        """Archive an attachment record.

        :param attachment_id: the attachment id.
        """
        self.request("POST", f"/patient_attachments/{validate_id('attachment_id', attachment_id)}/archive")

    # --- Connection test ------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Check the key, User-Agent and host with one call to ``GET /user``; return (ok, one-line reason)."""
        try:
            user = self._look_up_user()
        except ClinikoError as error:
            return False, one_line(str(error))
        name = " ".join(str(user.get(part) or "") for part in ("first_name", "last_name")).strip()
        return True, f"Connected to Cliniko at {self.settings.base_url} as {name or 'the key user'}."

    # --- Upload: the S3 step and the three-step flow of the upload guide ------------------------------

    @property
    def s3_session(self) -> requests.Session:
        """This thread's plain session for S3: User-Agent only, never Cliniko's Authorization header."""
        return self._thread_session("s3", {"User-Agent": self.settings.user_agent})

    def _thread_session(self, kind: str, headers: Mapping[str, str]) -> requests.Session:
        """Return this thread's session of one kind, so threads uploading at once can share the hook.

        A ``requests.Session`` is not thread-safe (cookies, state), but its adapters' connection pools
        are: every thread's session mounts the adapters of the kind's first session.
        """
        session: requests.Session | None = getattr(self._local, kind, None)
        if session is None:
            session = requests.Session()
            session.headers.update(headers)
            for prefix in ("https://", "http://"):
                session.mount(prefix, _WatchedAdapter())
            with self._sessions_lock:
                first = self._first_sessions.setdefault(kind, session)
            if first is not session:
                for prefix, adapter in list(first.adapters.items()):
                    session.mount(prefix, adapter)
            setattr(self._local, kind, session)
        return session

    def upload_file(
        self,
        presign: JsonDict,
        opener: Opener,
        size: int,
        filename: str,
        *,
        progress: Progress | None = None,
        refresh_presign: Callable[[], JsonDict] | None = None,
    ) -> S3Upload:
        """POST one file to S3 with a presign's fields (streamed, exact Content-Length); return what S3 holds.

        Goes through the retry runner: S3 5xx answers (``503 SlowDown`` included) and broken connections
        are retried; a 403 (the presign expired or was refused) fetches a fresh presign when
        ``refresh_presign`` is given; any other S3 error raises :class:`S3UploadRejectedError` with S3's
        Code and Message. Only the first 64 KiB of S3's answer is read.

        The file's MD5 and SHA-256 are computed as it streams, and the MD5 is compared with the ETag of
        S3's answer (the MD5 of what S3 stored). A mismatch sends the file once more (with a fresh presign
        when ``refresh_presign`` is given), then raises :class:`S3IntegrityError`. An ETag that is no MD5
        (SSE-KMS buckets) is noted once at debug level and the upload goes on.

        :param presign: ``{"url": ..., "fields": {...}}`` from :meth:`get_presigned_post` (never logged).
        :param opener: opens the file for binary reading; called once per attempt.
        :param size: the file's exact size in bytes.
        :param filename: the file part's name; S3 puts it in place of ``${filename}`` in the key.
        :param progress: called with the bytes sent so far; by default large files log progress lines.
        :param refresh_presign: fetches a fresh presign after a 403, at most ``PRESIGN_REFRESHES`` times,
            and before sending again after an ETag mismatch.
        """
        current = presign
        digesting = opener if isinstance(opener, DigestingOpener) else DigestingOpener(opener, size)

        def refresh() -> None:
            nonlocal current
            if refresh_presign is not None:
                current = refresh_presign()

        for attempt in (1, 2):
            key, etag, headers = self._runner(self._sleep).run(
                "S3 upload",
                lambda: self._s3_attempt(current, digesting, size, filename, progress),
                S3_UPLOAD_REFRESHING if refresh_presign is not None else S3_UPLOAD,
                refresh,
            )
            sha256, md5 = digesting.sha256, digesting.md5
            if sha256 is None or md5 is None:  # pragma: no cover - MultipartBody checks the size it sent
                raise ClinikoError(f"The upload of {filename!r} ended before the whole file was read")
            held, why_not = etag_md5(etag, headers)
            if held is None:
                if not self._etag_note_given:
                    self._etag_note_given = True
                    self.log.debug("Not comparing S3's ETag with the MD5 of the file sent: %s", why_not)
                return S3Upload(key, size, sha256, md5, etag, etag_verified=False)
            if held == md5:
                return S3Upload(key, size, sha256, md5, etag, etag_verified=True)
            if attempt == 2:
                raise s3_mismatch(filename, size, md5, etag)
            self.log.warning(
                "S3 holds other bytes than were sent for %s (sent MD5 %s, S3's ETag %s): sending it again%s",
                filename,
                md5,
                etag,
                " with a fresh presign" if refresh_presign is not None else "",
            )
            refresh()
        raise AssertionError("unreachable")  # pragma: no cover

    def _s3_attempt(
        self, presign: JsonDict, opener: Opener, size: int, filename: str, progress: Progress | None
    ) -> tuple[str, str, Mapping[str, str]] | Failure:
        """POST the file once; return (S3's ``Key``, its ETag, the answer's headers), or the failure."""
        url = str(presign["url"])
        fields = [(str(name), str(value)) for name, value in dict(presign["fields"]).items()]
        reporter = progress or UploadProgress(size, self.log.info, self._clock)
        timeout = self.settings.timeout
        started = self._clock()
        watch = DeadlineWatch()
        try:
            # Sending the file has no total deadline (5 GiB take minutes), only progress: each write
            # within the timeout. Once the file is sent, S3's status line and headers must come within
            # the timeout, and its body within the timeout more.
            with contextlib.ExitStack() as answers, watch:
                body = MultipartBody(
                    fields,
                    opener,
                    size,
                    filename,
                    content_type=guess_content_type(filename),
                    progress=reporter,
                    sent=lambda: watch.arm(Deadline(timeout)),
                )
                response = answers.enter_context(
                    self.s3_session.post(
                        url,
                        data=body,
                        headers={"Content-Type": body.content_type},
                        timeout=timeout,
                        stream=True,
                    )
                )
                deadline = Deadline(timeout)
                watch.arm(deadline)
                content = read_capped(response.iter_content(CHUNK), MAX_ERROR_BYTES, deadline)
                status, headers = response.status_code, response.headers
        except (requests.RequestException, DeadlineExceeded) as error:
            due = watch.deadline
            if due is not None and due.passed():  # also a read timeout that ends with the deadline
                code, reason = "Timeout", f"S3's answer: {due.reason()}"
            else:
                code, reason = "ConnectionError", self.redactor(network_reason(error))
            return Failure(None, {}, final(S3UploadError(0, code, reason)), reason)
        answer = parse_s3_xml(content)
        if status < 300:
            key = answer.get("Key") or expected_key(fields, filename)
            elapsed = max(self._clock() - started, 1e-6)
            self.log.info(
                "Uploaded %s to S3 in %.1f s (%s/s)",
                format_bytes(size),
                elapsed,
                format_bytes(size / elapsed),
            )
            return key, answered_etag(answer, headers), headers
        answer = {name: self.redactor(value) for name, value in answer.items()}
        failure = s3_error(status, answer, self.redactor(content.decode("utf-8", "replace")))
        return Failure(status, headers, final(failure), f"{failure.code}: {failure.message}")

    def upload_to_patient(
        self, patient_id: int | str, source: UploadSource, filename: str, *, progress: Progress | None = None
    ) -> S3Upload:
        """Presign and upload one file of a patient; return what S3 stored, with the ``upload_url`` to use.

        A 403 from S3 (expired or refused presign) fetches a fresh presign, at most ``PRESIGN_REFRESHES``
        times, and so does an ETag mismatch (see :meth:`upload_file`). The ``upload_url`` is the presign
        ``url`` + S3's ``Key`` (never S3's ``Location``).

        :param patient_id: the Cliniko patient id.
        :param source: the file to upload (see :func:`resolve_source`).
        :param filename: the name Cliniko shows.
        :param progress: see :meth:`upload_file`.
        """
        presign = self.patient_call(patient_id, self.get_presigned_post)

        def refresh() -> JsonDict:
            nonlocal presign
            presign = self.patient_call(patient_id, self.get_presigned_post)
            return presign

        stored = self.upload_file(
            presign, source.opener, source.size, filename, progress=progress, refresh_presign=refresh
        )
        return replace(stored, upload_url=join_upload_url(str(presign["url"]), stored.key))

    def attachment_sha256(self, attachment_id: int | str, *, max_bytes: int | None = None) -> str:
        """Return the SHA-256 (hex) of a processed attachment's bytes, streamed from ``/content``.

        :param attachment_id: the attachment id.
        :param max_bytes: read no more than this many bytes (the record's ``size``): what lies beyond is not
            downloaded, and the hash is of what was read.
        """
        return self.attachment_digest(attachment_id, max_bytes=max_bytes)[0]

    def attachment_digest(self, attachment_id: int | str, *, max_bytes: int | None = None) -> tuple[str, int]:
        """Return (hex SHA-256, bytes counted) of a processed attachment's ``/content``, streamed.

        One request, through the retry runner and the rate budget; memory stays flat whatever the size.
        With ``max_bytes`` (the record's ``size``), the hash is of the first ``max_bytes`` bytes at most; one
        more byte is read to tell whether the body is longer, and then counted (``max_bytes + 1``), never
        the rest.

        :param attachment_id: the attachment id.
        :param max_bytes: the most bytes hashed, or None for no bound.
        """
        url = self.settings.url(f"/patient_attachments/{validate_id('attachment_id', attachment_id)}/content")
        what = self.settings.describe("GET", url)

        timeout = self.settings.timeout

        def attempt() -> tuple[str, int] | Failure:
            digest = hashlib.sha256()
            count = 0
            deadline = Deadline(timeout)
            try:
                with contextlib.ExitStack() as answers, DeadlineWatch(deadline):
                    response = answers.enter_context(self.session.get(url, timeout=timeout, stream=True))
                    status, headers = response.status_code, response.headers
                    if status >= 400:
                        content = read_capped(response.iter_content(CHUNK), MAX_ERROR_BYTES, deadline)
                        refused = self._api_answer(status, headers, content, what)
                        if isinstance(refused, Failure):
                            return refused
                    while max_bytes is None or count < max_bytes:
                        want = CHUNK_SIZE if max_bytes is None else min(CHUNK_SIZE, max_bytes - count)
                        # one read of at most ``want``: a new iter_content per read loses the rest of
                        # a chunked answer's chunk, and one iterator would read past ``max_bytes``
                        chunk = response.raw.read(want, decode_content=True)
                        if not chunk:
                            break
                        count += len(chunk)
                        digest.update(chunk)
                        deadline.extend(timeout * len(chunk) / DOWNLOAD_PROGRESS_BYTES)
                        deadline.check()
                    if (
                        max_bytes is not None
                        and count == max_bytes
                        and response.raw.read(1, decode_content=True)
                    ):
                        count += 1  # longer than expected: one byte tells, the rest is never read
            except (requests.RequestException, urllib3.exceptions.HTTPError, DeadlineExceeded) as error:
                return self._connection_failure(error, what, deadline)
            return digest.hexdigest(), count

        return self._runner(self._sleep).run(what, attempt, API_CALL)

    def now(self) -> float:
        """The hook's clock (``time.time`` unless a test gave another)."""
        return self._clock()

    def retry_runner(self) -> RetryRunner:
        """A retry runner with this hook's policy, budget, clock and sleep (for calls composed above it)."""
        return self._runner(self._sleep)

    def patient_call(self, patient_id: int | str, call: Callable[[str], T]) -> T:
        """Run a patient-scoped call, turning Cliniko's 404 into a clear input error.

        :param patient_id: the Cliniko patient id.
        :param call: the call, given the validated id.
        """
        pid = validate_id("patient_id", patient_id)
        try:
            return call(pid)
        except ClinikoNotFoundError as error:
            raise ClinikoInputError(
                f"patient_id {pid}: Cliniko has no such patient in this account ({error.request} answered "
                "404). Check the id (ClinikoHook.find_patients looks patients up) and that the connection's "
                "API key belongs to the patient's Cliniko account."
            ) from None


def _not_processed_in_time(attachment_id: str, timeout: float) -> str:
    return (
        f"Cliniko had not finished processing attachment {attachment_id} after {timeout:.0f} s. "
        "Large files take longer: raise the sensor's timeout, or check the attachment in Cliniko"
    )


def network_reason(error: BaseException) -> str:
    """Return the innermost cause of a network error as one short line (no URL queries, no headers).

    :param error: a ``requests`` or ``httpx`` exception.
    """
    reason: BaseException = error
    for _ in range(5):
        inner = getattr(reason, "reason", None)
        if not isinstance(inner, BaseException) and reason.args and isinstance(reason.args[0], BaseException):
            inner = reason.args[0]
        if not isinstance(inner, BaseException) or inner is reason:
            break
        reason = inner
    return redact(one_line(f"{type(reason).__name__}: {reason}"))[:300]


PRESIGN_REFRESHES = RetryPolicy.max_refreshes  # fresh presigns fetched after S3 answers 403, per upload
T = TypeVar("T")


class ClinikoAsyncHook(_ClinikoBase):
    """The async twin of :class:`ClinikoHook` (httpx), for triggers: same settings, retries and budget.

    :param cliniko_conn_id: the Airflow connection id (type ``cliniko``).
    :param asleep: how to wait between attempts (injectable for tests).
    :param clock: the current UNIX time (injectable for tests).
    :param rand: a source of jitter in [0, 1) (injectable for tests).
    :param transport: an httpx transport (tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        cliniko_conn_id: str = _ClinikoBase.default_conn_name,
        *,
        asleep: Callable[[float], Any] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(cliniko_conn_id, clock=clock, rand=rand)
        self._asleep = asleep
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def aget_settings(self) -> ClinikoSettings:
        """Load (once) and return the validated connection settings, the Airflow 3 async way."""
        if self._settings is None:
            conn = await self.aget_connection(self.cliniko_conn_id)
            self._remember(ClinikoSettings.from_connection(conn))
        return self._require_settings()

    async def aclient(self) -> httpx.AsyncClient:
        """Return the (lazily created) httpx client carrying auth, User-Agent and Accept."""
        settings = await self.aget_settings()
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=settings.headers, timeout=settings.timeout, transport=self._transport
            )
        return self._client

    async def aclose(self) -> None:
        """Close the httpx client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def arequest(
        self, method: str, path_or_url: str, *, params: Params = None, json: JsonDict | None = None
    ) -> Answer:
        """Send one API request through the retry runner; return the successful answer, its body read.

        :param method: HTTP method.
        :param path_or_url: path under the base URL or an absolute URL.
        :param params: query parameters.
        :param json: JSON body.
        """
        settings = await self.aget_settings()
        settings.url(path_or_url)  # a refused URL sends nothing, not even the look-up
        await auser_budget(settings, self._alook_up_user, clock=self._clock)  # once per key, then remembered
        return await self._asend(method, path_or_url, params=params, json=json)

    async def _asend(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Params = None,
        json: JsonDict | None = None,
        rules: CallRules = API_CALL,
    ) -> Answer:
        """:meth:`arequest` on the budget known now (without learning the key's user first)."""
        client = await self.aclient()
        settings = self._require_settings()
        url = settings.url(path_or_url)
        what = settings.describe(method, url)

        async def exchange() -> tuple[int, Mapping[str, str], bytes]:
            async with client.stream(method, url, params=params, json=json) as response:
                content = await aread_capped(response.aiter_bytes(CHUNK), MAX_ANSWER_BYTES)
                return response.status_code, response.headers, content

        async def attempt() -> Answer | Failure:
            deadline = Deadline(settings.timeout)
            try:  # connect, answer and body together: httpx's own timeout bounds each read only
                status, headers, content = await asyncio.wait_for(exchange(), deadline.seconds)
            except (httpx.HTTPError, asyncio.TimeoutError) as error:
                return self._connection_failure(error, what, deadline)
            return self._api_answer(status, headers, content, what)

        return await self._runner(asleep=self._asleep).arun(what, attempt, rules)

    async def _alook_up_user(self) -> JsonDict:
        """:meth:`ClinikoHook._look_up_user`, the async way."""
        answer = await self._asend("GET", "/user", rules=API_CREATE)
        return answer.json_object("GET /user")

    async def aget_json(self, path_or_url: str, params: Params = None) -> JsonDict:
        """GET and decode a JSON object.

        :param path_or_url: path under the base URL or an absolute URL (see :meth:`arequest`).
        :param params: query parameters.
        """
        settings = await self.aget_settings()
        url = settings.url(path_or_url)
        answer = await self.arequest("GET", url, params=params)
        return answer.json_object(settings.describe("GET", url))

    async def aget_attachment(self, attachment_id: int | str) -> JsonDict:
        """Return one attachment record.

        :param attachment_id: the attachment id.
        """
        return await self.aget_json(f"/patient_attachments/{validate_id('attachment_id', attachment_id)}")

    async def aget_attachments(self, attachment_ids: Iterable[str]) -> dict[str, JsonDict]:
        """Return the records of up to 100 attachments in one request (archived ones included).

        :param attachment_ids: attachment ids; ids missing from the answer do not exist (or were deleted).
        """
        ids = sorted({validate_id("attachment_id", item) for item in attachment_ids}, key=int)
        if not ids:
            return {}
        if len(ids) > PER_PAGE:
            raise ClinikoInputError(f"At most {PER_PAGE} attachments per request, got {len(ids)}")
        params = self._page_params([f"id:={','.join(ids)}", "archived_at:*"])
        page = await self.aget_json("/patient_attachments", params)
        return {str(item["id"]): item for item in page.get("patient_attachments") or []}


__all__ = ["ClinikoAPIError", "ClinikoAsyncHook", "ClinikoHook", "equality_filters"]
