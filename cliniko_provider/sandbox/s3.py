"""The S3 bucket endpoint: browser-style POST uploads, streamed to disk and checked strictly.

`POST /s3/<bucket>/` takes `multipart/form-data`: the fields, then the `file` part, which
is streamed to a file under the data directory (memory does not grow with its size). The
rules of `shared/reference/s3-post.md` are enforced here and in `s3_policy`: Content-Length
required (411, chunked bodies refused), at most 20 KB before the file, exactly one file,
fields after the file ignored, every field covered by the signed, unexpired policy, sizes
within `content-length-range`. Answers and errors are S3's XML.

Test support: with the one-shot `s3_reset_after_bytes` set, the upload's connection is
aborted (TCP reset) once that many body bytes have arrived. While `corrupt_s3_objects` is above
0, each upload that arrives counts it down and is stored with its first byte flipped: the ETag
answered is the MD5 of the bytes stored, as S3's is, so it differs from the MD5 of what was sent.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote
from xml.sax.saxutils import escape

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from cliniko_provider.sandbox.config import S3_ACCESS_KEY_ID, region_of
from cliniko_provider.sandbox.core import Sandbox
from cliniko_provider.sandbox.multipart import MultipartError, MultipartReader, PartHeaders, boundary_of
from cliniko_provider.sandbox.s3_policy import (
    Policy,
    S3Error,
    check_form,
    check_size,
    missing_field,
    substitute_filename,
    too_large,
)
from cliniko_provider.sandbox.store import StoredObject, utc_now_iso

log = logging.getLogger("cliniko_provider.sandbox.s3")

MAX_PRE_DATA = 20 * 1024
XML = "application/xml"


class ConnectionCut(Exception):
    """The connection was aborted on purpose (fault injection); nobody will read an answer."""


def xml_error(error: S3Error, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error.xml(), status_code=error.status, media_type=XML, headers=headers)


def malformed(reason: str) -> S3Error:
    log.info("malformed POST: %s", reason)
    return S3Error(
        400, "MalformedPOSTRequest", "The body of your POST request is not well-formed multipart/form-data."
    )


class Upload:
    """One POST to a bucket, from the first body byte to the stored object."""

    def __init__(self, sandbox: Sandbox, request: Request, bucket: str, content_length: int) -> None:
        self.sandbox = sandbox
        self.request = request
        self.bucket = bucket
        self.content_length = content_length
        self.cut_after = sandbox.settings.s3_reset_after_bytes
        sandbox.settings.s3_reset_after_bytes = None  # one-shot
        self.corrupt = sandbox.settings.corrupt_s3_objects > 0
        if self.corrupt:
            sandbox.settings.corrupt_s3_objects -= 1
        self.received = 0

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.request.stream():
            self.received += len(chunk)
            self.sandbox.stats.bytes_received += len(chunk)
            if self.cut_after is not None and self.received >= self.cut_after:
                client = self.request.client
                transport = self.sandbox.transports.get((client.host, client.port)) if client else None
                if transport is not None:
                    transport.abort()
                raise ConnectionCut
            yield chunk

    async def _read_fields(self, reader: MultipartReader) -> tuple[dict[str, str], PartHeaders]:
        """The fields before the file, and the file part's headers."""
        fields: dict[str, str] = {}
        while (part := await reader.next_part()) is not None:
            _check_pre_data(reader)
            name = part.name.lower()
            if name == "file":
                return fields, part
            value = bytearray()
            async for data in reader.read_data():
                value += data
                _check_pre_data(reader)
            if name in fields:
                raise malformed(f"field {name!r} given twice")
            fields[name] = value.decode("utf-8", "replace")
        raise missing_field("key") if "key" not in fields else missing_field("file")

    async def _write_file(self, reader: MultipartReader, sink: BinaryIO, policy: Policy) -> tuple[int, str]:
        md5 = hashlib.md5()
        size = 0
        maximum = policy.size_range[1]
        data_start = reader.position
        flip = self.corrupt
        async for data in reader.read_data():
            if flip and data:
                data, flip = bytes([data[0] ^ 0xFF]) + data[1:], False
                self.sandbox.stats.corrupted["s3_objects"] += 1
            size += len(data)
            if size > maximum:
                # Say no before the whole body arrives, as S3 does; the size is the one proposed.
                proposed = self.content_length - data_start - len(reader.closing_delimiter)
                raise too_large(max(proposed, size), maximum)
            md5.update(data)
            sink.write(data)
        return size, md5.hexdigest()

    async def run(self, boundary: bytes) -> Response:
        store = self.sandbox.store
        reader = MultipartReader(self._chunks(), boundary)
        fields, file_part = await self._read_fields(reader)
        fields = substitute_filename(fields, file_part.filename or "")
        policy = check_form(
            fields,
            bucket=self.bucket,
            bucket_region=region_of(self.sandbox.buckets[self.bucket]),
            access_key=S3_ACCESS_KEY_ID,
            secret_key=store.s3_secret_key,
            now=datetime.now(timezone.utc),
        )
        path = store.new_object_file()
        try:
            with path.open("wb") as sink:
                size, md5 = await self._write_file(reader, sink, policy)
            while (part := await reader.next_part()) is not None:
                if part.name.lower() == "file":
                    raise S3Error(
                        400,
                        "IncorrectNumberOfFilesInPostRequest",
                        "POST requires exactly one file upload per request.",
                    )
            check_size(size, policy)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self._stored(fields, path, size, md5)

    def _stored(self, fields: dict[str, str], path: Path, size: int, md5: str) -> Response:
        store = self.sandbox.store
        key = fields["key"]
        etag = f'"{md5}"'
        relative = str(path.relative_to(store.data_dir))
        store.put_object(StoredObject(self.bucket, key, relative, size, etag, utc_now_iso()))
        self.sandbox.stats.uploads += 1
        location = f"{bucket_url(self.request, self.bucket)}{quote(key, safe='')}"
        headers = {"ETag": etag, "Location": location}
        status = fields.get("success_action_status")
        if status == "201":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<PostResponse><Location>{escape(location)}</Location><Bucket>{escape(self.bucket)}</Bucket>"
                f"<Key>{escape(key)}</Key><ETag>{escape(etag)}</ETag></PostResponse>"
            )
            return Response(body, status_code=201, media_type=XML, headers=headers)
        return Response(status_code=200 if status == "200" else 204, headers=headers)


