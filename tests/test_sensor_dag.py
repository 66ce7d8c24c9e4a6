"""End to end in a real ``airflow dags test`` run: upload, then the deferrable sensor (trigger in-process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SANDBOX_KEY, connection_json
from tests.helpers import env_with, sandbox_faults


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home: Path = tmp_path_factory.mktemp("sensor-dag-airflow-home")
    env = env_with(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "tests" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=str(REPO),
        CLINIKO_STATE_DIR=str(home / "state"),
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    return env


@pytest.mark.slow  # about a minute: the Airflow database, then a whole DAG run in a subprocess
def test_deferrable_sensor_in_airflow_dags_test(sandbox: Any, airflow_env: dict[str, str]) -> None:
    env = {**airflow_env, "AIRFLOW_CONN_CLINIKO_DEFAULT": connection_json(SANDBOX_KEY, sandbox.base_url)}
    with sandbox_faults(sandbox, processing_delay=4.0):  # still processing when the sensor first looks
        run = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", "cliniko_sensor_deferrable"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "deferring" in output  # the sensor did defer...
    assert "success" in output.split("deferring", 1)[1]  # ...and the trigger fired
    assert "PROCESSED RECORD" in output
    assert SANDBOX_KEY not in output
