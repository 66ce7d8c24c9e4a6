"""Nothing lost, nothing duplicated: the upload under real faults, against the sandbox (slow).

Each scenario ends with exactly one processed attachment per report, or with a clear failure that left
nothing half-made, after which a re-run completes the job. Each records its counts (reports,
attachments, duplicates, lost) for ``tests/reports/fault_scenarios.md``. Scenario 5 and the secrets
check, which need a real Airflow deployment, are in ``test_stack.py``.

Where a scenario runs the operator in this process, it runs it as Airflow would run one mapped task of
the nightly DAG: the same task context across tries, ``look_for_existing="on_retry"``, and the DAG's
``retries=2`` (three tries); an ``AirflowFailException`` ends the tries at once, as in Airflow.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException, AirflowSensorTimeout

from cliniko_provider.exceptions import ClinikoStorageLimitError, S3UploadRejectedError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from tests.faults.conftest import (
    assert_one_processed_each,
    finish_scenario,
    new_patients,
    pretty,
    reset_stats,
    run_upload,
    sandbox_stats,
    scaled_sleep,
    set_faults,
    subprocess_env,
    task_context,
    use_sandbox,
)
from tests.helpers import write_file

pytestmark = pytest.mark.slow

JsonDict = dict[str, Any]
NIGHTLY_TRIES = 3  # the nightly DAG's retries=2
WAIT = {"wait_for_completion": True, "deferrable": False, "poll_interval": 0.2, "timeout": 60}
PRESIGN_ROUTE = "GET /v1/patients/{id}/attachment_presigned_post"
S3_ROUTE = "POST /s3/{bucket}/"
CREATE_ROUTE = "POST /v1/patient_attachments"


@dataclass
class TaskResult:
    """How one report's task went: its record, or the errors of its failed tries."""

    record: JsonDict | None = None
    errors: list[str] = field(default_factory=list)
    tries: int = 0


def run_like_a_task(
    one_try: Callable[[int], JsonDict], tries: int = NIGHTLY_TRIES, first_try: int = 1
) -> TaskResult:
    """Run tries until one succeeds, the tries run out, or a try fails with AirflowFailException.

    :param one_try: runs the operator once, given the try number.
    :param tries: tries in all.
    :param first_try: the first try's number (a re-run continues the numbering, as a clear does).
    """
    result = TaskResult()
    for number in range(first_try, first_try + tries):
        result.tries += 1
        try:
            result.record = one_try(number)
            return result
        except AirflowException as error:
            result.errors.append(f"{type(error).__name__}: {error}")
            if isinstance(error, AirflowFailException):
                return result
    return result


def report_files(directory: Path, count: int, size: int = 2000) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        write_file(directory, f"report-WH-{index:04d}.csv", size + index, seed=index)
        for index in range(count)
    ]


# --- 1. 30% 429s and 20% 5xx on API and S3, during a nightly run of 50 reports --------------------------