def _check_pre_data(reader: MultipartReader) -> None:
    if reader.position > MAX_PRE_DATA:
        raise S3Error(
            400,
            "MaxPostPreDataLengthExceededError",
            "Your POST request fields preceeding the upload file was too large.",
            {"MaxPostPreDataLength": MAX_PRE_DATA},
        )


def bucket_url(request: Request, bucket: str) -> str:
    return f"{request.base_url}s3/{bucket}/"


async def post_object(sandbox: Sandbox, request: Request) -> Response:
    """`POST /s3/{bucket}/`: an upload through a presigned post."""
    bucket = request.path_params["bucket"]
    if bucket not in sandbox.buckets:
        return xml_error(
            S3Error(404, "NoSuchBucket", "The specified bucket does not exist", {"BucketName": bucket})
        )
    length = request.headers.get("content-length")
    if length is None or "chunked" in request.headers.get("transfer-encoding", "").lower():
        return xml_error(
            S3Error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
        )
    boundary = boundary_of(request.headers.get("content-type", ""))
    if boundary is None:
        return xml_error(malformed("not multipart/form-data with a boundary"))
    upload = Upload(sandbox, request, bucket, int(length))
    try:
        return await upload.run(boundary)
    except S3Error as error:
        log.info("upload refused: %s %s", error.code, error.message)
        return xml_error(error)
    except MultipartError as error:
        return xml_error(malformed(str(error)))
    except (ConnectionCut, ClientDisconnect):
        log.info("upload connection closed after %d bytes", upload.received)
        return Response(status_code=400)
