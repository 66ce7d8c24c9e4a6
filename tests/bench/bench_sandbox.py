"""Benchmark the sandbox: server memory during a 1 GiB upload, upload speed, small-request rate.

Run: `.venv/bin/python -m tests.bench.bench_sandbox` (about a minute; needs curl and ~2 GiB of disk).
The upload uses a real presign and `curl -F` exactly as Cliniko's guide does; the server's RSS
is sampled from /proc/<pid>/status while it receives the file.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from cliniko_provider.sandbox.process import SandboxProcess

API_KEY = "sandbox-bench-key-au1"
USER_AGENT = "Sandbox bench (bench@example.com)"
UPLOAD_BYTES = 1024**3
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
        with SandboxProcess(*args, data_dir=work_dir / "data") as sandbox:
            patient = call(sandbox, "POST", "/patients", {"first_name": "Bench", "last_name": "Mark"})
            patient_id = str(patient["id"])
            bench_upload(sandbox, patient_id, work_dir)
            for threads in (1, 4):
                bench_requests(sandbox, patient_id, threads)


if __name__ == "__main__":
    main()
