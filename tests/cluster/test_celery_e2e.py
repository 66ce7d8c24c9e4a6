"""The nightly export on a real CeleryExecutor: scheduler, DAG processor, API server and triggerer on one
"machine", two Celery workers as two more (each its own HOME and temp dir, so its own machine budget),
Redis as the Celery broker and, through ``redis_conn_id``, as the key's cluster budget. 200 reports
against the sandbox at Cliniko's real 200 requests a minute: no answer 429 while Redis is up. Then the
budget's Redis is killed mid-run: the run completes on the machine budgets, every report attached
exactly once, and the workers' logs carry the fallback warning.

The budget has a Redis of its own (a second redis-server): killing the broker would stop Celery itself,
which is not what this test is about.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.process import SandboxProcess
from tests.conftest import REPO, connection_json
from tests.e2e.stack import AirflowStack
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

DAG_ID = "cliniko_nightly_report_export"
KEY = "celery-e2e-key-au1"
REPORTS = 200
BATCH_SIZE = 20  # ten upload tasks, so both workers take some
KILL_AFTER = 80  # attachments created when the budget's Redis is killed
WORKERS = ("worker1", "worker2")
FALLBACK_WARNING = "Redis connection 'budget_redis' cannot be used"
CREATE_ROUTE = "POST /v1/patient_attachments"


class CeleryCluster(AirflowStack):
    """An :class:`AirflowStack` on the CeleryExecutor, plus Celery workers, each a "machine" of its own.

    :param home: the AIRFLOW_HOME of the scheduler's machine.
    :param dags_folder: the DAG folder.
    :param broker_url: the Celery broker (Redis).
    :param env: extra environment for every process.
    """

    def __init__(self, home: Path, dags_folder: Path, broker_url: str, env: dict[str, str]) -> None:
        super().__init__(home, dags_folder, env)
        self.env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__PARALLELISM": "16",
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": broker_url.rsplit("/", 1)[0] + "/1",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "TMPDIR": str(self.machine_dir("scheduler") / "tmp"),
                "HOME": str(self.machine_dir("scheduler") / "home"),
            }
        )
        # Each machine's budget and journal live in its own temp dir, not in one the test process set.
        self.env.pop("CLINIKO_STATE_DIR", None)
        self.env.pop("CLINIKO_RATE_STATE_DIR", None)

    def machine_dir(self, name: str) -> Path:
        return self.home.parent / "machines" / name

    def start(self) -> CeleryCluster:
        for part in ("tmp", "home"):
            (self.machine_dir("scheduler") / part).mkdir(parents=True, exist_ok=True)
        super().start()
        airflow = str(Path(sys.executable).with_name("airflow"))
        for name in WORKERS:
            machine = self.machine_dir(name)
            for part in ("tmp", "home", "logs"):
                (machine / part).mkdir(parents=True, exist_ok=True)
            env = {
                **self.env,
                "TMPDIR": str(machine / "tmp"),
                "HOME": str(machine / "home"),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(machine / "logs"),
            }
            args = [airflow, "celery", "worker", "--concurrency", "4", "--skip-serve-logs"]
            args += ["--celery-hostname", f"{name}@%h", "--without-mingle", "--without-gossip"]
            log = (self.home / f"{name}.log").open("wb")
            self.processes[name] = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def task_logs(self, machine: str) -> str:
        logs = self.machine_dir(machine) / "logs"
        return "\n".join(path.read_text(errors="replace") for path in logs.rglob("*.log"))


@pytest.mark.timeout(1500)  # 14 min seen on this 2-core machine shared with six other test runs
def test_nightly_export_on_celery_workers_shares_one_budget_and_survives_losing_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        RedisServer(tmp_path / "broker") as broker,
        RedisServer(tmp_path / "budget") as budget_redis,
        SandboxProcess(
            "--api-key", KEY, "--processing-delay", "2", "--rate-limit", "100000/60", data_dir=tmp_path / "sb"
        ) as sandbox,
    ):
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, sandbox.base_url))
        hook = ClinikoHook()
        rows, patient_ids = [], {}
        for number in range(REPORTS):
            reference = f"CEL-{number:04d}"
            patient = hook.create_patient("Celery", f"Patient {number}", old_reference_id=reference)
            patient_ids[str(patient["id"])] = reference
            rows.append({"reference": reference, "email": f"cel{number}@e2e.example", "name": f"P {number}"})
        set_up_done = time.monotonic()
        sandbox_post(sandbox, "faults", {"rate_limit": "200/60"})

        connection = connection_json(KEY, sandbox.base_url, redis_conn_id="budget_redis")
        env = {
            "AIRFLOW_CONN_CLINIKO_DEFAULT": connection,
            "AIRFLOW_CONN_BUDGET_REDIS": budget_redis.connection_json(),
        }
        stack = CeleryCluster(tmp_path / "airflow", REPO / "dags_examples", broker.url, env)
        with stack:
            stack.wait_for(
                lambda: stack.check_alive() or stack.dag_is_parsed(DAG_ID), 180, f"{DAG_ID} to be parsed"
            )
            # The sandbox's window forgets the set-up's requests before the run starts.
            time.sleep(max(0.0, set_up_done + 61 - time.monotonic()))
            sandbox_post(sandbox, "stats/reset", {})
            conf = {
                "patients": rows,
                "report_root": (tmp_path / "reports").as_uri(),
                "batch_size": BATCH_SIZE,
            }
            started = time.monotonic()
            stack.cli("dags", "trigger", DAG_ID, "--run-id", "celery", "--conf", json.dumps(conf))

            def uploads_done() -> int:
                stack.check_alive()
                return int(sandbox_get(sandbox, "stats")["requests_by_route"].get(CREATE_ROUTE, 0))

            stack.wait_for(lambda: uploads_done() >= KILL_AFTER, 600, f"{KILL_AFTER} uploads", interval=1)
            before_kill = sandbox_get(sandbox, "stats")
            killed_at = time.monotonic()
            budget_redis.kill()
            stack.wait_for(
                lambda: stack.check_alive() or stack.run_state(DAG_ID, "celery") in ("success", "failed"),
                600,
                "the DAG run to finish",
                interval=2,
            )
            took = time.monotonic() - started
            states = stack.task_states(DAG_ID, "celery")
            state = stack.run_state(DAG_ID, "celery")
            if state != "success":
                pytest.fail(
                    f"run ended {state}; states {Counter(s for *_, s in states)}\n"
                    f"scheduler:\n{stack.log_tail('scheduler')}\nworker1:\n{stack.log_tail('worker1')}"
                )
            worker_logs = {name: stack.task_logs(name) for name in WORKERS}
        after = sandbox_get(sandbox, "stats")
        sandbox_post(sandbox, "faults", {"rate_limit": "100000/60"})
        attached = Counter(
            str(item["patient"]["links"]["self"]).rsplit("/", 1)[1]
            for item in hook.list_attachments(include_archived=True)
        )

    api = sum(count for route, count in after["requests_by_route"].items() if " /v1/" in route)
    limited_after_kill = after["rate_limited"] - before_kill["rate_limited"]
    print(
        f"Celery run: {REPORTS} reports in {took:.0f} s (Redis killed after {killed_at - started:.0f} s); "
        f"API requests {api}, {api / took * 60:.0f}/min on average; 429 answers: "
        f"{before_kill['rate_limited']} with Redis, {limited_after_kill} after it was killed"
    )
    uploads = [state for task, _, state in states if task == "upload_reports"]
    assert uploads == ["success"] * (REPORTS // BATCH_SIZE)
    assert before_kill["rate_limited"] == 0  # one budget for both workers and the triggerer
    assert attached == Counter(dict.fromkeys(patient_ids, 1))  # every report once: none lost, none twice
    assert all(worker_logs.values()), "both workers ran uploads"
    assert any(FALLBACK_WARNING in text for text in worker_logs.values())
    # The triggerer (the async path, one long-lived process) warns at most once, however often it polled
    # since. Where its line lands (triggerer.log or a trigger's own log file) is Airflow's routing, and
    # the triggerer writes trigger log files unreliably, so both are counted and only the bound is held.
    triggerer_side = [tmp_path / "airflow" / "triggerer.log", *(tmp_path / "airflow" / "logs").rglob("*.log")]
    assert sum(path.read_text(errors="replace").count(FALLBACK_WARNING) for path in triggerer_side) <= 1


def sandbox_post(sandbox: SandboxProcess, what: str, body: dict[str, str] | None) -> None:
    requests.post(f"{sandbox.root_url}/_sandbox/{what}", json=body, timeout=10).raise_for_status()


def sandbox_get(sandbox: SandboxProcess, what: str) -> dict[str, Any]:
    answer = requests.get(f"{sandbox.root_url}/_sandbox/{what}", timeout=10)
    answer.raise_for_status()
    return dict(answer.json())
