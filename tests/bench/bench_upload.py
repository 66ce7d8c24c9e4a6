"""Benchmark: our streamed S3 upload (``ClinikoHook.upload_file``) against ``curl -F`` on the sandbox.

Ours is the operators' S3 step as it runs: MD5 and SHA-256 computed while streaming, S3's ETag checked.

For each size (1 MiB as the memory baseline, 10 MiB, 256 MiB, 1 GiB) the same file is POSTed with the
same presign fields, alternating ours and curl (the upload guide's ``curl -F`` command), and the table
shows the median transfer time of each, their ratio (target <= 1.10) and our client's peak RSS (target:
flat, within 32 MiB of the 1 MiB upload). Each size runs in a fresh subprocess, so its peak RSS
(``VmHWM``) belongs to that size alone; curl runs from it as its own process. Times are the transfer
only (our ``upload_file`` call; curl's ``time_total``), not process start-up.

Run: ``make bench`` or ``.venv/bin/python -m tests.bench.bench_upload`` (about 2-4 minutes).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
# (bytes, rounds): 1 MiB is the memory baseline; the others are the sizes the target is about.
SIZES = ((1 * MiB, 9), (10 * MiB, 9), (256 * MiB, 3), (1024 * MiB, 2))
API_KEY = "bench-key-au1"
USER_AGENT = "Cliniko Provider Bench (bench@cliniko-provider.example)"
REPO = Path(__file__).resolve().parents[2]
RESULT = "BENCH-RESULT "


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child(presign_file: str, file_path: str, rounds: str) -> None:
    """Upload one file ``rounds`` times each through ``ClinikoHook.upload_file`` and curl, alternating.

    Prints the transfer times and this process's peak RSS as JSON (curl runs as its own process, so
    its memory is not counted here).
    """
    from cliniko_provider.hooks.cliniko import ClinikoHook
    from cliniko_provider.utils.upload import resolve_source

    presign = json.loads(Path(presign_file).read_text())
    hook = ClinikoHook()
    source = resolve_source(file_path)
    hook.s3_session  # noqa: B018 - set up before measuring
    before = peak_rss_kib()
    times: dict[str, list[float]] = {"ours": [], "curl": []}
    for round_number in range(int(rounds)):
        order = ("ours", "curl") if round_number % 2 == 0 else ("curl", "ours")
        for who in order:
            if who == "curl":
                times["curl"].append(run_curl(presign, Path(file_path), source.name))
                continue
            started, cpu = time.perf_counter(), cpu_seconds()
            stored = hook.upload_file(
                presign, source.opener, source.size, source.name, progress=lambda sent: None
            )
            times["ours"].append(time.perf_counter() - started)
            times.setdefault("cpu", []).append(cpu_seconds() - cpu)
            assert stored.etag_verified, "S3's ETag was not checked against the MD5 streamed"
    print(RESULT + json.dumps({**times, "peak_kib": peak_rss_kib(), "before_kib": before}))


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(env: dict[str, str], presign_file: Path, file_path: Path, rounds: int) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; return its result."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.bench_upload",
            "child",
            str(presign_file),
            str(file_path),
            str(rounds),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            result: dict[str, Any] = json.loads(line.removeprefix(RESULT))
            return result
    raise RuntimeError(
        f"the upload child failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )


def run_curl(presign: dict[str, Any], file_path: Path, filename: str) -> float:
    """The upload guide's ``curl -F`` command (fields as literal strings); return curl's transfer time."""
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", presign["url"]]
    for name, value in presign["fields"].items():
        command += ["--form-string", f"{name}={value}"]
    command += ["-F", f"file=@{file_path};filename={filename}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    status, _, seconds = done.stdout.partition(" ")
    if status != "201":
        raise RuntimeError(f"curl upload failed: {done.stdout} {done.stderr}")
    return float(seconds)


def write_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as handle:
        for _ in range(size // MiB):
            handle.write(block)
        handle.write(block[: size % MiB])


def main() -> None:
    """Run the benchmark and print the table."""
    from cliniko_provider.sandbox.process import SandboxProcess

    rows = []
    with tempfile.TemporaryDirectory(prefix="cliniko-bench-") as temp:
        work = Path(temp)
        args = ("--api-key", API_KEY, "--processing-delay", "0", "--rate-limit", "100000/60")
        with SandboxProcess(*args, data_dir=work / "sandbox") as sandbox:
            env = {
                **os.environ,
                "AIRFLOW_CONN_CLINIKO_DEFAULT": json.dumps(
                    {
                        "conn_type": "cliniko",
                        "password": API_KEY,
                        "host": sandbox.base_url,
                        "extra": {"user_agent": USER_AGENT},
                    }
                ),
                "AIRFLOW_HOME": str(work / "airflow"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            }
            os.environ.update({name: env[name] for name in ("AIRFLOW_CONN_CLINIKO_DEFAULT", "AIRFLOW_HOME")})
            from cliniko_provider.hooks.cliniko import ClinikoHook

            hook = ClinikoHook()
            patient = hook.create_patient("Bench", "Mark")["id"]
            for size, rounds in SIZES:
                file_path = work / f"bench-{size // MiB}MiB.bin"
                write_file(file_path, size)
                # One presign and one name per size: every upload overwrites the same key, so the
                # sandbox keeps one copy on disk.
                presign = hook.get_presigned_post(patient)
                presign_file = work / "presign.json"
                presign_file.write_text(json.dumps(presign))
                result = run_child(env, presign_file, file_path, rounds)
                file_path.unlink()
                ours, curl = statistics.median(result["ours"]), statistics.median(result["curl"])
                cpu_per_gib = statistics.median(result["cpu"]) * 1024 * MiB / size
                rows.append((size, ours, curl, int(result["peak_kib"]), cpu_per_gib))
                print(f"  {size // MiB} MiB done", file=sys.stderr, flush=True)
    base_peak = rows[0][3]
    print()
    header = f"{'size':>9} {'ours s':>8} {'curl s':>8} {'ours/curl':>10} {'peak RSS MiB':>13} {'vs 1 MiB':>9}"
    print(header + f" {'CPU s/GiB':>10}")
    for size, ours_s, curl_s, peak, cpu_per_gib in rows:
        print(
            f"{size // MiB:>5} MiB {ours_s:>8.2f} {curl_s:>8.2f} {ours_s / curl_s:>10.2f} "
            f"{peak / 1024:>13.1f} {(peak - base_peak) / 1024:>+9.1f} {cpu_per_gib:>10.2f}"
        )
    print("targets: ours/curl <= 1.10 (medians of the transfer times); peak RSS within 32 MiB of 1 MiB's")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "child":
        child(*sys.argv[2:])
    else:
        main()
