"""Test helpers shared by the provider's test modules (upload, sensor...). Add to it; do not rewrite."""

from __future__ import annotations

import html
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests

from cliniko_provider.hooks.cliniko import ClinikoHook
from tests.fake_http import FakeClock

# --- Upload tests ------------------------------------------------------------------------------------

TRICKY_NAMES = (
    "report with spaces.pdf",
    "  spaces at both ends.pdf  ",
    "ünïcödé résumé 報告.txt",
    "hash#1.csv",
    "100% done.txt",
    "a+b=c.txt",
    "this & that.txt",
    'it\'s "quoted".txt',
)


def write_file(directory: Path, name: str = "report.pdf", size: int = 1000, seed: int = 7) -> Path:
    """Write a file of ``size`` bytes (a repeating, seed-dependent pattern) and return its path."""
    path = directory / name
    pattern = bytes((seed + index) % 251 for index in range(4096))
    with path.open("wb") as handle:
        remaining = size
        while remaining > 0:
            handle.write(pattern[: min(remaining, len(pattern))])
            remaining -= len(pattern)
    return path


def sandbox_control(sandbox: Any, what: str, **changes: Any) -> dict[str, Any]:
    """GET ``/_sandbox/<what>``, or POST the changes to it; return the JSON answer."""
    url = f"{sandbox.base_url.removesuffix('/v1')}/_sandbox/{what}"
    response = requests.post(url, json=changes, timeout=10) if changes else requests.get(url, timeout=10)
    response.raise_for_status()
    return dict(response.json())


@contextmanager
def sandbox_faults(sandbox: Any, **faults: Any) -> Iterator[dict[str, Any]]:
    """Set sandbox faults (``fail_rate``, ``presign_ttl``...) for a block, restoring them after it.

    A fault that corrupts "the next processed files" must hit this block's files: the session's sandbox may
    still hold earlier tests' attachments that fall due meanwhile, so they are put off for a day first.
    """
    if any(name.startswith("corrupt_processed_") for name in faults):
        sandbox_control(sandbox, "processing/finish", after=86_400)
    before = sandbox_control(sandbox, "faults")
    try:
        yield sandbox_control(sandbox, "faults", **faults)
    finally:
        sandbox_control(sandbox, "faults", **{name: before[name] for name in faults})


@contextmanager
def cliniko_connection(monkeypatch: Any, api_key: str, host: str | None = None) -> Iterator[None]:
    """Point ``cliniko_default`` at a connection, with empty rate budgets before and after.

    Fake clocks restart at the same time in every test, so budgets kept from an earlier test would
    make a hook wait.
    """
    from cliniko_provider.utils.budget import PROCESS_BUDGETS
    from tests.conftest import connection_json

    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(api_key, host))
    PROCESS_BUDGETS.clear()
    try:
        yield
    finally:
        PROCESS_BUDGETS.clear()


def env_with(**values: str) -> dict[str, str]:
    """Return ``os.environ`` plus the given variables (for subprocesses)."""
    return {**os.environ, **values}


# --- Sensor and trigger tests ----------------------------------------------------------------------------

S3_KEY_PATTERN = re.compile(r"<Key>(.*?)</Key>", re.S)


def create_attachment_via_api(
    hook: Any, patient_id: str, data: bytes = b"%PDF-1.4 test\n", filename: str = "report.pdf"
) -> dict[str, Any]:
    """Create one attachment through the real API: presign, POST the file to S3, create the record.

    The form sends every presign field unchanged and in order, then ``file`` last; the record's
    ``upload_url`` is the presign ``url`` + S3's ``Key``.

    :param hook: a ``ClinikoHook``.
    :param patient_id: the patient to attach the file to.
    :param data: the file's content.
    :param filename: the file's name.
    """
    # Not hook.get_presigned_post: it masks each policy, and Airflow's masker slows down with every
    # secret it holds (O(n) per secret), which makes creating hundreds of attachments in one process slow.
    presign = hook.get_json(f"/patients/{patient_id}/attachment_presigned_post")
    form = [(name, (None, str(value))) for name, value in presign["fields"].items()]
    form.append(("file", (filename, data, "application/octet-stream")))
    answer = requests.post(presign["url"], files=form, timeout=30)
    assert answer.status_code == 201, answer.text
    match = S3_KEY_PATTERN.search(answer.text)
    assert match, answer.text
    key = html.unescape(match.group(1))
    return dict(hook.create_attachment(patient_id, presign["url"] + key))


