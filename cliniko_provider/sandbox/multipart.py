"""A small streaming `multipart/form-data` reader over an async iterator of byte chunks.

Parts are read one at a time: `next_part()` gives a part's headers, `read_data()` yields its
body in chunks of at most the size that arrived, so memory stays flat whatever the file size.
`position` counts the body bytes consumed, which the S3 endpoint uses for its pre-data limit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024
_PARAM = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


@dataclass(frozen=True)
class PartHeaders:
    name: str
    filename: str | None
    content_type: str | None


def boundary_of(content_type: str) -> bytes | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for name, value in _PARAM.findall(";" + params):
        if name.lower() == "boundary":
            text = value[1:-1] if value.startswith('"') else value.strip()
            return text.encode("latin-1") if 0 < len(text) <= 200 else None
    return None


def _parse_headers(block: bytes) -> PartHeaders:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise MultipartError("part header without a colon")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition", "")
    kind, _, params = disposition.partition(";")
    if kind.strip().lower() != "form-data":
        raise MultipartError("part without Content-Disposition: form-data")
    values = {
        # Browsers send backslashes (Windows paths) unescaped: only `\"` is an escape here.
        key.lower(): (raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw.strip())
        for key, raw in _PARAM.findall(";" + params)
    }
    if "name" not in values:
        raise MultipartError("part without a name")
    return PartHeaders(values["name"], values.get("filename"), headers.get("content-type"))


class MultipartReader:
    """Reads the parts of one body in order; call `next_part()` until it returns None."""

    def __init__(self, chunks: AsyncIterator[bytes], boundary: bytes) -> None:
        self._chunks = chunks
        self._delimiter = b"\r\n--" + boundary
        self.closing_delimiter = self._delimiter + b"--\r\n"
        # A leading CRLF makes the first boundary look like all the others.
        self._buffer = bytearray(b"\r\n")
        self._eof = False
        self._in_data = False
        self._started = False
        self.position = -2  # body bytes consumed, not counting the CRLF added above

    async def _fill(self) -> None:
        if self._eof:
            raise MultipartError("body ended inside a part")
        async for chunk in self._chunks:
            if chunk:
                self._buffer += chunk
                return
        self._eof = True

    def _consume(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self.position += count
        return data

    async def read_data(self) -> AsyncIterator[bytes]:
        """The current part's body, chunk by chunk, up to the next boundary."""
        keep = len(self._delimiter) - 1
        while self._in_data:
            index = self._buffer.find(self._delimiter)
            if index >= 0:
                data = self._consume(index)
                self._consume(len(self._delimiter))
                self._in_data = False
            elif len(self._buffer) > keep:
                data = self._consume(len(self._buffer) - keep)
            else:
                data = b""
                await self._fill()
                continue
            if data:
                yield data
            if self._in_data and len(self._buffer) <= keep:
                await self._fill()

    async def next_part(self) -> PartHeaders | None:
        """Skip what is left of the current part and read the next one's headers."""
        if not self._started:
            self._started = True
            self._in_data = True  # anything before the first boundary is a preamble
        async for _ in self.read_data():
            pass
        while len(self._buffer) < 2:
            await self._fill()
        if self._buffer[:2] == b"--":
            return None
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise MultipartError("part headers too long")
            await self._fill()
        block = self._consume(end + 4)
        # After the boundary: optional white space, CRLF, then the header lines.
        padding, crlf, header_block = block.partition(b"\r\n")
        if not crlf or padding.strip(b" \t"):
            raise MultipartError("malformed boundary line")
        self._in_data = True
        return _parse_headers(header_block[:-4])
