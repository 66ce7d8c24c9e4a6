"""The upload operator end to end against the running sandbox (a local Cliniko with a strict S3)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cliniko_provider.exceptions import (
    AirflowFailException,
    ClinikoAuthError,
    ClinikoConnectionError,
    ClinikoError,
    ClinikoInputError,
    ClinikoServerError,
    ClinikoStorageLimitError,
    S3UploadRejectedError,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator
from cliniko_provider.protocol.upload import UploadProtocol
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.utils.idempotency import wire_filename
from tests.conftest import REPO, SANDBOX_KEY, connection_json
from tests.helpers import TRICKY_NAMES, env_with, fake_context, sandbox_control, sandbox_faults, write_file

JsonDict = dict[str, Any]


class Crash(Exception):
    """Stands for the worker dying at a given point."""


@pytest.fixture
def hook(sandbox_conn: str) -> ClinikoHook:
    # Backoffs are skipped; waits for an earlier attachment's processing are kept short but real.
    return ClinikoHook(sandbox_conn, sleep=lambda seconds: time.sleep(min(seconds, 0.2)))


@pytest.fixture
def patient(hook: ClinikoHook) -> str:
    return str(hook.create_patient("Ada", f"Upload-{uuid.uuid4().hex[:8]}")["id"])


def upload(
    hook: ClinikoHook, patient: str, file_path: str | Path, *, try_number: int = 1, **kwargs: Any
) -> JsonDict:
    """Run the operator once, as one try of a task instance would, with the test's hook."""
    op = ClinikoAttachmentUploadOperator(
        task_id="upload", patient_id=patient, file_path=str(file_path), **kwargs
    )
    op.hook = hook
    return op.execute(fake_context("manual__1", try_number))


def attachments(hook: ClinikoHook, patient: str) -> list[JsonDict]:
    return list(hook.list_attachments(patient_id=patient))


def content(hook: ClinikoHook, record: JsonDict) -> bytes:
    response = hook.request("GET", f"/patient_attachments/{record['id']}/content")
    return response.content


WAIT = {"wait_for_completion": True, "deferrable": False, "poll_interval": 0.1, "timeout": 30}


# --- the happy path --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "file-uri", "memory-uri"])
def test_upload_and_wait_from_each_kind_of_source(
    hook: ClinikoHook, patient: str, tmp_path: Path, kind: str
) -> None:
    data = write_file(tmp_path, "nightly report.pdf", 300_000).read_bytes()
    source: str = str(tmp_path / "nightly report.pdf")
    if kind == "file-uri":
        source = (tmp_path / "nightly report.pdf").as_uri()
    elif kind == "memory-uri":
        from airflow.sdk import ObjectStoragePath
        from airflow.sdk.io import attach
        from fsspec.implementations.memory import MemoryFileSystem

        attach("memory", fs=MemoryFileSystem())
        source = f"memory://exports/{uuid.uuid4().hex}/nightly report.pdf"
        ObjectStoragePath(source).write_bytes(data)
    record = upload(hook, patient, source, description="Nightly", **WAIT)
    assert record["processing_completed"] is True
    assert record["filename"] == "nightly report.pdf"
    assert record["size"] == len(data)
    assert record["description"] == "Nightly"
    assert content(hook, record) == data
    assert [item["id"] for item in attachments(hook, patient)] == [record["id"]]


def test_tricky_names_arrive_intact_after_processing(hook: ClinikoHook, patient: str, tmp_path: Path) -> None:
    source = write_file(tmp_path, "plain.bin", 1234)
    records = [upload(hook, patient, source, filename=name) for name in TRICKY_NAMES]
    processed = [hook.get_attachment(record["id"]) for record in records]
    for record in processed:
        if not record["processing_completed"]:
            record.update(hook.wait_for_processing(record["id"], poll_interval=0.1, timeout=30))
    assert [record["filename"] for record in processed] == [wire_filename(name) for name in TRICKY_NAMES]
    assert "it's %22quoted%22.txt" in [record["filename"] for record in processed]


# --- idempotency: a crash at each point, then the task's retry ------------------------------------------


def crash_before(method: str) -> Callable[..., Any]:
    def crash(self: ClinikoHook, *args: Any, **kwargs: Any) -> Any:
        raise Crash(f"worker died before {method}")

    return crash


