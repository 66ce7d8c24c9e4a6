"""Benchmark the sandbox: write and filter cost as it fills, memory during a 1 GiB upload, request rate.

Run: `.venv/bin/python -m tests.bench.bench_sandbox` (about three minutes; needs curl and ~2 GiB of
disk). The store is filled through the API to 10,000 patients and 10,000 attachments; at 10, 1,000
and 10,000 records the median latency of single writes (create a patient; create an attachment from
an upload) and of the filters the provider uses is printed. The upload uses a real presign and
`curl -F` exactly as Cliniko's guide does; the server's RSS is sampled from /proc/<pid>/status
while it receives the file.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

from cliniko_provider.sandbox.process import SandboxProcess

API_KEY = "sandbox-bench-key-au1"
USER_AGENT = "Sandbox bench (bench@example.com)"
UPLOAD_BYTES = 1024**3
CHECKPOINTS = (10, 1_000, 10_000)
SAMPLES = 30
REQUEST_SECONDS = 5.0
MB = 1024 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, memory_kib(self.pid)["VmRSS"])
            time.sleep(self.interval)


def api_connection(sandbox: SandboxProcess) -> tuple[http.client.HTTPConnection, dict[str, str]]:
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode(),
    }
    return http.client.HTTPConnection(urlsplit(sandbox.base_url).netloc, timeout=60), headers


def call(sandbox: SandboxProcess, method: str, path: str, body: object = None) -> dict[str, object]:
    connection, headers = api_connection(sandbox)
    payload = json.dumps(body) if body is not None else None
    connection.request(method, f"/v1{path}", body=payload, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
    return dict(json.loads(data))


class Writer:
    """Creates patients and attachments through the API on one keep-alive connection."""

    def __init__(self, sandbox: SandboxProcess) -> None:
        self.connection, self.headers = api_connection(sandbox)
        self.s3 = http.client.HTTPConnection(urlsplit(sandbox.base_url).netloc, timeout=60)

    def request(self, method: str, path: str, body: object = None) -> tuple[dict[str, object], float]:
        payload = json.dumps(body) if body is not None else None
        started = time.perf_counter()
        self.connection.request(method, path, body=payload, headers=self.headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return dict(json.loads(data)), elapsed

    def filtered(self, path: str, *filters: str) -> float:
        """The median time of five identical list requests."""
        query = "&".join(f"q[]={quote(item, safe='')}" for item in filters)
        return statistics.median(self.request("GET", f"{path}?{query}")[1] for _ in range(5))

    def patient(self, number: int) -> tuple[str, float]:
        body = {
            "first_name": "Bench",
            "last_name": f"Patient {number}",
            "email": f"patient{number}@example.com",
            "old_reference_id": f"REF-{number}",
        }
        record, elapsed = self.request("POST", "/v1/patients", body)
        return str(record["id"]), elapsed

    def attachment(self, patient_id: str, number: int) -> float:
        """Presign and upload untimed; return the time of the write itself (the create)."""
        post, _ = self.request("GET", f"/v1/patients/{patient_id}/attachment_presigned_post")
        fields = post["fields"]
        assert isinstance(fields, dict)
        boundary = "bench-boundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="report-{number}.pdf"'
            f"\r\nContent-Type: application/pdf\r\n\r\n%PDF-1.4 {number}\r\n--{boundary}--\r\n"
        )
        body = "".join(parts).encode()
        url = urlsplit(str(post["url"]))
        self.s3.request(
            "POST", url.path, body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        answer = self.s3.getresponse()
        xml = answer.read().decode()
        match = re.search(r"<Key>(.*?)</Key>", xml)
        assert answer.status == 201 and match, xml
        key = match[1].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
        create = {
            "patient_id": patient_id,
            "upload_url": f"{post['url']}{key}",
            "description": f"Nightly report {number} [ref:{number:012x}]",
        }
        _, elapsed = self.request("POST", "/v1/patient_attachments", create)
        return elapsed


def bench_write_cost(sandbox: SandboxProcess) -> None:
    """Fill the store to each checkpoint (4 connections), then time single writes and filters."""
    writers = [Writer(sandbox) for _ in range(4)]
    patients: list[str] = []
    attachments = 0

    def fill(writer: Writer, numbers: range) -> None:
        for number in numbers:
            patient_id, _ = writer.patient(number)
            patients.append(patient_id)
            writer.attachment(patient_id, number)

    print(
        "records | write: patient  attachment | filter: old_reference_id  email  id:=  created_at  "
        "description:~  ~~worst"
    )
    for checkpoint in CHECKPOINTS:
        missing = checkpoint - len(patients)
        if missing > 0:
            start = len(patients)
            chunks = [range(start + i, start + missing, len(writers)) for i in range(len(writers))]
            with ThreadPoolExecutor(len(writers)) as pool:
                list(pool.map(fill, writers, chunks))
            attachments = len(patients)
        writer = writers[0]
        patient_times, attachment_times = [], []
        for sample in range(SAMPLES):
            number = 1_000_000 + checkpoint + sample
            patient_id, elapsed = writer.patient(number)
            patient_times.append(elapsed)
            attachment_times.append(writer.attachment(patient_id, number))

        def filtered(path: str, *filters: str) -> float:
            return writers[0].filtered(path, *filters)

        middle = patients[len(patients) // 2]
        worst = "%" + "a%" * 127
        figures = [
            filtered("/v1/patients", f"old_reference_id:=REF-{len(patients) // 2}"),
            filtered("/v1/patients", f"email:=patient{len(patients) // 2}@example.com"),
            filtered("/v1/patients", f"id:={middle}"),
            filtered("/v1/patient_attachments", "created_at:>2999-01-01T00:00:00Z"),
            filtered("/v1/patient_attachments", "description:~[ref:0000000003e8]"),
            filtered("/v1/patient_attachments", f"description:~~{worst}"),
        ]
        print(
            f"{checkpoint:>7,} | {statistics.median(patient_times) * 1000:12.2f} ms"
            f" {statistics.median(attachment_times) * 1000:8.2f} ms | "
            + "  ".join(f"{value * 1000:.2f} ms" for value in figures),
            flush=True,
        )
    print(f"(writes are medians of {SAMPLES}; filters of 5; {attachments:,} attachments at the end)")


def bench_upload(sandbox: SandboxProcess, patient_id: str, work_dir: Path) -> None:
    source = work_dir / "one-gib.bin"
    with source.open("wb") as handle:
        chunk = bytes(range(256)) * 4096  # 1 MiB, not all zeros
        for _ in range(UPLOAD_BYTES // len(chunk)):
            handle.write(chunk)
    post = call(sandbox, "GET", f"/patients/{patient_id}/attachment_presigned_post")
    fields = post["fields"]
    assert isinstance(fields, dict)
    form = [arg for name, value in fields.items() for arg in ("-F", f"{name}={value}")]
    before = memory_kib(sandbox.pid)
    sampler = RssSampler(sandbox.pid)
    sampler.start()
    started = time.monotonic()
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", str(post["url"]), *form, "-F", f"file=@{source}"],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    after = memory_kib(sandbox.pid)
    status = result.stdout.rsplit("\n", 1)[1]
    print(f"1 GiB upload, curl -F: HTTP {status} in {elapsed:.1f} s = {UPLOAD_BYTES / MB / elapsed:.0f} MB/s")
    print(
        f"server RSS: {before['VmRSS'] / 1024:.0f} MiB before, peak {sampler.peak_kib / 1024:.0f} MiB while"
        f" receiving (sampled every 50 ms), VmHWM {after['VmHWM'] / 1024:.0f} MiB"
    )
    source.unlink()


def bench_requests(sandbox: SandboxProcess, patient_id: str, threads: int) -> None:
    counts = [0] * threads
    deadline = time.monotonic() + REQUEST_SECONDS

    def worker(index: int) -> None:
        connection, headers = api_connection(sandbox)
        while time.monotonic() < deadline:
            connection.request("GET", f"/v1/patients/{patient_id}", headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
            counts[index] += 1
        connection.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    total = sum(counts)
    print(f"GET /v1/patients/{{id}}, {threads} keep-alive connection(s): {total / REQUEST_SECONDS:.0f} req/s")


def main() -> None:
    if shutil.which("curl") is None:
        raise SystemExit("curl is required")
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as work:
        work_dir = Path(work)
        args = ("--api-key", API_KEY, "--rate-limit", "100000000/60", "--processing-delay", "0")
        with SandboxProcess(*args, data_dir=work_dir / "store") as sandbox:
            bench_write_cost(sandbox)
        with SandboxProcess(*args, data_dir=work_dir / "data") as sandbox:
            patient = call(sandbox, "POST", "/patients", {"first_name": "Bench", "last_name": "Mark"})
            patient_id = str(patient["id"])
            bench_upload(sandbox, patient_id, work_dir)
            for threads in (1, 4):
                bench_requests(sandbox, patient_id, threads)


if __name__ == "__main__":
    main()
