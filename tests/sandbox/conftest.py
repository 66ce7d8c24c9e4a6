"""Fixtures for the sandbox's own tests: a real server in a subprocess, spoken to over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cliniko_provider.sandbox.process import SandboxProcess
from tests.sandbox.helpers import FAST_ARGS, KEY_AU, KEY_UK, Client


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    """One fast sandbox, two accounts (au1 and uk1), shared by the session."""
    data_dir = tmp_path_factory.mktemp("sandbox-data")
    with SandboxProcess("--api-key", KEY_AU, "--api-key", KEY_UK, *FAST_ARGS, data_dir=data_dir) as process:
        yield process


@pytest.fixture
def api(sandbox: SandboxProcess) -> Client:
    return Client(sandbox, KEY_AU)


@pytest.fixture
def api_uk(sandbox: SandboxProcess) -> Client:
    return Client(sandbox, KEY_UK)


@pytest.fixture
def patient(api: Client) -> dict[str, Any]:
    return api.create_patient()


@pytest.fixture
def start_sandbox(tmp_path: Path) -> Iterator[Callable[..., SandboxProcess]]:
    """Start extra sandboxes with their own arguments; all are stopped after the test."""
    started: list[SandboxProcess] = []

    def start(*args: str, data_dir: Path | None = None) -> SandboxProcess:
        process = SandboxProcess(*args, data_dir=data_dir or tmp_path / f"data-{len(started)}")
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()