def crash_after(method: str, error: Exception | None = None) -> Callable[..., Any]:
    original = getattr(ClinikoHook, method)

    def crash(self: ClinikoHook, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        raise error or Crash(f"worker died after {method}")

    return crash


@pytest.mark.parametrize(
    ("method", "patched"),
    [
        ("get_presigned_post", crash_after("get_presigned_post")),
        ("upload_file", crash_before("upload_file")),
        ("upload_file", crash_after("upload_file")),
        ("create_attachment", crash_before("create_attachment")),
        ("create_attachment", crash_after("create_attachment")),
    ],
    ids=["after-presign", "before-upload", "after-upload", "before-create", "after-create"],
)
def test_a_retry_after_a_crash_makes_exactly_one_attachment(
    hook: ClinikoHook,
    patient: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    patched: Callable[..., Any],
) -> None:
    source = write_file(tmp_path, "report.pdf", 50_000)
    with monkeypatch.context() as crashing:
        crashing.setattr(ClinikoHook, method, patched)
        with pytest.raises(Crash):
            upload(hook, patient, source, description="Nightly")
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "retry-on-another-worker"))
    record = upload(hook, patient, source, description="Nightly", try_number=2)
    again = upload(hook, patient, source, description="Nightly", try_number=3)
    assert again["id"] == record["id"]
    assert record["description"] == "Nightly"
    assert [item["id"] for item in attachments(hook, patient)] == [record["id"]]


