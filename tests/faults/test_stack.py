"""Scenario 5 and the secrets check, on a real Airflow deployment (API server, scheduler, DAG processor
and triggerer as processes; LocalExecutor on SQLite) against the sandbox (slow).

One deployment runs two DAGs at once with a recognisable API key: 100 mapped deferrable
``ProcessingCompletedSensor``s (``tests/dags/faults_triggerer_restart.py``) and the nightly export of 5
reports (``dags_examples``), whose batch of uploads waits in the triggerer too (one trigger for the 5).
Processing is held back (a delay of an hour) until all 105 waits are deferred; then the triggerer is
SIGKILLed and restarted, and once the new triggerer has taken every trigger over, processing is released
by a crash-restart of the sandbox on the same data dir with the pending attachments made due.
Every wait must complete.

Then nothing the deployment wrote may hold the key (or its Basic-auth form), a presign policy or a
signature: every file under AIRFLOW_HOME (task, trigger and component logs, and the SQLite database byte
for byte), every XCom, every rendered template field, and the trigger rows captured while deferred.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.triggers.cliniko import ProcessingCompletedTrigger
from tests.conftest import REPO, connection_json
from tests.e2e.stack import AirflowStack
from tests.faults.conftest import (
    ScenarioRow,
    assert_one_processed_each,
    attachments_by_patient,
    count_outcome,
    pretty,
    record_scenario,
    record_secrets_check,
)
from tests.helpers import create_attachment_via_api

pytestmark = pytest.mark.slow

SECRET_KEY = "SECRETKEYq7Zx2Lm9Vt4Rb8Nc3Wd6-au1"
SENSORS = 100
NIGHTLY = 5
NIGHTLY_BATCHES = 1  # the nightly DAG uploads its 5 reports in one batch task, which defers once
SENSOR_DAG = "faults_triggerer_restart"
NIGHTLY_DAG = "cliniko_nightly_report_export"
# A presign policy is base64 JSON (it starts with '{"', i.e. 'eyJ'); a SigV4 signature is 64 hex digits.
POLICY_PATTERN = re.compile(rb"eyJ[A-Za-z0-9+/]{40,}={0,2}")
SIGNATURE_PATTERN = re.compile(rb"(?<![0-9a-fA-F])[0-9a-f]{64}(?![0-9a-fA-F])")


def secret_needles(api_key: str) -> dict[str, bytes]:
    """What must appear nowhere: the key, its stem without the shard, and its Basic-auth form."""
    basic = base64.b64encode(f"{api_key}:".encode())
    return {
        "API key": api_key.encode(),
        "API key without its shard": api_key.rsplit("-", 1)[0].encode(),
        "Basic auth of the key": basic,
        "Basic auth of the key (first 24 chars)": basic[:24],
    }


def policies_in(data: bytes) -> list[bytes]:
    """Base64 JSON runs that decode to an S3 POST policy (``expiration`` and ``conditions``)."""
    found = []
    for match in POLICY_PATTERN.finditer(data):
        text = match.group()
        try:
            decoded = base64.b64decode(text + b"=" * (-len(text) % 4))
        except ValueError:
            continue
        if b'"conditions"' in decoded and b'"expiration"' in decoded:
            found.append(text)
    return found


def scan(name: str, data: bytes, needles: dict[str, bytes], signatures: set[bytes]) -> list[str]:
    """Return what leaked in one file or value: needles, policies, and signatures the sandbox issued."""
    leaks = [f"{name}: {what}" for what, needle in needles.items() if needle in data]
    leaks += [f"{name}: a presign policy {policy[:16]!r}..." for policy in policies_in(data)]
    leaks += [
        f"{name}: a presign signature" for hexes in SIGNATURE_PATTERN.findall(data) if hexes in signatures
    ]
    return leaks


def make_pending_due(data_dir: Path) -> int:
    """With the sandbox stopped: make every attachment still processing due now; return how many."""
    with sqlite3.connect(data_dir / "sandbox.db") as db:
        changed = db.execute(
            "UPDATE attachments SET process_after = ? WHERE processing_completed = 0", (time.time(),)
        ).rowcount
    db.close()
    return changed


def test_5_triggerer_killed_while_105_waits_are_deferred_and_no_secret_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(REPO / "tests" / "dags" / f"{SENSOR_DAG}.py", dags)
    shutil.copy(REPO / "dags_examples" / f"{NIGHTLY_DAG}.py", dags)
    data_dir = tmp_path / "sandbox"
    with SandboxProcess(
        "--api-key", SECRET_KEY, "--processing-delay", "3600", "--rate-limit", "100000/60", data_dir=data_dir
    ) as sandbox:
        conn = connection_json(SECRET_KEY, sandbox.base_url, requests_per_minute=100000)
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", conn)
        hook = ClinikoHook()
        holder = str(hook.create_patient("Sensor", "Holder")["id"])
        waited = [
            str(create_attachment_via_api(hook, holder, filename=f"wait-{n}.pdf")["id"])
            for n in range(SENSORS)
        ]
        rows, nightly_patients = [], []
        for number in range(NIGHTLY):
            reference = f"WH-S{number}"
            patient = hook.create_patient("Nightly", f"Secret {number}", old_reference_id=reference)
            nightly_patients.append(str(patient["id"]))
            rows.append({"reference": reference, "email": f"s{number}@faults.example", "name": f"S {number}"})
        own_presign = hook.get_json(f"/patients/{holder}/attachment_presigned_post")["fields"]

        stack = AirflowStack(
            tmp_path / "airflow",
            dags,
            env={
                "AIRFLOW_CONN_CLINIKO_DEFAULT": conn,
                "AIRFLOW__CORE__FERNET_KEY": "",  # trigger kwargs in the clear, so the scan can see them
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            },
        )
        with stack:

            def parsed() -> bool:
                stack.check_alive()
                return stack.dag_is_parsed(SENSOR_DAG) and stack.dag_is_parsed(NIGHTLY_DAG)

            stack.wait_for(parsed, 180, "both DAGs to be parsed")
            nightly_conf = {"patients": rows, "report_root": (tmp_path / "reports").as_uri()}
            stack.cli(
                "dags",
                "trigger",
                SENSOR_DAG,
                "--run-id",
                "r5",
                "--conf",
                json.dumps({"attachment_ids": waited}),
            )
            stack.cli("dags", "trigger", NIGHTLY_DAG, "--run-id", "n5", "--conf", json.dumps(nightly_conf))

            def deferred() -> int:
                stack.check_alive()
                return int(
                    str(stack.query("SELECT COUNT(*) FROM task_instance WHERE state = 'deferred'")[0][0])
                )

            stack.wait_for(
                lambda: deferred() == SENSORS + NIGHTLY_BATCHES, 420, "all waits to be deferred", interval=2
            )
            triggers = stack.query("SELECT id, classpath, kwargs, triggerer_id FROM trigger")
            assert len(triggers) == SENSORS + NIGHTLY_BATCHES

            stack.restart("triggerer")  # SIGKILL, then a new triggerer process

            def new_triggerer_owns_all() -> bool:
                stack.check_alive()
                newest = stack.query("SELECT MAX(id) FROM job WHERE job_type = 'TriggererJob'")[0][0]
                owned = stack.query("SELECT COUNT(*) FROM trigger WHERE triggerer_id = ?", newest)[0][0]
                return newest is not None and owned == SENSORS + NIGHTLY_BATCHES

            stack.wait_for(
                new_triggerer_owns_all, 180, "the new triggerer to take every trigger over", interval=2
            )
            still_deferred = deferred()
            sandbox.kill()  # processing is released by a crash-restart of the sandbox on the same data dir
            released = make_pending_due(data_dir)
            sandbox.start()

            def finished(dag_id: str, run_id: str) -> bool:
                stack.check_alive()
                return stack.run_state(dag_id, run_id) in ("success", "failed")

            stack.wait_for(
                lambda: finished(SENSOR_DAG, "r5") and finished(NIGHTLY_DAG, "n5"),
                420,
                "both runs",
                interval=2,
            )
            states = {
                run: stack.task_states(dag, run) for dag, run in ((SENSOR_DAG, "r5"), (NIGHTLY_DAG, "n5"))
            }
            run_states = [stack.run_state(SENSOR_DAG, "r5"), stack.run_state(NIGHTLY_DAG, "n5")]
            xcoms = stack.query("SELECT dag_id, task_id, map_index, key, value FROM xcom")
            rendered = stack.query(
                "SELECT dag_id, task_id, map_index, rendered_fields FROM rendered_task_instance_fields"
            )
            triggerer_log = stack.log_tail("triggerer", 200)

        # --- scenario 5: every wait completed ---------------------------------------------------------------
        assert run_states == ["success", "success"], f"{pretty(states)}\n{triggerer_log}"
        assert (
            still_deferred == SENSORS + NIGHTLY_BATCHES
        )  # all still deferred after the kill, until released
        assert released == SENSORS + NIGHTLY
        sensor_results = [
            json.loads(str(value))
            for _, task, _, key, value in xcoms
            if task == "wait" and key == "return_value"
        ]
        assert sorted(str(record["id"]) for record in sensor_results) == sorted(waited)
        assert all(record["processing_completed"] is True for record in sensor_results)
        returned = Counter(str(record["id"]) for record in sensor_results)
        holder_records = list(hook.list_attachments(patient_id=holder, include_archived=True))
        nightly_found = attachments_by_patient(hook, nightly_patients)
        assert_one_processed_each(nightly_found, hook)
        nightly_counts = count_outcome(nightly_found)
        record_scenario(
            ScenarioRow(
                5,
                f"triggerer SIGKILLed and restarted while {SENSORS} mapped deferrable sensors and the "
                f"{NIGHTLY} uploads of a nightly run waited in it (real scheduler, triggerer, LocalExecutor)",
                f"the new triggerer took all {SENSORS + NIGHTLY_BATCHES} triggers (the nightly's batch waits "
                f"with one) over; once processing was released (sandbox crash-restart, same data dir) every "
                f"sensor returned its processed record and the nightly run succeeded",
                SENSORS + NIGHTLY,
                len(returned) + nightly_counts[1],
                sum(count - 1 for count in returned.values())
                + len(holder_records)
                - SENSORS
                + nightly_counts[2],
                len(set(waited) - set(returned)) + nightly_counts[3],
            )
        )
        assert nightly_counts == (NIGHTLY, NIGHTLY, 0, 0)

        # --- secrets ----------------------------------------------------------------------------------------
        needles = secret_needles(SECRET_KEY)
        signatures = {own_presign["x-amz-signature"].encode()}
        own = json.dumps(own_presign).encode()
        # The scan can fail: it finds the key and a presign of our own when they are there.
        assert scan("control", own + needles["Basic auth of the key"], needles, signatures)
        assert policies_in(own) == [own_presign["policy"].encode()]
        kwargs_seen = " ".join(str(kwargs) for _, _, kwargs, _ in triggers)  # stored in the clear
        assert all(attachment_id in kwargs_seen for attachment_id in waited)
        leaks: list[str] = []
        files = [path for path in (tmp_path / "airflow").rglob("*") if path.is_file()]
        for path in files:
            leaks += scan(str(path.relative_to(tmp_path)), path.read_bytes(), needles, signatures)
        for label, values in (("xcom", xcoms), ("rendered field", rendered), ("trigger row", triggers)):
            for row in values:
                leaks += scan(f"{label} {row[:3]}", repr(row).encode(), needles, signatures)
        _, kwargs = ProcessingCompletedTrigger("1", deadline=1.0).serialize()
        leaks += scan("ProcessingCompletedTrigger.serialize()", repr(kwargs).encode(), needles, signatures)
        logs = [path for path in files if "logs" in path.parts]
        hex_found = [
            (path.name, data[max(0, match.start() - 80) : match.end() + 10])
            for path in files
            if path.suffix == ".log"
            for data in [path.read_bytes()]
            for match in SIGNATURE_PATTERN.finditer(data)
            # the task state store's keys name an upload's identity hash, and its URLs are in access logs
            if not data[max(0, match.start() - 16) : match.start()].endswith(b"/cliniko-upload:")
        ]
        hex_runs = len(hex_found)
        result = (
            f"{len(files)} files under AIRFLOW_HOME ({len(logs)} task/trigger logs, the SQLite DB byte "
            "for byte), "
            f"{len(xcoms)} XComs, {len(rendered)} rendered-field rows, {len(triggers)} trigger rows captured "
            f"while deferred: {len(leaks)} leak(s) of the key, its Basic-auth form, a presign policy or "
            f"signature; {hex_runs} 64-hex runs (signature-shaped) in any log file"
        )
        record_secrets_check(result, leaks)
        assert leaks == [], "\n".join(leaks[:50])
        assert hex_runs == 0, hex_found[:5]  # no SigV4 signature of any presign the runs used is in a log
        assert Counter(state for *_, state in states["r5"]) == Counter({"success": SENSORS + 1})
        assert len(holder_records) == SENSORS
