"""Benchmark: 8 files streamed at once by one process (as a batch task does), against 8 ``curl -F``.

Ours is ``ClinikoHook.upload_file`` on 8 threads of one process, each upload hashing MD5 and SHA-256 as it
streams and checking S3's ETag; curl is 8 processes started together, the upload guide's command. The
table shows the median wall time of each (the sandbox's one S3 endpoint serves both), their throughput
ratio (target >= 0.95) and our client's CPU per GiB.

Run: ``.venv/bin/python -m tests.bench.bench_streams [--streams 8] [--mib 128] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.bench.bench_upload import API_KEY, USER_AGENT, MiB, cpu_seconds, write_file


def curl_upload(presign: dict[str, Any], path: Path) -> subprocess.Popen[bytes]:
    """Start the upload guide's ``curl -F`` for one file; its output is the HTTP status."""
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", presign["url"]]
    for name, value in presign["fields"].items():
        command += ["--form-string", f"{name}={value}"]
    command += ["-F", f"file=@{path};filename={path.name}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE)


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from cliniko_provider.sandbox.process import SandboxProcess

    with tempfile.TemporaryDirectory(prefix="cliniko-bench-streams-") as temp:
        work = Path(temp)
        sandbox_args = ("--api-key", API_KEY, "--processing-delay", "0", "--rate-limit", "100000/60")
        with SandboxProcess(*sandbox_args, data_dir=work / "sandbox") as sandbox:
            extra = {"user_agent": USER_AGENT, "requests_per_minute": 100_000}
            connection = {
                "conn_type": "cliniko",
                "password": API_KEY,
                "host": sandbox.base_url,
                "extra": extra,
            }
            os.environ["AIRFLOW_CONN_CLINIKO_DEFAULT"] = json.dumps(connection)
            os.environ["AIRFLOW_HOME"] = str(work / "airflow")
            from cliniko_provider.hooks.cliniko import ClinikoHook
            from cliniko_provider.utils.upload import resolve_source

            hook = ClinikoHook()
            patient = hook.create_patient("Bench", "Streams")["id"]
            paths = [work / f"stream-{number}.bin" for number in range(args.streams)]
            for path in paths:
                write_file(path, args.mib * MiB)
            presigns = [hook.get_json(f"/patients/{patient}/attachment_presigned_post") for _ in paths]
            sources = [resolve_source(str(path)) for path in paths]

            def ours(number: int) -> None:
                source = sources[number]
                stored = hook.upload_file(
                    presigns[number], source.opener, source.size, source.name, progress=lambda sent: None
                )
                assert stored.etag_verified, "S3's ETag was not checked against the MD5 streamed"

            times: dict[str, list[float]] = {"ours": [], "curl": [], "cpu": []}
            for round_number in range(args.rounds):
                for who in ("ours", "curl") if round_number % 2 == 0 else ("curl", "ours"):
                    started, cpu = time.perf_counter(), cpu_seconds()
                    if who == "ours":
                        with ThreadPoolExecutor(args.streams) as pool:
                            list(pool.map(ours, range(args.streams)))
                        times["cpu"].append(cpu_seconds() - cpu)
                    else:
                        answers = [process.communicate()[0] for process in map(curl_upload, presigns, paths)]
                        assert all(answer == b"201" for answer in answers), answers
                    times[who].append(time.perf_counter() - started)

    gib = args.streams * args.mib / 1024
    ours_s, curl_s = statistics.median(times["ours"]), statistics.median(times["curl"])
    print(f"{args.streams} streams of {args.mib} MiB at once, median of {args.rounds} rounds:")
    print(f"  ours (one process, {args.streams} threads, MD5 + SHA-256 + ETag check): {ours_s:.2f} s")
    print(f"  {args.streams} curl -F processes: {curl_s:.2f} s")
    print(f"  throughput ours/curl: {curl_s / ours_s:.2f} (target >= 0.95)")
    print(f"  our client's CPU: {statistics.median(times['cpu']) / gib:.2f} s per GiB")


if __name__ == "__main__":
    main()
