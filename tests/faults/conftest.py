"""Shared set-up of the fault tests: own sandboxes, task-like operator runs, counting, and the reports.

The two reports (``tests/reports/fault_scenarios.md`` and ``tests/reports/bad_input.md``) are written at
the end of the session from the rows the tests recorded, and printed in the terminal summary so they
show in CI output.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator
from cliniko_provider.sandbox.process import SandboxProcess
from tests.conftest import REPO, connection_json

JsonDict = dict[str, Any]
REPORTS = REPO / "tests" / "reports"
FAULT_KEY = "faults-test-key-au1"


# --- the reports --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioRow:
    """One fault scenario's outcome and counts (see :func:`count_outcome`)."""

    number: int
    scenario: str
    outcome: str
    reports: int
    attachments: int
    duplicates: int
    lost: int


SCENARIOS: list[ScenarioRow] = []
BAD_INPUT: list[tuple[str, str, str]] = []
SECRETS: list[str] = []


def record_scenario(row: ScenarioRow) -> None:
    """Add a scenario's row to the session's fault table."""
    SCENARIOS.append(row)


def record_secrets_check(result: str, leaks: list[str]) -> None:
    """Keep the secrets check's result (and any leak found) for ``tests/reports/secrets_check.md``."""
    SECRETS.append("# Secrets check\n\n" + result + "\n" + "".join(f"\n- {leak}" for leak in leaks) + "\n")


