"""What only Airflow 3.3 has, on one real deployment (API server, scheduler, DAG processor, triggerer as
processes; LocalExecutor on SQLite) shared by the module's tests, against the sandbox:

1. The sensor starts in the triggerer: it waits for an attachment whose id is known when the DAG is
   parsed, and the task never reaches a worker: it is never queued to the executor, no worker host or
   process ever ran it, and the triggerer ends it with the processed record as its return value.
2. The task state store carries each file's progress to a retry on another worker: a batch of 20 whose
   worker is killed once every create was sent is retried with another private state directory (no
   journal to help); the retry reads 0 bytes of content and makes no duplicate, counted at the sandbox,
   and Airflow's API shows what the store held.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import connection_json
from tests.e2e.stack import AirflowStack
from tests.helpers import create_attachment_via_api, write_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not AIRFLOW_V_3_3_PLUS, reason="start_from_trigger and the task state store need 3.3"),
]

KEY = "e2e-trigger-key-au1"
WAIT_DAG_ID = "cliniko_wait_in_triggerer"
# The downstream task proves the record arrives as an ordinary return value (a dict, not its JSON text).
WAIT_DAG = """
from airflow.sdk import DAG, task
from cliniko_provider.sensors.cliniko import ProcessingCompletedSensor

with DAG(dag_id="{dag_id}", schedule=None):
    waited = ProcessingCompletedSensor(
        task_id="wait_processed", attachment_id="{attachment_id}", deferrable=True, poke_interval=1,
        timeout=300,
    )

    @task
    def read_record(record):
        assert isinstance(record, dict) and record["processing_completed"] is True, record
        assert str(record["id"]) == "{attachment_id}", record

    read_record(waited.output)
"""

RETRY_DAG_ID = "cliniko_retry_on_another_worker"
FILES = 20
FILE_SIZE = 3000
# Each try keeps its private state (the journal) in a directory of its own, as another machine would; the
# first try's worker process dies (SIGKILL) once the batch sent every create, before the task could end.
RETRY_DAG = """
import os
import signal
from datetime import timedelta

from airflow.sdk import DAG

from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator


def on_a_worker_of_its_own(context):
    os.environ["CLINIKO_STATE_DIR"] = os.path.join({state_root!r}, f"try-{{context['ti'].try_number}}")


def die_after_the_creates(context, result):
    if context["ti"].try_number == 1:
        os.kill(os.getpid(), signal.SIGKILL)


with DAG(
    dag_id="{dag_id}", schedule=None, params={{"uploads": []}}, render_template_as_native_obj=True
):
    ClinikoBatchUploadOperator(
        task_id="upload",
        uploads="{{{{ params.uploads }}}}",
        retries=1,
        retry_delay=timedelta(seconds=5),  # the test reads the sandbox's counters in between
        pre_execute=on_a_worker_of_its_own,
        post_execute=die_after_the_creates,
    )
