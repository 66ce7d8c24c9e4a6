"""A real Airflow 3 deployment for end-to-end tests: API server, scheduler, DAG processor and triggerer
as separate processes (LocalExecutor, SQLite), sharing one AIRFLOW_HOME.

State is read straight from the SQLite metadata database, so the test needs no API token.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import requests

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AirflowStack:
    """Start, query and stop a real Airflow deployment.

    :param home: the AIRFLOW_HOME to use (created; its SQLite database is migrated on start).
    :param dags_folder: the DAG folder the DAG processor parses.
    :param env: extra environment (connections, pools are created with :meth:`cli`).
    """

    def __init__(self, home: Path, dags_folder: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.env = {
            **os.environ,
            **(env or {}),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # Only the runs a test triggers: no scheduled runs racing them.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def database(self) -> Path:
        return self.home / "airflow.db"

    def cli(self, *args: str, timeout: float = 180) -> str:
        """Run an ``airflow`` CLI command against this deployment; return its stdout."""
        airflow = str(Path(sys.executable).with_name("airflow"))
        result = subprocess.run(
            [airflow, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        return result.stdout

    def start(self) -> AirflowStack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("db", "migrate")
        airflow = str(Path(sys.executable).with_name("airflow"))
        for component in COMPONENTS:
            args = [airflow, component] + (
                ["--port", str(self.port), "--workers", "1"] if component == "api-server" else []
            )
            log = (self.home / f"{component}.log").open("wb")
            self.processes[component] = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_for(self._api_healthy, 120, "the API server to answer")
        return self

    def _api_healthy(self) -> bool:
        self.check_alive()
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/api/v2/monitor/health", timeout=2).ok
        except requests.RequestException:
            return False

    def check_alive(self) -> None:
        """Raise if a component died, with the tail of its log."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, component: str, lines: int = 60) -> str:
        path = self.home / f"{component}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def wait_for(self, condition: object, timeout: float, what: str, interval: float = 1.0) -> None:
        """Poll ``condition()`` until it is true, raising with a clear message on timeout."""
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Read the metadata database (SQLite) directly."""
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30) as db:
            return list(db.execute(sql, params))

    def dag_is_parsed(self, dag_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", dag_id))

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return str(rows[0][0]) if rows else None

    def task_states(self, dag_id: str, run_id: str) -> list[tuple[str, int, str | None]]:
        rows = self.query(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ? "
            "ORDER BY task_id, map_index",
            dag_id,
            run_id,
        )
        return [
            (str(task), int(str(index)), None if state is None else str(state)) for task, index, state in rows
        ]

    def restart(self, component: str) -> None:
        """Kill one component with SIGKILL and start it again (as after a crash)."""
        process = self.processes[component]
        os.killpg(process.pid, 9)
        process.wait()
        airflow = str(Path(sys.executable).with_name("airflow"))
        log = (self.home / f"{component}.log").open("ab")
        self.processes[component] = subprocess.Popen(
            [airflow, component], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        self.processes.clear()

    def __enter__(self) -> AirflowStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