def record_bad_input(case: str, error_type: str, message: str) -> None:
    """Add a bad-input case and the message it was answered with to the session's table."""
    BAD_INPUT.append((case, error_type, message))


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def scenario_table(rows: list[ScenarioRow]) -> str:
    lines = [
        "# Fault scenarios",
        "",
        "| # | Scenario | Outcome | Reports | Attachments | Duplicates | Lost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda item: (item.number, item.scenario)):
        lines.append(
            f"| {row.number} | {_cell(row.scenario)} | {_cell(row.outcome)} | {row.reports} | "
            f"{row.attachments} | {row.duplicates} | {row.lost} |"
        )
    return "\n".join(lines) + "\n"


def bad_input_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["# Bad input and the messages it gets", "", "| Case | Error | Message |", "| --- | --- | --- |"]
    lines += [f"| {_cell(case)} | {_cell(kind)} | {_cell(message)} |" for case, kind, message in rows]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Write the tables of this session and print them (CI output shows them)."""
    for name, text in (
        ("fault_scenarios.md", scenario_table(SCENARIOS) if SCENARIOS else ""),
        ("bad_input.md", bad_input_table(BAD_INPUT) if BAD_INPUT else ""),
        ("secrets_check.md", "".join(SECRETS)),
    ):
        if not text:
            continue
        REPORTS.mkdir(parents=True, exist_ok=True)
        (REPORTS / name).write_text(text)
        terminalreporter.write_sep("=", f"tests/reports/{name}")
        terminalreporter.write(text)


# --- sandboxes, connections and task-like runs -----------------------------------------------------------


@pytest.fixture
def start_sandbox(tmp_path: Path) -> Iterator[Callable[..., SandboxProcess]]:
    """Start a sandbox of this test only (its own data dir, key ``FAULT_KEY``); stopped after the test."""
    started: list[SandboxProcess] = []

    def start(*args: str, name: str = "sandbox") -> SandboxProcess:
        process = SandboxProcess(
            "--api-key", FAULT_KEY, "--rate-limit", "100000/60", *args, data_dir=tmp_path / name
        )
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()


def use_sandbox(monkeypatch: pytest.MonkeyPatch, sandbox: SandboxProcess, **extra: Any) -> str:
    """Point ``cliniko_default`` at a sandbox (extra connection fields allowed); return the JSON form."""
    conn = connection_json(FAULT_KEY, sandbox.base_url, **extra)
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", conn)
    return conn


def scaled_sleep(factor: float) -> Callable[[float], None]:
    """A ``sleep`` that waits ``factor`` of what it is asked (backoffs and 429 waits, made short).

    Only the hook's waits shrink; what is tested is what ends up in Cliniko, never how long it took.
    """
    import time

    return lambda seconds: time.sleep(max(0.0, seconds) * factor)


def task_context(run_id: str = "scheduled__2026-11-20", try_number: int = 1, task_id: str = "upload") -> Any:
    """The parts of a task context the upload operator reads: ``ti`` with ids, try number and XCom."""
    pushed: dict[str, Any] = {}
    ti = SimpleNamespace(
        dag_id="cliniko_nightly_report_export",
        task_id=task_id,
        run_id=run_id,
        map_index=-1,
        try_number=try_number,
        xcom_push=lambda key, value: pushed.__setitem__(key, value),
        pushed=pushed,
    )
    return {"ti": ti}


def run_upload(
    hook: ClinikoHook, context: Any, patient_id: str, file_path: str | Path, **kwargs: Any
) -> JsonDict:
    """Run the upload operator once, as one try of a task instance, with the given hook."""
    kwargs.setdefault("look_for_existing", "on_retry")  # as the nightly DAG does
    op = ClinikoAttachmentUploadOperator(
        task_id=context["ti"].task_id, patient_id=patient_id, file_path=str(file_path), **kwargs
    )
    op.hook = hook
    return op.execute(context)


def new_patients(hook: ClinikoHook, count: int) -> list[str]:
    """Create ``count`` patients; return their ids."""
    tag = uuid.uuid4().hex[:6]
    return [str(hook.create_patient("Fault", f"Patient {tag}-{index}")["id"]) for index in range(count)]


def attachments_by_patient(hook: ClinikoHook, patient_ids: list[str]) -> dict[str, list[JsonDict]]:
    """Every attachment of each patient, archived ones included (a duplicate archived is still one)."""
    return {pid: list(hook.list_attachments(patient_id=pid, include_archived=True)) for pid in patient_ids}


def count_outcome(found: dict[str, list[JsonDict]]) -> tuple[int, int, int, int]:
    """Return (reports, attachments, duplicates, lost) for one expected attachment per patient."""
    counts = [len(records) for records in found.values()]
    return len(counts), sum(counts), sum(max(0, n - 1) for n in counts), sum(1 for n in counts if n == 0)


def assert_one_processed_each(found: dict[str, list[JsonDict]], hook: ClinikoHook) -> None:
    """Assert each report has exactly one attachment, processed and not archived."""
    for patient_id, records in found.items():
        assert len(records) == 1, f"patient {patient_id}: {pretty(records)}"
        record = hook.get_attachment(records[0]["id"])
        assert record["processing_completed"] is True, pretty(record)
        assert record["archived_at"] is None


def finish_scenario(
    hook: ClinikoHook, patient_ids: list[str], number: int, scenario: str, outcome: str
) -> tuple[dict[str, list[JsonDict]], tuple[int, int, int, int]]:
    """Count a scenario's attachments per report and record its row; return what was found and the counts.

    :param hook: a hook on the scenario's sandbox.
    :param patient_ids: one patient per report.
    :param number: the scenario's number.
    :param scenario: what was done.
    :param outcome: what happened.
    """
    found = attachments_by_patient(hook, patient_ids)
    counts = count_outcome(found)
    record_scenario(ScenarioRow(number, scenario, outcome, *counts))
    return found, counts


def sandbox_stats(sandbox: SandboxProcess) -> JsonDict:
    """The sandbox's request counts and state summary."""
    return dict(requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json())


def reset_stats(sandbox: SandboxProcess) -> None:
    """Zero the sandbox's request counts."""
    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()


def set_faults(sandbox: SandboxProcess, **faults: Any) -> JsonDict:
    """Change the sandbox's faults at run time; return the new settings."""
    response = requests.post(f"{sandbox.root_url}/_sandbox/faults", json=faults, timeout=10)
    response.raise_for_status()
    return dict(response.json())


def pretty(data: object) -> str:
    """JSON for failure messages."""
    return json.dumps(data, indent=1, default=str)[:3000]


def subprocess_env(**values: str) -> dict[str, str]:
    """The environment for a helper subprocess: this one, the repository importable, plus ``values``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, **values}