class FakeAttachmentHook(ClinikoHook):
    """A ``ClinikoHook`` whose ``get_attachment`` answers from a script (its waiting logic is the real one).

    The last answer repeats; an exception in the script is raised.

    :param answers: records (or exceptions) in the order the calls get them.
    :param clock: a fake clock: the hook sleeps on it and reads the time from it.
    """

    def __init__(self, *answers: dict[str, Any] | Exception, clock: FakeClock | None = None) -> None:
        clock = clock or FakeClock()
        super().__init__(sleep=clock.sleep, clock=clock)
        self.answers = list(answers)
        self.calls: list[str] = []

    def get_attachment(self, attachment_id: int | str) -> dict[str, Any]:
        self.calls.append(str(attachment_id))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@contextmanager
def own_rate_budgets(monkeypatch: Any, state_dir: Path) -> Iterator[None]:
    """Rate budgets of one test only: their state files in ``state_dir``, none kept in memory.

    Budgets are shared through files by every process of the machine, so without this, fake clocks
    and other test runs on the same key would make a hook wait.
    """
    from cliniko_provider.utils.budget import PROCESS_BUDGETS

    monkeypatch.setenv("CLINIKO_STATE_DIR", str(state_dir))
    PROCESS_BUDGETS.clear()
    try:
        yield
    finally:
        PROCESS_BUDGETS.clear()


class FakeTI(SimpleNamespace):
    """The parts of a task instance the operator uses, recording XCom pushes."""

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str, key: str = "return_value", map_indexes: int | None = None) -> Any:
        """This task instance's own XComs only (what the batch operator reads back after a deferral)."""
        assert (task_ids, map_indexes) == (self.task_id, self.map_index)
        return self.pushed.get(key)


def fake_context(run_id: str = "manual__1", try_number: int = 1, map_index: int = -1) -> Any:
    """A task context holding only a :class:`FakeTI` (what the upload operator reads)."""
    ti = FakeTI(
        dag_id="nightly",
        task_id="upload",
        run_id=run_id,
        map_index=map_index,
        try_number=try_number,
        pushed={},
    )
    return {"ti": ti}


class FakeTaskStateStore:
    """Airflow 3.3's ``task_state_store`` as a task sees it (get/set), shared by every try and worker.

    :param works_for: how many ``set`` calls succeed before every later one raises (None: all do).
    :param one_call_at_a_time: as ``airflow dags test``'s in-process comms: a call made while another is
        being sent fails.
    """

    def __init__(self, works_for: int | None = None, one_call_at_a_time: bool = False) -> None:
        self.values: dict[str, Any] = {}
        self.works_for = works_for
        self.one_call_at_a_time = one_call_at_a_time
        self._busy = threading.Lock()

    @contextmanager
    def _call(self) -> Iterator[None]:
        if not self.one_call_at_a_time:
            yield
            return
        if not self._busy.acquire(blocking=False):
            raise ImportError("cannot import name 'SUPERVISOR_COMMS'")
        try:
            time.sleep(0.005)
            yield
        finally:
            self._busy.release()

    def get(self, key: str, default: Any = None) -> Any:
        with self._call():
            return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        if self.works_for is not None:
            if self.works_for <= 0:
                raise RuntimeError("state store unreachable")
            self.works_for -= 1
        with self._call():
            self.values[key] = json.loads(json.dumps(value))  # as Airflow stores it: JSON
