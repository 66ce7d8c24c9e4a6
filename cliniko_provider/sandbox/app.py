"""HTTP routes: the Cliniko API under `/v1`, the S3 bucket under `/s3`, controls under `/_sandbox`.

Every `/v1` request passes, in order: injected faults, the User-Agent check, HTTP Basic
auth, the per-key rate limit. See the package docstring for the answers chosen where
Cliniko's own behaviour is unconfirmed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cliniko_provider.sandbox import s3
from cliniko_provider.sandbox.config import bucket_of, parse_rate_limit
from cliniko_provider.sandbox.core import Sandbox, StorageLimitReached
from cliniko_provider.sandbox.listing import FieldKind, ListingError, PageRequest, build_query
from cliniko_provider.sandbox.patient_fields import extra_fields, render_extra
from cliniko_provider.sandbox.s3_policy import S3Error
from cliniko_provider.sandbox.store import Account, Attachment, Patient, Record, StoredObject
from cliniko_provider.sandbox.traffic import Stats, mask_key

PATIENT_FIELDS: dict[str, FieldKind] = {
    "id": "int",
    "first_name": "string",
    "last_name": "string",
    "email": "string",
    "old_reference_id": "string",
    "date_of_birth": "date",
    "created_at": "datetime",
    "updated_at": "datetime",
    "archived_at": "datetime",
}
ATTACHMENT_FIELDS: dict[str, FieldKind] = {
    "id": "int",
    "patient_id": "int",
    "user_id": "int",
    "size": "int",
    "description": "string",
    "filename": "string",
    "content_type": "string",
    "created_at": "datetime",
    "updated_at": "datetime",
    "processed_at": "datetime",
    "archived_at": "datetime",
}
# Cliniko's schema pattern for e-mail addresses, read case-insensitively.
EMAIL_PATTERN = re.compile(r"^[A-Z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Z0-9.-]+\.[A-Z]{2,63}$", re.IGNORECASE)
MAX_ID = 2**63 - 1
MAX_TEXT = 255
STORAGE_LIMIT_MESSAGE = "File storage limit reached for this account: no more files can be uploaded"
ACCESS_DENIED = "HTTP Basic: Access denied.\n"
NO_USER_AGENT = "Requires a user agent"

Handler = Callable[[Request, Account], Awaitable[Response]]
# Routes take every method, so that a path answers 405 (or OPTIONS) with its own `Allow`.
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


def not_found() -> Response:
    return JSONResponse({"message": "Not found"}, status_code=404)


def validation_failed(errors: dict[str, str]) -> Response:
    return JSONResponse({"message": "Validation Failed", "errors": errors}, status_code=422)


def throttled(reset_at: int) -> Response:
    headers = {"X-RateLimit-Reset": str(reset_at), "Retry-After": str(max(1, reset_at - int(time.time())))}
    return PlainTextResponse("Retry later\n", status_code=429, headers=headers)


def parse_id(text: object) -> int | None:
    """A record id from a path or body: digits only (as a string or a JSON integer), in 64 bits."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not re.fullmatch(r"\d{1,19}", text) or int(text) > MAX_ID:
        return None
    return int(text)


def basic_auth_user(request: Request) -> str | None:
    """The user name of a Basic authorization with an empty password."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user if colon and not password and user else None


async def read_json_object(request: Request, default: bytes | None = b"{}") -> dict[str, Any] | None:
    """The body as a JSON object, or None; an empty body reads as `default`.

    Python's parser also takes `NaN`, `Infinity`, numbers beyond a float and lone UTF-16
    surrogates (`"\\ud800"`), none of which can be stored or answered, and nesting deep enough to
    exhaust the stack: such a body is refused too.
    """
    try:
        body = json.loads(await request.body() or default or b"")
        json.dumps(body, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def text_error(value: object, required: bool = False) -> str | None:
    """Rails-style validation message for an optional (or required) short text field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "can't be blank" if required else None
    if not isinstance(value, str):
        return "is invalid"
    return "is too long (maximum is 255 characters)" if len(value) > MAX_TEXT else None