"""


@dataclass
class Deployment:
    """The module's sandbox and Airflow deployment."""

    sandbox: SandboxProcess
    stack: AirflowStack
    hook: ClinikoHook
    state_root: Path  # each try's private state directory is in here


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One sandbox and one Airflow deployment (about 50 s to start) for the module, both DAGs parsed."""
    tmp_path = tmp_path_factory.mktemp("airflow-3-3")
    with (
        SandboxProcess("--api-key", KEY, "--processing-delay", "4", data_dir=tmp_path / "sandbox") as sandbox,
        pytest.MonkeyPatch.context() as monkeypatch,
    ):
        connection = connection_json(KEY, sandbox.base_url)
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection)
        hook = ClinikoHook()
        patient = hook.create_patient("Trigger", "Only")
        attachment = create_attachment_via_api(hook, str(patient["id"]))
        dags, state_root = tmp_path / "dags", tmp_path / "workers"
        dags.mkdir()
        (dags / "wait.py").write_text(WAIT_DAG.format(dag_id=WAIT_DAG_ID, attachment_id=attachment["id"]))
        (dags / "retry.py").write_text(RETRY_DAG.format(dag_id=RETRY_DAG_ID, state_root=str(state_root)))
        with AirflowStack(
            tmp_path / "airflow", dags, env={"AIRFLOW_CONN_CLINIKO_DEFAULT": connection}
        ) as stack:
            for dag_id in (WAIT_DAG_ID, RETRY_DAG_ID):
                stack.wait_for(
                    lambda d=dag_id: stack.check_alive() or stack.dag_is_parsed(d), 180, f"{dag_id} parsed"
                )
            yield Deployment(sandbox, stack, hook, state_root)


def finish(stack: AirflowStack, dag_id: str, run_id: str, timeout: float = 300) -> str | None:
    """Wait for a DAG run to end; return its state."""
    stack.wait_for(
        lambda: stack.check_alive() or stack.run_state(dag_id, run_id) in ("success", "failed"),
        timeout,
        f"{dag_id} {run_id} to finish",
        interval=0.5,
    )
    return stack.run_state(dag_id, run_id)


def test_a_known_attachment_is_waited_for_without_a_worker(deployment: Deployment) -> None:
    stack = deployment.stack
    started = time.monotonic()
    stack.cli("dags", "trigger", WAIT_DAG_ID, "--run-id", "t")
    ended = finish(stack, WAIT_DAG_ID, "t")
    print(f"run took {time.monotonic() - started:.1f} s")
    assert ended == "success", stack.log_tail("triggerer")
    [(state, hostname, pid, queued)] = stack.query(
        "SELECT state, hostname, pid, queued_dttm FROM task_instance "
        "WHERE dag_id = ? AND run_id = 't' AND task_id = 'wait_processed'",
        WAIT_DAG_ID,
    )
    assert state == "success"
    reached = "the task reached a worker:\n" + stack.log_tail("triggerer", 200)
    assert (hostname or None, pid, queued) == (None, None, None), reached
    assert stack.task_states(WAIT_DAG_ID, "t") == [
        ("read_record", -1, "success"),
        ("wait_processed", -1, "success"),
    ]
    assert not stack.query("SELECT 1 FROM task_instance_history WHERE dag_id = ?", WAIT_DAG_ID)
    assert "Start from trigger enabled for task wait_processed" in stack.log_tail("triggerer", 400)


def sandbox_stats(sandbox: SandboxProcess) -> dict[str, Any]:
    return dict(requests.get(f"{sandbox.root_url}/_sandbox/stats", timeout=10).json())


def test_a_batch_retried_on_another_worker_reads_no_content_from_the_task_state_store(
    deployment: Deployment, tmp_path: Path
) -> None:
    stack, sandbox, hook = deployment.stack, deployment.sandbox, deployment.hook
    # 20 files alike but for their bytes (name, size, description): without what the first try recorded,
    # only each record's content could tell whether it is this file's.
    uploads, digests = [], {}
    for number in range(FILES):
        patient = str(hook.create_patient("Retried", f"Elsewhere {number}")["id"])
        (tmp_path / str(number)).mkdir()
        path = write_file(tmp_path / str(number), "report.pdf", FILE_SIZE, seed=number)
        uploads.append({"patient_id": patient, "file_path": str(path), "description": "Nightly"})
        digests[patient] = hashlib.sha256(path.read_bytes()).hexdigest()

    requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=10).raise_for_status()
    started = time.monotonic()
    conf = json.dumps({"uploads": uploads})
    stack.cli("dags", "trigger", RETRY_DAG_ID, "--run-id", "r", "--conf", conf)
    stack.wait_for(
        lambda: (
            stack.check_alive() or stack.task_states(RETRY_DAG_ID, "r") == [("upload", -1, "up_for_retry")]
        ),
        180,
        "the first try's worker to die",
        interval=0.2,
    )
    first_try = sandbox_stats(sandbox)  # read before the retry starts (retry_delay: 5 s)
    state = finish(stack, RETRY_DAG_ID, "r", timeout=180)
    retry = sandbox_stats(sandbox)
    took = time.monotonic() - started
    made = Counter(first_try["requests_by_route"])
    asked = Counter(retry["requests_by_route"]) - made
    print(f"trigger to green: {took:.1f} s; the retry's requests: {dict(asked)}")
    assert state == "success", stack.log_tail("scheduler")
    [(try_number, pid)] = stack.query(
        "SELECT try_number, pid FROM task_instance WHERE dag_id = ? AND run_id = 'r'", RETRY_DAG_ID
    )
    [(first_state, first_pid)] = stack.query(
        "SELECT state, pid FROM task_instance_history WHERE dag_id = ? AND run_id = 'r'", RETRY_DAG_ID
    )
    assert (try_number, first_state) == (2, "failed") and pid != first_pid  # the try, as history keeps it

    # The first try sent every create; the retry asked one GET per file, and nothing else.
    assert made["POST /v1/patient_attachments"] == made["POST /s3/{bucket}/"] == FILES
    assert first_try["content_reads"] == first_try["content_bytes"] == 0
    # the new worker learns the key's user once (its private state is new), as any process does
    assert asked.pop("GET /v1/user", 0) <= 1, asked
    assert asked == {"GET /v1/patient_attachments/{id}": FILES}, asked
    assert (retry["content_reads"], retry["content_bytes"]) == (0, 0)
    assert retry["uploads"] == first_try["uploads"]

    # One attachment per patient, the one the retry returned as reused.
    [(value,)] = stack.query(
        "SELECT value FROM xcom WHERE dag_id = ? AND run_id = 'r' AND key = 'return_value'", RETRY_DAG_ID
    )
    results = {result["patient_id"]: result for result in json.loads(str(value))}
    for patient in digests:
        (record,) = hook.list_attachments(patient_id=patient, include_archived=True)
        assert str(record["id"]) == str(results[patient]["attachment_id"])
        assert "task state store recorded" in results[patient]["reused"]

    # What carried it: the task state store, as Airflow's API shows it; no journal on either worker.
    answer = requests.get(
        f"http://127.0.0.1:{stack.port}/api/v2/dags/{RETRY_DAG_ID}/dagRuns/r/taskInstances/upload/state-store",
        timeout=30,
    )
    answer.raise_for_status()
    entries = [entry["value"] for entry in answer.json()["task_state_store"]]
    assert len(entries) == FILES
    for entry in entries:
        assert entry["sha256"] == digests[entry["patient_id"]]
        assert str(entry["attachment_id"]) == str(results[entry["patient_id"]]["attachment_id"])
        assert entry["create_sent_at"]
    for worker in ("try-1", "try-2"):
        assert (deployment.state_root / worker / "rate").is_dir(), worker  # each try's own directory
        assert not list((deployment.state_root / worker).glob("uploads/*")), worker