def test_1_throttles_and_server_errors_on_every_call(
    start_sandbox: Callable[..., SandboxProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = 50
    sandbox = start_sandbox("--processing-delay", "0.2", "--seed", "7")
    # An API call fails an attempt on 5xx only (20%): 14 attempts leave one in 10**10 failing. An S3 POST
    # fails one on 5xx and on 503 SlowDown, S3's throttling (20% + 30%): half its attempts; 8 attempts
    # left one upload in 256 failing (about one run in five lost a file), 14 leave one in 16,384.
    use_sandbox(monkeypatch, sandbox, requests_per_minute=100000, max_attempts=14)
    setup = ClinikoHook()
    patients = new_patients(setup, reports)
    files = report_files(tmp_path / "reports", reports)
    set_faults(sandbox, throttle_rate=0.3, fail_rate=0.2)
    reset_stats(sandbox)

    def report_task(index: int) -> TaskResult:
        def one_try(number: int) -> JsonDict:
            hook = ClinikoHook(sleep=scaled_sleep(0.02))  # a 429's wait for its reset, made short
            return run_upload(
                hook,
                task_context(try_number=number, task_id=f"upload_report_{index}"),
                patients[index],
                files[index],
                description=f"Nightly report 2026-11-20 (WH-{index:04d})",
                **WAIT,
            )

        return run_like_a_task(one_try, tries=1)  # no task retries: the request plane absorbs the faults

    with ThreadPoolExecutor(4) as pool:  # the nightly DAG's pool cliniko_api has 4 slots
        results = list(pool.map(report_task, range(reports)))
    failed = [index for index, result in enumerate(results) if result.record is None]
    stats = sandbox_stats(sandbox)
    set_faults(sandbox, throttle_rate=0, fail_rate=0)

    found, counts = finish_scenario(
        setup,
        patients,
        1,
        "30% of calls 429, 20% 5xx (API and S3), nightly run of 50 reports, 4 at a time",
        f"all attached once and processed; {stats['injected_throttles']} 429s and "
        f"{stats['injected_failures']} 5xx injected in {stats['requests_total']} requests; "
        f"no task retries (each task had one try), {len(failed)} failed; "
        f"{stats['temp_objects']} orphan temp S3 object(s), never a record",
    )
    assert all(result.record is not None for result in results), [r.errors for r in results if r.errors]
    assert_one_processed_each(found, setup)
    assert counts == (reports, reports, 0, 0)
    assert stats["injected_throttles"] > 0 and stats["injected_failures"] > 0
    assert stats["requests_by_route"][S3_ROUTE] > stats["uploads"] >= reports  # S3 calls were hit too


# --- 2. A connection reset in the middle of an S3 upload -------------------------------------------------


def test_2_connection_reset_mid_upload(
    start_sandbox: Callable[..., SandboxProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = start_sandbox("--processing-delay", "0.1")
    use_sandbox(monkeypatch, sandbox)
    hook = ClinikoHook(sleep=scaled_sleep(0.1))
    patients = new_patients(hook, 3)
    files = report_files(tmp_path / "reports", 3, size=2 * 1024 * 1024)
    reset_stats(sandbox)
    for patient, path in zip(patients, files, strict=True):
        cut = set_faults(sandbox, s3_reset_after_bytes=512 * 1024)
        assert cut["s3_reset_after_bytes"] == 512 * 1024
        run_upload(hook, task_context(), patient, path, **WAIT)
        assert set_faults(sandbox)["s3_reset_after_bytes"] is None  # the cut happened
    stats = sandbox_stats(sandbox)
    found, counts = finish_scenario(
        hook,
        patients,
        2,
        "connection reset after 512 KiB of a 2 MiB S3 upload (3 reports)",
        f"each upload retried within the task and attached once, content intact; "
        f"{stats['requests_by_route'][S3_ROUTE]} S3 POSTs for {stats['uploads']} stored objects",
    )
    assert_one_processed_each(found, hook)
    for path, records in zip(files, found.values(), strict=True):
        content = hook.request("GET", f"/patient_attachments/{records[0]['id']}/content").content
        assert content == path.read_bytes()
    assert stats["requests_by_route"][S3_ROUTE] == 6 and stats["uploads"] == 3
    assert counts == (3, 3, 0, 0)


# --- 3. The presign expires before the upload finishes ------------------------------------------------


class SlowFile(io.RawIOBase):
    """A file object that reads at about ``rate`` bytes a second (a slow object store)."""

    def __init__(self, data: bytes, rate: float) -> None:
        self._data = io.BytesIO(data)
        self._rate = rate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 256 * 1024))
        time.sleep(len(chunk) / self._rate)
        buffer[: len(chunk)] = chunk
        return len(chunk)


def slow_store(monkeypatch: pytest.MonkeyPatch, rate: float) -> str:
    """Attach a ``slow://`` object store (memory-backed, reads at ``rate`` B/s); return its scheme."""
    import fsspec
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    class SlowFileSystem(MemoryFileSystem):  # type: ignore[misc]
        protocol = "slow"
        store: dict[str, Any] = {}
        pseudo_dirs = [""]

        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            handle = super()._open(path, mode, **kwargs)
            if "r" not in mode:
                return handle
            return io.BufferedReader(SlowFile(handle.read(), rate))

    fsspec.register_implementation("slow", SlowFileSystem, clobber=True)
    attach("slow", fs=SlowFileSystem())
    return "slow"


def test_3_presign_expires_before_the_upload_finishes(
    start_sandbox: Callable[..., SandboxProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox, like S3, checks the policy when the form arrives: an upload that outlives its 1 s
    presign is refused when it is retried (here after a reset) and must start again on a fresh presign.
    With a presign already expired on arrival every time, the task fails clearly and makes nothing."""
    from airflow.sdk import ObjectStoragePath

    sandbox = start_sandbox("--processing-delay", "0.1", "--presign-ttl", "1")
    use_sandbox(monkeypatch, sandbox)
    hook = ClinikoHook(sleep=scaled_sleep(1.0))
    slow, expired = new_patients(hook, 2)
    data = bytes(range(256)) * 6 * 1024  # 1.5 MiB, read at 1 MiB/s
    source = f"{slow_store(monkeypatch, 1024 * 1024)}://exports/slow report.csv"
    ObjectStoragePath(source).write_bytes(data)

    reset_stats(sandbox)
    set_faults(sandbox, s3_reset_after_bytes=1024 * 1024)  # cut after ~1 s, when the presign has expired
    record = run_upload(hook, task_context(), slow, source, **WAIT)
    renewed = sandbox_stats(sandbox)["requests_by_route"][PRESIGN_ROUTE]
    assert record["size"] == len(data)
    assert hook.request("GET", f"/patient_attachments/{record['id']}/content").content == data
    assert renewed >= 2  # the expired presign was replaced

    set_faults(sandbox, presign_ttl=0)  # every presign arrives expired: a clear failure, nothing made
    path = ObjectStoragePath("slow://exports/other.csv")
    path.write_bytes(b"date,value\n2026-11-20,1\n")
    context = task_context()
    with pytest.raises(S3UploadRejectedError, match=r"403 AccessDenied.*expired") as failure:
        run_upload(hook, context, expired, str(path), **WAIT)
    assert isinstance(failure.value, AirflowFailException)
    stats = sandbox_stats(sandbox)
    assert stats["attachments"] == 1 and stats["temp_objects"] == 0  # nothing half-made
    set_faults(sandbox, presign_ttl=900)
    run_upload(hook, task_context(try_number=2), expired, str(path), **WAIT)  # the re-run

    found, counts = finish_scenario(
        hook,
        [slow, expired],
        3,
        "presign of 1 s outlived by a slow (1 MiB/s) object-store source; presign expired on arrival",
        f"slow upload: fresh presign fetched ({renewed} presigns), attached once; always expired: "
        f"failed at once ({str(failure.value)[:80]}...), nothing made, re-run attached it",
    )
    assert_one_processed_each(found, hook)
    assert counts == (2, 2, 0, 0)


# --- 4. The worker SIGKILLed after the S3 upload, and after the create --------------------------------


def run_worker(args: JsonDict, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.faults.kill_worker", json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize("kill", ["after-upload", "after-create"])
def test_4_worker_killed_then_retried(
    start_sandbox: Callable[..., SandboxProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill: str,
) -> None:
    sandbox = start_sandbox("--processing-delay", "0.1")
    env = subprocess_env(AIRFLOW_CONN_CLINIKO_DEFAULT=use_sandbox(monkeypatch, sandbox))
    hook = ClinikoHook()
    (patient,) = new_patients(hook, 1)
    path = write_file(tmp_path, "report-WH-0001.csv", 5000)
    args = {"patient_id": patient, "file_path": str(path), "description": "Nightly report 2026-11-20"}

    killed = run_worker({**args, "try_number": 1, "kill": kill}, env)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
    after_kill = sandbox_stats(sandbox)
    assert after_kill["uploads"] == 1
    assert after_kill["attachments"] == (1 if kill == "after-create" else 0)

    # The retry runs on another machine (its own private journal, nothing recorded), as a Celery retry
    # may: it must recognise the earlier upload from Cliniko's records alone (description + content).
    other_machine = {**env, "CLINIKO_STATE_DIR": str(tmp_path / "machine-2")}
    retried = run_worker({**args, "try_number": 2, "kill": None}, other_machine)
    assert retried.returncode == 0, retried.stdout[-2000:] + retried.stderr[-3000:]
    again = run_worker({**args, "try_number": 3, "kill": None}, env)  # one more clear of the task
    assert again.returncode == 0, again.stderr[-3000:]
    records = [
        json.loads(line.removeprefix("RECORD "))
        for line in (retried.stdout + again.stdout).splitlines()
        if line.startswith("RECORD ")
    ]
    stats = sandbox_stats(sandbox)
    uploads_on_retry = stats["uploads"] - after_kill["uploads"]
    orphan = stats["temp_objects"]
    found, counts = finish_scenario(
        hook,
        [patient],
        4,
        f"worker SIGKILLed {kill.replace('-', ' ')} (real process, os.kill 9), then retried on another "
        "machine (empty journal) and cleared once more",
        f"retry {'uploaded again' if uploads_on_retry else 'found the record, no upload'}; "
        f"one attachment; {orphan} orphan temp S3 object(s) left by the killed try (never a record)",
    )
    assert len(records) == 2 and records[0]["id"] == records[1]["id"] == found[patient][0]["id"]
    assert found[patient][0]["description"] == "Nightly report 2026-11-20"  # exactly as given
    assert_one_processed_each(found, hook)
    assert uploads_on_retry == (0 if kill == "after-create" else 1)
    assert orphan == (1 if kill == "after-upload" else 0)
    assert counts == (1, 1, 0, 0)


# --- 6. The sandbox restarted mid-run on the same data dir ---------------------------------------------


def test_6_sandbox_restarted_mid_run(
    start_sandbox: Callable[..., SandboxProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = 12
    sandbox = start_sandbox("--processing-delay", "1")
    use_sandbox(monkeypatch, sandbox)
    setup = ClinikoHook()
    patients = new_patients(setup, reports)
    files = report_files(tmp_path / "reports", reports, size=300_000)
    restarted = threading.Event()
    at_kill: JsonDict = {}

    def crash_and_restart() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            at_kill.update(sandbox_stats(sandbox))
            if at_kill["attachments"] >= reports // 3:
                break
            time.sleep(0.05)
        sandbox.kill()  # SIGKILL: no clean shutdown
        sandbox.start()  # same port, same data dir
        restarted.set()

    def report_task(index: int, first_try: int = 1) -> TaskResult:
        def one_try(number: int) -> JsonDict:
            context = task_context(try_number=number, task_id=f"upload_report_{index}")
            return run_upload(ClinikoHook(), context, patients[index], files[index], **WAIT)

        return run_like_a_task(one_try, first_try=first_try)

    crasher = threading.Thread(target=crash_and_restart)
    crasher.start()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(report_task, range(reports)))
    crasher.join()
    failed = [index for index, result in enumerate(results) if result.record is None]
    for index in failed:
        results[index] = report_task(index, first_try=results[index].tries + 1)

    found, counts = finish_scenario(
        setup,
        patients,
        6,
        f"sandbox SIGKILLed and restarted on the same data dir after {reports // 3} of {reports} records",
        f"in-flight calls retried across the restart; {sum(r.tries > 1 for r in results)} task retries, "
        f"{len(failed)} re-run(s); {at_kill['attachments_processing']} attachment(s) still processing at "
        "the kill finished after the restart; all attached once",
    )
    assert restarted.is_set()
    assert at_kill["attachments_processing"] >= 1  # the restart met work in progress
    assert all(result.record is not None for result in results), [r.errors for r in results if r.errors]
    assert_one_processed_each(found, setup)
    assert counts == (reports, reports, 0, 0)


# --- 7. Processing slower than the wait's timeout -------------------------------------------------------


def test_7_processing_slower_than_the_timeout(
    start_sandbox: Callable[..., SandboxProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = start_sandbox("--processing-delay", "4")
    use_sandbox(monkeypatch, sandbox)
    hook = ClinikoHook()
    patients = new_patients(hook, 2)
    files = report_files(tmp_path / "reports", 2)
    short = {**WAIT, "timeout": 0.5}
    timeouts = []
    for patient, path in zip(patients, files, strict=True):
        with pytest.raises(
            AirflowSensorTimeout, match=r"had not finished processing .*raise the sensor's timeout"
        ):
            run_upload(hook, task_context(try_number=1), patient, path, **short)
        timeouts.append("timeout")
    uploads = sandbox_stats(sandbox)["uploads"]
    rerun = [
        run_upload(hook, task_context(try_number=2), p, f, **WAIT)
        for p, f in zip(patients, files, strict=True)
    ]
    stats = sandbox_stats(sandbox)
    found, counts = finish_scenario(
        hook,
        patients,
        7,
        "processing (4 s) slower than the wait's timeout (0.5 s), then a re-run",
        "clear AirflowSensorTimeout ('had not finished processing ... raise the sensor's timeout'); "
        "the re-run found the existing attachments and waited for them "
        f"({stats['uploads'] - uploads} new uploads)",
    )
    assert len(timeouts) == 2
    assert [record["id"] for record in rerun] == [found[p][0]["id"] for p in patients]
    assert all(record["processing_completed"] for record in rerun)
    assert stats["uploads"] == uploads  # no second upload
    assert counts == (2, 2, 0, 0)


# --- 8. The storage limit reached midway ----------------------------------------------------------------


def test_8_storage_limit_reached_midway(
    start_sandbox: Callable[..., SandboxProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports, size = 10, 10_000
    sandbox = start_sandbox("--processing-delay", "0", "--storage-limit", str(4 * size + 2 * size // 3))
    use_sandbox(monkeypatch, sandbox)
    hook = ClinikoHook()
    patients = new_patients(hook, reports)
    files = report_files(tmp_path / "reports", reports, size=size)
    reset_stats(sandbox)

    def task(patient: str, path: Path) -> TaskResult:
        return run_like_a_task(
            lambda number: run_upload(hook, task_context(try_number=number), patient, path)
        )

    results = [task(patient, path) for patient, path in zip(patients, files, strict=True)]
    stats = sandbox_stats(sandbox)
    done = [index for index, result in enumerate(results) if result.record is not None]
    failed = [index for index, result in enumerate(results) if result.record is None]
    messages = sorted({results[index].errors[0].split(":", 1)[0] for index in failed})
    # the re-run after the account's upgrade (a higher limit, same data dir)
    sandbox.stop()
    sandbox.cli_args[sandbox.cli_args.index("--storage-limit") + 1] = str(100 * size)
    sandbox.start()
    for index in failed:
        run_upload(hook, task_context(try_number=2), patients[index], files[index])
    found, counts = finish_scenario(
        hook,
        patients,
        8,
        f"storage limit reached after 4 of {reports} reports (limit {4 * size + 2 * size // 3} B)",
        f"{len(failed)} failed at once, 1 try each ({', '.join(messages)}: "
        f"'{results[failed[0]].errors[0].split(': ', 1)[1][:150]}...'); "
        f"{stats['requests_total']} requests for {reports} reports; re-run after the upgrade "
        "attached the rest",
    )
    assert len(done) == 4 and done == [0, 1, 2, 3]
    assert all(results[index].tries == 1 for index in failed)  # no task retries burnt
    assert all(
        "S3UploadRejectedError" in results[index].errors[0]
        or "ClinikoStorageLimitError" in results[index].errors[0]
        for index in failed
    )
    assert all("free space in cliniko" in results[index].errors[0].lower() for index in failed)
    # No retry storm: at most a presign, an S3 POST and a create per report (the lookup is on retries only)
    assert stats["requests_total"] <= 3 * reports, pretty(stats)
    assert stats["requests_by_route"].get(S3_ROUTE, 0) <= reports
    assert_one_processed_each(found, hook)
    assert counts == (reports, reports, 0, 0)
    assert issubclass(ClinikoStorageLimitError, AirflowFailException)
