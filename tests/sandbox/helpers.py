"""Helpers for the sandbox tests: an API client, hand-built multipart bodies, control calls."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from cliniko_provider.sandbox.process import SandboxProcess

USER_AGENT = "Sandbox tests (tests@example.com)"
KEY_AU = "sandbox-au-test-key-au1"
KEY_UK = "sandbox-uk-test-key-uk1"
# Fast processing and no rate limit, so tests that do not test those are quick.
FAST_ARGS = ("--processing-delay", "0.3", "--processing-delay-per-mb", "0", "--rate-limit", "100000/60")


class Client:
    """requests with the sandbox's base URL, a key and a User-Agent."""

    def __init__(self, sandbox: SandboxProcess, api_key: str) -> None:
        self.sandbox = sandbox
        self.session = requests.Session()
        self.session.auth = (api_key, "")
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json"

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.sandbox.base_url}{path}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url(path), timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.post(self.url(path), timeout=30, **kwargs)

    def delete(self, path: str) -> requests.Response:
        return self.session.delete(self.url(path), timeout=30)

    def create_patient(self, **fields: Any) -> dict[str, Any]:
        body = {"first_name": "Ada", "last_name": f"Test-{uuid.uuid4().hex[:8]}", **fields}
        response = self.post("/patients", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def presign(self, patient_id: str) -> dict[str, Any]:
        response = self.get(f"/patients/{patient_id}/attachment_presigned_post")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def upload(
        self, patient_id: str, data: bytes, filename: str = "report.pdf"
    ) -> tuple[dict[str, Any], str]:
        """Presign and upload; returns the presign and the `upload_url` (url + Key)."""
        post = self.presign(patient_id)
        response = s3_post(post["url"], form_parts(post["fields"], file=(filename, data)))
        assert response.status_code == 201, response.text
        return post, post["url"] + xml_value(response.text, "Key")

    def attach(
        self, patient_id: str, data: bytes, filename: str = "report.pdf", **body: Any
    ) -> dict[str, Any]:
        _, upload_url = self.upload(patient_id, data, filename)
        response = self.post(
            "/patient_attachments", json={"patient_id": patient_id, "upload_url": upload_url, **body}
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def wait_processed(self, attachment_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = dict(self.get(f"/patient_attachments/{attachment_id}").json())
            if record["processing_completed"]:
                return record
            time.sleep(0.05)
        raise AssertionError(f"attachment {attachment_id} not processed after {timeout}s")


@dataclass
class Part:
    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None


def form_parts(
    fields: dict[str, str], file: tuple[str, bytes] | None = None, extra: dict[str, str] | None = None
) -> list[Part]:
    parts = [Part(name, value.encode()) for name, value in {**fields, **(extra or {})}.items()]
    if file is not None:
        parts.append(Part("file", file[1], file[0], "application/octet-stream"))
    return parts


def encode_multipart(parts: list[Part], boundary: str = "sandbox-test-boundary") -> tuple[bytes, str]:
    body = bytearray()
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if part.content_type:
            body += f"Content-Type: {part.content_type}\r\n".encode()
        body += b"\r\n" + part.value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def s3_post(url: str, parts: list[Part], **kwargs: Any) -> requests.Response:
    body, content_type = encode_multipart(parts)
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30, **kwargs)


def xml_value(xml: str, element: str) -> str:
    match = re.search(f"<{element}>(.*?)</{element}>", xml, re.DOTALL)
    assert match, f"no <{element}> in {xml}"
    return match[1].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")


def decode_policy(policy: str) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(policy)))


def set_faults(sandbox: SandboxProcess, **changes: Any) -> dict[str, Any]:
    response = requests.post(f"{sandbox.root_url}/_sandbox/faults", json=changes, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def stats(sandbox: SandboxProcess) -> dict[str, Any]:
    return dict(requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json())


def query_store(data_dir: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one SQL statement on a sandbox's database (`sandbox.db`) and return its rows."""
    with sqlite3.connect(data_dir / "sandbox.db") as db:
        rows = db.execute(sql, params).fetchall()
    db.close()
    return rows


def store_secret(data_dir: Path) -> str:
    """The S3 signing secret a sandbox keeps in its database."""
    return str(query_store(data_dir, "SELECT value FROM meta WHERE name = 's3_secret_key'")[0][0])
