"""Benchmark: 8 files streamed at once by one process (as a batch task does), against 8 ``curl -F``.

Ours is ``ClinikoHook.upload_file`` on 8 threads of one process, each upload hashing MD5 and SHA-256 as it
streams and checking S3's ETag; curl is 8 processes started together, the upload guide's command. The
table shows the median wall time of each (the sandbox's one S3 endpoint serves both), their throughput
ratio per round (median, min, max; target >= 0.95), and the CPU per GiB of each side's client and of
the sandbox serving it: on a small machine the sandbox (one Python process, which MD5s what it
receives) shares the cores with the client, so what our client spends hashing is taken from it, while
curl spends almost nothing. The same files and presigns serve both sides; which side goes first
alternates per round. ``--pin`` runs the sandbox on CPU 0 and both clients on the other CPUs, as if
S3 were another machine (it needs 2 CPUs or more, and a quiet machine to mean anything).

Run: ``.venv/bin/python -m tests.bench.bench_streams [--streams 8] [--mib 128] [--rounds 5] [--pin]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the sandbox on CPU 0 and both clients on the others (as if S3 were another machine)",
    )
    args = parser.parse_args()
    load = os.getloadavg()[0]

    from cliniko_provider.sandbox.process import SandboxProcess

    with tempfile.TemporaryDirectory(prefix="cliniko-bench-streams-") as temp:
        work = Path(temp)
        sandbox_args = ("--api-key", API_KEY, "--processing-delay", "0", "--rate-limit", "100000/60")
        with SandboxProcess(*sandbox_args, data_dir=work / "sandbox") as sandbox:
            if args.pin:
                cpus = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(sandbox.pid, cpus[:1])
                os.sched_setaffinity(0, cpus[1:])  # threads and curl processes started later inherit it
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

            measured = measure(
                args.rounds, args.streams, sandbox.pid, ours, lambda: curl_all(presigns, paths)
            )

    report(measured, args.streams, args.mib, load)


def curl_all(presigns: list[dict[str, Any]], paths: list[Path]) -> None:
    """Run the ``curl -F`` uploads of every file at once, as separate processes; wait for all."""
    answers = [process.communicate()[0] for process in map(curl_upload, presigns, paths)]
    assert all(answer == b"201" for answer in answers), answers


def measure(
    rounds: int, streams: int, sandbox_pid: int, ours: Callable[[int], None], curl: Callable[[], None]
) -> dict[str, list[float]]:
    """Upload every file with each side, ``rounds`` times, the side going first alternating per round.

    :return: per side, the wall times, the client's CPU (ours: this process; curl: its processes) and
        the sandbox's CPU, one value a round.
    """
    measured: dict[str, list[float]] = {
        f"{what} {who}": [] for what in ("wall", "client", "sandbox") for who in ("ours", "curl")
    }
    for round_number in range(rounds):
        for who in ("ours", "curl") if round_number % 2 == 0 else ("curl", "ours"):
            own = cpu_seconds() if who == "ours" else children_cpu_seconds()
            served, started = process_cpu(sandbox_pid), time.perf_counter()
            if who == "ours":
                with ThreadPoolExecutor(streams) as pool:
                    list(pool.map(ours, range(streams)))
            else:
                curl()
            measured[f"wall {who}"].append(time.perf_counter() - started)
            measured[f"sandbox {who}"].append(process_cpu(sandbox_pid) - served)
            after = cpu_seconds() if who == "ours" else children_cpu_seconds()
            measured[f"client {who}"].append(after - own)
        ratio = measured["wall curl"][-1] / measured["wall ours"][-1]
        print(f"  round {round_number + 1}: ours/curl {ratio:.2f}", file=sys.stderr, flush=True)
    return measured


def report(measured: dict[str, list[float]], streams: int, mib: int, load_before: float) -> None:
    """Print the figures: medians, the spread of the per-round ratio, CPU per GiB of each process."""
    gib = streams * mib / 1024
    ratios = [curl / ours for ours, curl in zip(measured["wall ours"], measured["wall curl"], strict=True)]
    rounds = len(ratios)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    print(f"{streams} streams of {mib} MiB at once, median of {rounds} rounds ({load}):")
    print(f"  ours (one process, {streams} threads, MD5 + SHA-256 + ETag check): ", end="")
    print(f"{statistics.median(measured['wall ours']):.2f} s")
    print(f"  {streams} curl -F processes: {statistics.median(measured['wall curl']):.2f} s")
    print(
        f"  throughput ours/curl per round: median {statistics.median(ratios):.2f}, "
        f"min {min(ratios):.2f}, max {max(ratios):.2f} (target >= 0.95)"
    )
    for who in ("ours", "curl"):
        client = statistics.median(measured[f"client {who}"]) / gib
        sandbox = statistics.median(measured[f"sandbox {who}"]) / gib
        print(f"  CPU per GiB, {who}: client {client:.2f} s, sandbox {sandbox:.2f} s")


def children_cpu_seconds() -> float:
    """The CPU time (user + system) of this process's waited-for children so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """Another process's CPU time so far (user + system, from ``/proc``), in seconds; 0 where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