class Api:
    """The `/v1` handlers; each gets the request and the caller's account."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.store = sandbox.store

    # -- shared ----------------------------------------------------------------------------

    def injected_fault(self, for_s3: bool) -> Response | None:
        sandbox = self.sandbox
        fault = sandbox.faults.draw(sandbox.settings.fail_rate, sandbox.settings.throttle_rate)
        headers = {"X-Sandbox-Fault": fault or ""}
        if fault == "throttle":
            sandbox.stats.injected_throttles += 1
            if for_s3:  # as real S3 throttles
                return s3.xml_error(S3Error(503, "SlowDown", "Please reduce your request rate."), headers)
            response = throttled(int(time.time()) + 1)
            response.headers.update(headers)
            return response
        if fault == "fail":
            sandbox.stats.injected_failures += 1
            status = sandbox.faults.failure_status()
            if for_s3:
                error = S3Error(
                    status, "InternalError", "We encountered an internal error. Please try again."
                )
                return s3.xml_error(error, headers)
            return PlainTextResponse(
                f"Sandbox injected failure ({status})", status_code=status, headers=headers
            )
        return None

    def route(self, path: str, handlers: dict[str, Handler]) -> Route:
        """One path, its handler per method; other methods answer 405 and OPTIONS 204, with `Allow`."""
        allowed = sorted({*handlers, "OPTIONS"} | ({"HEAD"} if "GET" in handlers else set()))
        allow = {"Allow": ", ".join(allowed)}

        async def endpoint(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=allow)
            handler = handlers.get(method)
            if handler is None:
                return JSONResponse({"message": "Method not allowed"}, status_code=405, headers=allow)
            return await self.call(f"{method} {path}", request, handler)

        return Route(path, endpoint, methods=HTTP_METHODS)

    async def call(self, label: str, request: Request, handler: Handler) -> Response:
        """Count the request, then faults, User-Agent, auth and the rate limit, then the handler."""
        sandbox = self.sandbox
        sandbox.stats.requests_by_route[label] += 1
        fault = self.injected_fault(for_s3=False)
        if fault is not None:
            return fault
        if not request.headers.get("user-agent", "").strip():
            return PlainTextResponse(NO_USER_AGENT, status_code=400)
        api_key = basic_auth_user(request)
        account = sandbox.account_for_key(api_key) if api_key else None
        if api_key is None or account is None:
            return PlainTextResponse(
                ACCESS_DENIED, status_code=401, headers={"WWW-Authenticate": 'Basic realm="Application"'}
            )
        sandbox.stats.requests_by_key[mask_key(api_key)] += 1
        reset_at = sandbox.limiter.admit(str(account.user_id), time.time())  # per user, as Cliniko
        if reset_at is not None:
            sandbox.stats.rate_limited += 1
            return throttled(reset_at)
        try:
            return await handler(request, account)
        except ListingError as error:
            return validation_failed({"q": str(error)})

    def api_url(self, request: Request, path: str) -> str:
        return f"{request.base_url}v1/{path}"

    def links(self, request: Request, path: str) -> dict[str, dict[str, str]]:
        return {"links": {"self": self.api_url(request, path)}}

    def listing(
        self,
        request: Request,
        account: Account,
        kind: type[Record],
        scope: dict[str, int],
        name: str,
        render: Callable[[Request, Record], dict[str, Any]],
    ) -> Response:
        """One page of the account's records of `kind` (within `scope`, e.g. one patient's)."""
        params = request.query_params
        fields = PATIENT_FIELDS if kind is Patient else ATTACHMENT_FIELDS
        filters = params.getlist("q[]") + [f"{name}:={value}" for name, value in scope.items()]
        sort = ",".join(params.getlist("sort")) or None
        query = build_query(filters, sort, params.get("order"), fields)
        page = PageRequest.parse(params.get("page"), params.get("per_page"))
        records, total = self.store.list_records(kind, account, query, page.offset, page.per_page)
        body = {name: [render(request, r) for r in records], "total_entries": total}
        return JSONResponse({**body, "links": page.links(request.url, total)})

    def archive(self, record: Patient | Attachment | None) -> Response:
        """Archiving keeps the record (and its first archived_at); lists then leave it out."""
        if record is None:
            return not_found()
        self.store.archive(record)
        return Response(status_code=204)

    def patient_of(self, account: Account, raw_id: object) -> Patient | None:
        patient_id = parse_id(raw_id)
        return self.store.patient(account, patient_id) if patient_id is not None else None

    def attachment_of(self, request: Request, account: Account) -> Attachment | None:
        attachment_id = parse_id(request.path_params["id"])
        return self.store.attachment(account, attachment_id) if attachment_id is not None else None

    # -- renderers -------------------------------------------------------------------------

    def render_user(self, request: Request, account: Account) -> dict[str, Any]:
        return {
            "id": str(account.user_id),
            "first_name": "Sandbox",
            "last_name": "User",
            "email": f"sandbox.user+{account.id}@example.com",
            "title": None,
            "role": "administrator",
            "active": True,
            "user_active": True,
            "time_zone": "Melbourne",
            "time_zone_identifier": "Australia/Melbourne",
            "phone_numbers": [],
            "created_at": account.created_at,
            "updated_at": account.created_at,
            **self.links(request, f"users/{account.user_id}"),
        }

    def render_patient(self, request: Request, patient: Patient) -> dict[str, Any]:
        path = f"patients/{patient.id}"
        return {
            "id": str(patient.id),
            "first_name": patient.first_name,
            "last_name": patient.last_name,
            "label": f"{patient.first_name} {patient.last_name}",
            "email": patient.email,
            "date_of_birth": patient.date_of_birth,
            "old_reference_id": patient.old_reference_id,
            **render_extra(patient.extra),
            "created_at": patient.created_at,
            "updated_at": patient.updated_at,
            "archived_at": patient.archived_at,
            "deleted_at": None,
            "patient_attachments": self.links(request, f"{path}/patient_attachments"),
            "appointments": self.links(request, f"{path}/appointments"),
            "invoices": self.links(request, f"{path}/invoices"),
            **self.links(request, path),
        }

    def render_attachment(self, request: Request, attachment: Attachment) -> dict[str, Any]:
        path = f"patient_attachments/{attachment.id}"
        return {
            "id": str(attachment.id),
            "description": attachment.description,
            "filename": attachment.filename,
            "content_type": attachment.content_type,
            "size": attachment.size,
            "processing_completed": attachment.processing_completed,
            "processed_at": attachment.processed_at,
            "pinned_at": None,
            "archived_at": attachment.archived_at,
            "created_at": attachment.created_at,
            "updated_at": attachment.updated_at,
            "content": self.links(request, f"{path}/content"),
            "patient": self.links(request, f"patients/{attachment.patient_id}"),
            "user": self.links(request, f"users/{attachment.user_id}"),
            **self.links(request, path),
        }

    # -- user --------------------------------------------------------------------------------

    async def get_user(self, request: Request, account: Account) -> Response:
        return JSONResponse(self.render_user(request, account))

    async def get_user_by_id(self, request: Request, account: Account) -> Response:
        if parse_id(request.path_params["id"]) != account.user_id:
            return not_found()
        return JSONResponse(self.render_user(request, account))

    # -- patients ----------------------------------------------------------------------------

    async def list_patients(self, request: Request, account: Account) -> Response:
        return self.listing(request, account, Patient, {}, "patients", self.render_patient)

    async def create_patient(self, request: Request, account: Account) -> Response:
        body = await read_json_object(request)
        if body is None:
            return JSONResponse({"message": "The request body must be a JSON object"}, status_code=400)
        errors = {
            name: error
            for name in ("first_name", "last_name", "email", "old_reference_id")
            if (error := text_error(body.get(name), required=name.endswith("_name")))
        }
        email = body.get("email")
        if "email" not in errors and email and not EMAIL_PATTERN.match(email):
            errors["email"] = "is invalid"
        birth = body.get("date_of_birth")
        if birth is not None:
            try:
                date.fromisoformat(birth if isinstance(birth, str) and len(birth) == 10 else "")
            except ValueError:
                errors["date_of_birth"] = "is invalid"
        extra, extra_errors = extra_fields(body)
        errors.update(extra_errors)
        if errors:
            return validation_failed(errors)
        fields = {name: body.get(name) or None for name in ("email", "date_of_birth", "old_reference_id")}
        patient = self.store.add_patient(
            account, {"first_name": body["first_name"], "last_name": body["last_name"], **fields}, extra
        )
        rendered = self.render_patient(request, patient)
        return JSONResponse(rendered, status_code=201, headers={"Location": rendered["links"]["self"]})

    async def get_patient(self, request: Request, account: Account) -> Response:
        patient = self.patient_of(account, request.path_params["id"])
        return JSONResponse(self.render_patient(request, patient)) if patient else not_found()

    async def archive_patient(self, request: Request, account: Account) -> Response:
        return self.archive(self.patient_of(account, request.path_params["id"]))

    async def presigned_post(self, request: Request, account: Account) -> Response:
        patient = self.patient_of(account, request.path_params["id"])
        if patient is None:
            return not_found()
        try:
            post = self.sandbox.presigned_post(
                account, patient, s3.bucket_url(request, bucket_of(account.shard))
            )
        except StorageLimitReached:
            return validation_failed({"base": STORAGE_LIMIT_MESSAGE})
        return JSONResponse(post)

    # -- attachments -------------------------------------------------------------------------

    async def list_attachments(self, request: Request, account: Account) -> Response:
        return self.listing(request, account, Attachment, {}, "patient_attachments", self.render_attachment)

    async def list_patient_attachments(self, request: Request, account: Account) -> Response:
        patient = self.patient_of(account, request.path_params["id"])
        if patient is None:
            return not_found()
        scope = {"patient_id": patient.id}
        return self.listing(
            request, account, Attachment, scope, "patient_attachments", self.render_attachment
        )

    def temp_object(
        self, request: Request, account: Account, patient: Patient, upload_url: object
    ) -> StoredObject | None:
        """The object `upload_url` (presign `url` + `Key`) names, if a fresh upload for this patient."""
        bucket = bucket_of(account.shard)
        prefix = s3.bucket_url(request, bucket)
        if not isinstance(upload_url, str) or not upload_url.startswith(prefix):
            return None
        key = upload_url[len(prefix) :]
        obj = self.store.object(bucket, key)
        temp_prefix = f"{account.id}/patients/{patient.id}/attachments/temp/"
        if obj is None or obj.claimed_by is not None or not key.startswith(temp_prefix) or key.endswith("/"):
            return None
        return obj

    async def create_attachment(self, request: Request, account: Account) -> Response:
        body = await read_json_object(request)
        if body is None:
            return JSONResponse({"message": "The request body must be a JSON object"}, status_code=400)
        if body.get("patient_id") in (None, ""):
            return validation_failed({"patient_id": "can't be blank"})
        patient = self.patient_of(account, body["patient_id"])
        if patient is None:
            return not_found()
        description = body.get("description")
        error = text_error(description)
        if error:
            return validation_failed({"description": error})
        obj = self.temp_object(request, account, patient, body.get("upload_url"))
        if obj is None:
            return validation_failed({"temp_attachment_url": "is invalid"})
        try:
            attachment = self.sandbox.create_attachment(account, patient, obj, description)
        except StorageLimitReached:
            return validation_failed({"base": STORAGE_LIMIT_MESSAGE})
        rendered = self.render_attachment(request, attachment)
        return JSONResponse(rendered, status_code=201, headers={"Location": rendered["links"]["self"]})

    async def get_attachment(self, request: Request, account: Account) -> Response:
        attachment = self.attachment_of(request, account)
        return JSONResponse(self.render_attachment(request, attachment)) if attachment else not_found()

    async def archive_attachment(self, request: Request, account: Account) -> Response:
        """`POST .../archive`, and the deprecated `DELETE`, which archives too."""
        return self.archive(self.attachment_of(request, account))

    async def attachment_content(self, request: Request, account: Account) -> Response:
        attachment = self.attachment_of(request, account)
        if attachment is None or attachment.content_path is None:
            return not_found()
        self.sandbox.stats.content_reads += 1
        self.sandbox.stats.content_bytes += (self.store.data_dir / attachment.content_path).stat().st_size
        return FileResponse(
            self.store.data_dir / attachment.content_path,
            media_type=attachment.content_type,
            filename=attachment.filename,
        )

    async def unknown(self, request: Request, account: Account) -> Response:
        return not_found()

    def routes(self) -> list[Route]:
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/v1/user", self.get_user),
            ("GET", "/v1/users/{id}", self.get_user_by_id),
            ("GET", "/v1/patients", self.list_patients),
            ("POST", "/v1/patients", self.create_patient),
            ("GET", "/v1/patients/{id}", self.get_patient),
            ("POST", "/v1/patients/{id}/archive", self.archive_patient),
            ("GET", "/v1/patients/{id}/attachment_presigned_post", self.presigned_post),
            ("GET", "/v1/patients/{id}/patient_attachments", self.list_patient_attachments),
            ("GET", "/v1/patient_attachments", self.list_attachments),
            ("POST", "/v1/patient_attachments", self.create_attachment),
            ("GET", "/v1/patient_attachments/{id}", self.get_attachment),
            ("DELETE", "/v1/patient_attachments/{id}", self.archive_attachment),
            ("POST", "/v1/patient_attachments/{id}/archive", self.archive_attachment),
            ("GET", "/v1/patient_attachments/{id}/content", self.attachment_content),
        ]
        by_path: dict[str, dict[str, Handler]] = {}
        for method, path, handler in table:
            by_path.setdefault(path, {})[method] = handler

        async def unknown_path(request: Request) -> Response:
            return await self.call("* /v1/{path}", request, self.unknown)

        return [
            *(self.route(path, handlers) for path, handlers in by_path.items()),
            Route("/v1/{path:path}", unknown_path, methods=HTTP_METHODS),
        ]


# Counted-down faults that make stored bytes or processed records differ from what was sent.
CORRUPTIONS = ("corrupt_s3_objects", "corrupt_processed_sizes", "corrupt_processed_contents")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
ControlHandler = Callable[[Request], Awaitable[Response]]


def forbidden(reason: str) -> Response:
    return JSONResponse({"message": f"Refused: {reason}"}, status_code=403)


def cross_site_reason(request: Request, listen_host: str) -> str | None:
    """Why a control request may come from a web page rather than a test or a shell, if it may.

    A page in the user's browser can send simple requests to any address, and reach this one
    under its own domain name by DNS rebinding. It cannot set a loopback Host header, nor send
    `Content-Type: application/json` across origins without a preflight we never approve.
    """
    server = request.scope.get("server")
    port = server[1] if server else None
    allowed = LOOPBACK_NAMES | {listen_host.strip("[]")}
    host = request.url.hostname or ""
    if host not in allowed or request.url.port not in (port, None if port == 80 else port):
        return f"the Host header must name this sandbox ({', '.join(sorted(allowed))} with port {port})"
    origin = request.headers.get("origin")
    if origin is not None:
        parsed = URL(origin)
        if parsed.scheme != "http" or parsed.hostname not in allowed or parsed.port not in (port, None):
            return f"requests from the web page at {origin} may not use the sandbox controls"
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return "cross-site requests may not use the sandbox controls"
    if request.method == "POST":
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            return "send a JSON object with Content-Type: application/json"
    return None


class Controls:
    """Unauthenticated test and benchmark controls under `/_sandbox/`, for the local user only.

    Every control checks that it is not called from a web page (see `cross_site_reason`);
    changes take a JSON object body (`{}` for a reset).
    """

    RUNTIME_SETTINGS = (
        "fail_rate",
        "throttle_rate",
        "processing_delay",
        "processing_delay_per_mb",
        "presign_ttl",
        "s3_reset_after_bytes",
        "rate_limit",
        *CORRUPTIONS,
    )

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.listen_host = sandbox.settings.host

    def current(self) -> dict[str, Any]:
        settings = self.sandbox.settings
        limiter = self.sandbox.limiter
        values = {name: getattr(settings, name) for name in self.RUNTIME_SETTINGS if name != "rate_limit"}
        return {**values, "rate_limit": f"{limiter.limit}/{limiter.window:g}"}

    async def stats(self, request: Request) -> Response:
        return JSONResponse({**self.sandbox.stats.as_json(), **self.sandbox.store.counts()})

    async def reset_stats(self, request: Request) -> Response:
        if await read_json_object(request, default=None) is None:
            return JSONResponse({"message": "Expected a JSON object, e.g. {}"}, status_code=400)
        self.sandbox.stats = Stats()
        return Response(status_code=204)

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self.current())

    async def set_faults(self, request: Request) -> Response:
        body = await read_json_object(request, default=None)
        if body is None or not set(body) <= set(self.RUNTIME_SETTINGS):
            unknown = sorted(set(body or {}) - set(self.RUNTIME_SETTINGS))
            return JSONResponse(
                {"message": f"Expected a JSON object of {self.RUNTIME_SETTINGS}; not {unknown}"}, 400
            )
        try:
            self.apply(body)
        except (TypeError, ValueError) as error:
            return JSONResponse({"message": str(error)}, status_code=400)
        return JSONResponse(self.current())

    def apply(self, changes: dict[str, Any]) -> None:
        settings = self.sandbox.settings
        merged = {**self.current(), **changes}
        for rate in ("fail_rate", "throttle_rate"):
            if not 0 <= float(merged[rate]) <= 1:
                raise ValueError(f"{rate} must be between 0 and 1")
        if float(merged["fail_rate"]) + float(merged["throttle_rate"]) > 1:
            raise ValueError("fail_rate + throttle_rate must not exceed 1")
        for name in ("processing_delay", "processing_delay_per_mb", "presign_ttl"):
            if float(merged[name]) < 0:
                raise ValueError(f"{name} must not be negative")
        reset_after = merged["s3_reset_after_bytes"]
        if reset_after is not None and int(reset_after) < 0:
            raise ValueError("s3_reset_after_bytes must not be negative")
        for name in CORRUPTIONS:
            count = merged[name]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be a whole number of uploads, 0 or more, not {count!r}")
        limit, window = parse_rate_limit(str(merged["rate_limit"]))
        settings.fail_rate = float(merged["fail_rate"])
        settings.throttle_rate = float(merged["throttle_rate"])
        settings.processing_delay = float(merged["processing_delay"])
        settings.processing_delay_per_mb = float(merged["processing_delay_per_mb"])
        settings.presign_ttl = int(merged["presign_ttl"])
        settings.s3_reset_after_bytes = None if reset_after is None else int(reset_after)
        for name in CORRUPTIONS:
            setattr(settings, name, merged[name])
        self.sandbox.limiter.limit, self.sandbox.limiter.window = limit, window

    async def delete_attachment(self, request: Request) -> Response:
        """Remove an attachment for good, as a clinic deleting it would (Cliniko's API only archives)."""
        try:
            attachment_id = int(request.path_params["id"])
        except ValueError:
            return JSONResponse({"message": "Expected a numeric attachment id"}, status_code=400)
        if not self.sandbox.store.delete_attachment(attachment_id):
            return JSONResponse({"message": f"No attachment {attachment_id}"}, status_code=404)
        return Response(status_code=204)

    async def finish_processing(self, request: Request) -> Response:
        """Make every attachment still processing finish ``after`` seconds from now (a bench's release).

        With a long ``processing_delay`` while many attachments are created, this makes all of them wait
        at once and then finish together, however long the creating took.
        """
        body = await read_json_object(request, default=None)
        after = None if body is None or set(body) != {"after"} else body["after"]
        if isinstance(after, bool) or not isinstance(after, (int, float)) or not 0 <= after <= 86_400:
            return JSONResponse({"message": 'Expected {"after": seconds}, 0 to 86400'}, status_code=400)
        count = self.sandbox.store.reschedule_processing(time.time() + after)
        self.sandbox.wake_processor()
        return JSONResponse({"rescheduled": count})

    def guarded(self, handler: ControlHandler) -> ControlHandler:
        async def endpoint(request: Request) -> Response:
            reason = cross_site_reason(request, self.listen_host)
            return forbidden(reason) if reason else await handler(request)

        return endpoint

    def routes(self) -> list[Route]:
        return [
            Route("/_sandbox/stats", self.guarded(self.stats), methods=["GET"]),
            Route("/_sandbox/stats/reset", self.guarded(self.reset_stats), methods=["POST"]),
            Route("/_sandbox/faults", self.guarded(self.get_faults), methods=["GET"]),
            Route("/_sandbox/faults", self.guarded(self.set_faults), methods=["POST"]),
            Route("/_sandbox/processing/finish", self.guarded(self.finish_processing), methods=["POST"]),
            Route(
                "/_sandbox/attachments/{id}/delete", self.guarded(self.delete_attachment), methods=["POST"]
            ),
        ]


def create_app(sandbox: Sandbox) -> Starlette:
    api = Api(sandbox)

    async def s3_post(request: Request) -> Response:
        sandbox.stats.requests_by_route["POST /s3/{bucket}/"] += 1
        return api.injected_fault(for_s3=True) or await s3.post_object(sandbox, request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        processor = asyncio.create_task(sandbox.process_forever())
        try:
            yield
        finally:
            processor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await processor

    routes = [
        *api.routes(),
        Route("/s3/{bucket}/", s3_post, methods=["POST"]),
        Route("/s3/{bucket}", s3_post, methods=["POST"]),
        *Controls(sandbox).routes(),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
