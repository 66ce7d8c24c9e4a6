"""Shared test set-up: an isolated AIRFLOW_HOME, and the sandbox as a real process on loopback."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Airflow reads AIRFLOW_HOME when first imported, so isolate it before anything imports airflow.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="cliniko-tests-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

REPO = Path(__file__).resolve().parents[1]
SANDBOX_KEY = "sandbox-test-key-au1"
USER_AGENT = "Cliniko Provider Tests (tests@cliniko-provider.example)"


def connection_json(api_key: str, host: str | None = None, **extra: Any) -> str:
    """Return an ``AIRFLOW_CONN_*`` value for a Cliniko connection.

    :param api_key: the API key.
    :param host: the base URL override (e.g. the sandbox).
    :param extra: extra fields; ``user_agent`` defaults to the tests' agent.
    """
    conn: dict[str, Any] = {
        "conn_type": "cliniko",
        "password": api_key,
        "extra": {"user_agent": USER_AGENT, **extra},
    }
    if host:
        conn["host"] = host
    return json.dumps(conn)


FAST_TEST_TIMEOUT = 120  # seconds; a test marked slow gets SLOW_TEST_TIMEOUT unless it sets its own
SLOW_TEST_TIMEOUT = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test a timeout (pytest-timeout), so a hang fails the test instead of stalling CI.

    Tests that use the sandbox process are marked ``sandbox``: ``make mutation`` leaves them out
    (``-k "not sandbox"``), because the process does not run the mutant under test.
    """
    for item in items:
        if "sandbox" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sandbox)
        if item.get_closest_marker("timeout") is None:
            slow = item.get_closest_marker("slow") is not None
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT if slow else FAST_TEST_TIMEOUT))


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Any]:
    """One sandbox process for the session (fast processing, generous rate limit)."""
    from cliniko_provider.sandbox.process import SandboxProcess

    with SandboxProcess(
        "--api-key",
        SANDBOX_KEY,
        "--processing-delay",
        "0.2",
        "--rate-limit",
        "100000/60",
    ) as process:
        yield process


@pytest.fixture
def sandbox_conn(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``cliniko_default`` at the session sandbox; return the connection id."""
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(SANDBOX_KEY, sandbox.base_url))
    return "cliniko_default"


@pytest.fixture
def unpaced_sandbox_hook(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A hook on the session sandbox whose rate budget does not pace a test's few hundred requests."""
    from cliniko_provider.hooks.cliniko import ClinikoHook

    conn = connection_json(SANDBOX_KEY, sandbox.base_url, requests_per_minute=100_000)
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", conn)
    return ClinikoHook()


@pytest.fixture(autouse=True)
def _own_private_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Give every test its own private state directory (machine-wide rate budget, upload journal), so no
    test waits on another's requests or finds another's uploads."""
    from cliniko_provider.utils.budget import PROCESS_BUDGETS

    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("CLINIKO_RATE_STATE_DIR", raising=False)
    PROCESS_BUDGETS.clear()
    yield
    PROCESS_BUDGETS.clear()


@pytest.fixture(scope="session", autouse=True)
def _supervisor_comms_outside_a_task() -> None:
    """Let Airflow 3.1's async connection lookup reach the secrets backends outside a task.

    Its ``Connection.async_get`` imports ``task_runner.SUPERVISOR_COMMS`` before trying the backends
    (environment variables included), and that name exists only inside a task or the triggerer; later
    Airflow versions import it lazily. Tests call triggers directly, so give the name a value.
    """
    from airflow.sdk.execution_time import task_runner

    if not hasattr(task_runner, "SUPERVISOR_COMMS"):
        task_runner.SUPERVISOR_COMMS = None  # type: ignore[attr-defined]
