"""Idempotency and names end to end: real ``airflow dags test`` runs of a mapped upload against the sandbox.

One patient gets several files of one name and one size but different bytes, plus the tricky names, in
one mapped run; the same date is then run again (nothing new), run again after one file was regenerated
(that one is uploaded anew, and the log says why), and run with names that are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.utils.idempotency import wire_filename
from tests.conftest import REPO, SANDBOX_KEY, connection_json
from tests.helpers import TRICKY_NAMES, env_with, write_file

JsonDict = dict[str, Any]
DESCRIPTION = "Monthly summary  (as written)"
DATE = "2026-11-20"


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory, sandbox: SandboxProcess) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = env_with(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "tests" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW_CONN_CLINIKO_DEFAULT=connection_json(SANDBOX_KEY, sandbox.base_url),
        CLINIKO_STATE_DIR=str(home / "journal"),
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    return env


def dags_test(
    env: dict[str, str], patient: str, uploads: list[JsonDict], dag_id: str = "upload_each"
) -> subprocess.CompletedProcess[str]:
    conf = json.dumps({"patient_id": patient, "description": DESCRIPTION, "uploads": uploads})
    return subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", dag_id, DATE, "-c", conf],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def content(hook: ClinikoHook, attachment_id: str) -> bytes:
    return hook.request("GET", f"/patient_attachments/{attachment_id}/content").content


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_same_names_tricky_names_reruns_and_refused_names_in_real_dag_runs(
    sandbox: SandboxProcess, sandbox_conn: str, tmp_path: Path, airflow_env: dict[str, str]
) -> None:
    hook = ClinikoHook(sandbox_conn)
    patient = str(hook.create_patient("Idem", f"Potent-{uuid.uuid4().hex[:8]}")["id"])
    same = []
    for month, seed in (("2026-01", 1), ("2026-02", 2), ("2026-03", 3)):
        (tmp_path / month).mkdir()
        same.append(write_file(tmp_path / month, "summary.csv", 3000, seed=seed))
    tricky = write_file(tmp_path, "tricky.bin", 1234, seed=9)
    uploads = [{"file_path": str(path)} for path in same]
    # Spaces at both ends, '"' and non-ASCII here (every tricky name: test_upload_sandbox.py, same sandbox).
    names = [name for name in TRICKY_NAMES if name != name.strip() or '"' in name or not name.isascii()]
    uploads += [{"file_path": str(tricky), "filename": name} for name in names]

    # 1. one mapped run: as many attachments as files, each with its own bytes, descriptions exact
    first = dags_test(airflow_env, patient, uploads)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    records = {str(r["id"]): r for r in hook.list_attachments(patient_id=patient)}
    assert len(records) == len(uploads)
    assert all(r["description"] == DESCRIPTION for r in records.values())
    summaries = [r for r in records.values() if r["filename"] == "summary.csv"]
    assert sorted(content(hook, str(r["id"])) for r in summaries) == sorted(p.read_bytes() for p in same)
    shown = sorted(r["filename"] for r in records.values() if r["filename"] != "summary.csv")
    assert shown == sorted(wire_filename(name) for name in names)
    assert "it's %22quoted%22.txt" in shown and "  spaces at both ends.pdf  " in shown
    assert SANDBOX_KEY not in first.stdout + first.stderr

    # 2. the same date again (as a clear would: looking first), files unchanged: nothing uploaded, and
    # each task says which record it reused and why
    again = uploads[:2]  # two of the same-named files (the tricky names were proven above)
    second = dags_test(airflow_env, patient, again, "upload_each_again")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert {str(r["id"]) for r in hook.list_attachments(patient_id=patient)} == set(records)
    reuses = (second.stdout + second.stderr).count("Not uploading again: reusing attachment")
    assert reuses == len(again)

    # 3. one report regenerated (same name and size, other bytes): that one is uploaded anew
    write_file(tmp_path / "2026-02", "summary.csv", 3000, seed=22)
    third = dags_test(airflow_env, patient, again, "upload_each_again")
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    now = {str(r["id"]): r for r in hook.list_attachments(patient_id=patient)}
    (new_id,) = set(now) - set(records)
    assert content(hook, new_id) == same[1].read_bytes()
    assert (
        "none with this file's content (the file changed since: regenerated?)" in third.stdout + third.stderr
    )

    # 4. refused names: the task fails before sending anything, naming the character and the fix
    refused = dags_test(
        airflow_env,
        patient,
        [
            {"file_path": str(tricky), "filename": ".."},
            {"file_path": str(tricky), "filename": "invoice\u202efdp.exe"},
        ],
    )
    output = refused.stdout + refused.stderr
    assert "filename '..' is a path step, not a file name. Pass a plain file name" in output
    assert "holds U+202E (RIGHT-TO-LEFT OVERRIDE)" in output
    assert {str(r["id"]) for r in hook.list_attachments(patient_id=patient)} == set(now)