@pytest.mark.parametrize(
    "error",
    [
        ClinikoServerError(502, "Bad Gateway", None, "POST /patient_attachments"),
        ClinikoConnectionError("Could not reach Cliniko: ConnectionResetError"),
    ],
    ids=["5xx", "connection-error"],
)
def test_a_create_that_failed_after_creating_is_found_in_the_same_run(
    hook: ClinikoHook, patient: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.setattr(ClinikoHook, "create_attachment", crash_after("create_attachment", error))
    record = upload(hook, patient, write_file(tmp_path, "report.pdf", 2000))
    assert [item["id"] for item in attachments(hook, patient)] == [record["id"]]


# --- the S3 step against the strict S3 ----------------------------------------------------------------


def test_an_expired_presign_is_replaced(
    sandbox: SandboxProcess, hook: ClinikoHook, patient: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ClinikoHook.get_presigned_post
    presigns: list[JsonDict] = []

    def expiring_once(self: ClinikoHook, patient_id: int | str) -> JsonDict:
        if presigns:
            presigns.append(original(self, patient_id))
        else:
            with sandbox_faults(sandbox, presign_ttl=0):
                presigns.append(original(self, patient_id))
            time.sleep(1.1)  # the policy's expiration has one-second resolution
        return presigns[-1]

    monkeypatch.setattr(ClinikoHook, "get_presigned_post", expiring_once)
    record = upload(hook, patient, write_file(tmp_path, "late.pdf", 5000))
    assert len(presigns) == 2
    assert record["id"] in {item["id"] for item in attachments(hook, patient)}


def test_a_connection_reset_mid_upload_is_retried(
    sandbox: SandboxProcess, hook: ClinikoHook, patient: str, tmp_path: Path
) -> None:
    before = sandbox_control(sandbox, "stats")["uploads"]
    with sandbox_faults(sandbox, s3_reset_after_bytes=200_000):
        record = upload(hook, patient, write_file(tmp_path, "big.bin", 3 * 1024 * 1024), **WAIT)
        assert sandbox_control(sandbox, "faults")["s3_reset_after_bytes"] is None  # the cut happened
    assert record["size"] == 3 * 1024 * 1024
    assert sandbox_control(sandbox, "stats")["uploads"] == before + 1


def test_unknown_patient_fails_clearly(hook: ClinikoHook, tmp_path: Path) -> None:
    with pytest.raises(ClinikoInputError, match="patient_id 9999: Cliniko has no such patient"):
        upload(hook, "9999", write_file(tmp_path, "a.pdf", 10))


def test_bad_api_key_fails_without_retry(
    sandbox: SandboxProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json("wrong-key-au1", sandbox.base_url))
    with pytest.raises(ClinikoAuthError) as caught:
        upload(ClinikoHook(), "1", write_file(tmp_path, "a.pdf", 10))
    assert isinstance(caught.value, AirflowFailException)
    assert "wrong-key" not in str(caught.value)


def test_storage_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file bigger than the storage left: S3 refuses it (EntityTooLarge); with none left: Cliniko does."""
    limited_key = "storage-test-key-au1"
    with SandboxProcess(
        "--api-key",
        limited_key,
        "--storage-limit",
        "10000",
        "--processing-delay",
        "0",
        data_dir=tmp_path / "data",
    ) as limited:
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(limited_key, limited.base_url))
        hook = ClinikoHook(sleep=lambda seconds: None)
        patient = str(hook.create_patient("Sam", "Full")["id"])
        upload(hook, patient, write_file(tmp_path, "first.pdf", 6000))
        with pytest.raises(S3UploadRejectedError, match=r"EntityTooLarge.*storage"):
            upload(hook, patient, write_file(tmp_path, "second.pdf", 6000))
        upload(hook, patient, write_file(tmp_path, "third.pdf", 4000))
        with pytest.raises(ClinikoStorageLimitError, match="storage"):
            upload(hook, patient, write_file(tmp_path, "fourth.pdf", 10))
        assert len(attachments(hook, patient)) == 2


# --- faults and a real DAG run (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_under_injected_faults_each_file_is_attached_once(
    sandbox: SandboxProcess, hook: ClinikoHook, patient: str, tmp_path: Path
) -> None:
    files = [write_file(tmp_path, f"file {index}.csv", 1000 + index) for index in range(12)]
    with sandbox_faults(sandbox, fail_rate=0.2, throttle_rate=0.1):
        for index, path in enumerate(files):
            for attempt in range(1, 5):  # the task's own retries
                try:
                    upload(hook, patient, path, try_number=attempt, description=f"report {index}")
                    break
                except AirflowFailException:
                    raise
                except ClinikoError:
                    if attempt == 4:
                        raise
    descriptions = sorted(str(item["description"]) for item in attachments(hook, patient))
    assert descriptions == sorted(f"report {index}" for index in range(len(files)))


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = env_with(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "tests" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    return env


@pytest.mark.slow
def test_a_dozen_files_under_429s_and_5xx_attach_once_without_task_retries(
    sandbox: SandboxProcess, hook: ClinikoHook, patient: str, tmp_path: Path, airflow_home: dict[str, str]
) -> None:
    """``airflow dags test`` of a mapped upload with ``retries=0`` while 30% of answers are 429 and 20%
    5xx, API and S3 alike: the request plane waits out every 429 and retries every 5xx itself, so no task
    needs a retry; names arrive intact, local paths and ``file://`` URIs alike."""
    exports = tmp_path / "exports"
    exports.mkdir()
    names = [
        "a report.pdf",
        "b #2.csv",
        "c ünï.txt",
        "d 100%.txt",
        *(f"report-{n:02d}.csv" for n in range(8)),
    ]
    for index, name in enumerate(names):
        write_file(exports, name, 3000 + index, seed=index)
    env = {
        **airflow_home,
        # 8 attempts: with 20% 5xx, one call in 390,000 fails 8 times running (5: one in 3,000).
        "AIRFLOW_CONN_CLINIKO_DEFAULT": connection_json(SANDBOX_KEY, sandbox.base_url, max_attempts=8),
        "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "0",
    }
    conf = json.dumps({"patient_id": patient, "directory": str(exports)})
    before = sandbox_control(sandbox, "stats")
    with sandbox_faults(sandbox, throttle_rate=0.3, fail_rate=0.2):
        run = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", "upload_expand", "-c", conf],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        stats = sandbox_control(sandbox, "stats")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    records = attachments(hook, patient)
    assert sorted(record["filename"] for record in records) == names  # each once
    assert all(record["processing_completed"] for record in records)
    assert stats["injected_throttles"] > before["injected_throttles"]
    assert stats["injected_failures"] > before["injected_failures"]
    s3_posts = stats["requests_by_route"]["POST /s3/{bucket}/"] - before["requests_by_route"].get(
        "POST /s3/{bucket}/", 0
    )
    assert s3_posts > len(names)  # S3 answers were faulted too, and retried
    assert "not counted as an attempt" in run.stdout + run.stderr
    assert SANDBOX_KEY not in run.stdout + run.stderr


def test_a_file_that_shrinks_while_uploading_fails_without_a_record(
    hook: ClinikoHook, patient: str, tmp_path: Path
) -> None:
    """The body's length was promised up front; a short file must not become a truncated attachment."""
    from cliniko_provider.utils.s3_form import SourceChangedError
    from cliniko_provider.utils.upload import UploadSource

    path = write_file(tmp_path, "shrinking.csv", 10_000)
    source = UploadSource(uri=str(path), name=path.name, size=20_000, opener=lambda: path.open("rb"))
    with pytest.raises(SourceChangedError, match="shrank"):
        UploadProtocol(hook).upload_attachment(patient, source)
    assert attachments(hook, patient) == []
