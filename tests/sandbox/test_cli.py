"""The command line a newcomer meets: the extra's packages, the default key, the accepted keys."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from cliniko_provider.sandbox import cli
from cliniko_provider.sandbox.config import DEFAULT_API_KEY

COMMAND = [sys.executable, "-m", "cliniko_provider.sandbox"]


@pytest.mark.parametrize("missing", [["boto3"], ["starlette", "uvicorn"]])
def test_refuses_to_start_without_the_sandbox_extra(
    missing: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in missing else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--port", "0"])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert message == (
        f"cliniko-sandbox: {', '.join(missing)} not installed. "
        "Fix: pip install 'airflow-provider-cliniko[sandbox]'\n"
    )


def test_with_the_extra_nothing_is_missing() -> None:
    assert cli.missing_extra_modules() == []


def test_help_and_start_up_name_the_same_default_key(tmp_path: Path) -> None:
    help_text = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, timeout=30).stdout
    assert f"(default: {DEFAULT_API_KEY})" in " ".join(help_text.split())
    stderr = start_up_stderr(tmp_path)
    assert f"Cliniko sandbox accepts the API key: {DEFAULT_API_KEY} (shard au1)\n" in stderr


def start_up_stderr(data_dir: Path, *options: str) -> str:
    """Start the sandbox, wait for its ready line, stop it; return what it wrote to stderr."""
    process = subprocess.Popen(
        [*COMMAND, "--port", "0", "--data-dir", str(data_dir), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("Cliniko sandbox ready: ")
    process.terminate()
    return process.communicate(timeout=10)[1]


def test_start_up_lists_every_accepted_key(tmp_path: Path) -> None:
    stderr = start_up_stderr(tmp_path, "--api-key", "dev-au2", "--api-key", "old")
    assert "Cliniko sandbox accepts the API keys: dev-au2 (shard au2), old (shard au1)\n" in stderr


def test_the_readme_shows_what_the_sandbox_prints(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme[
        readme.index("cliniko-sandbox --port 8765 --data-dir ./sandbox-data --seed-example-patients") :
    ]
    shown = [line[2:].split("  (on stderr)")[0].rstrip() for line in block.splitlines()[1:4]]
    stderr = start_up_stderr(tmp_path, "--seed-example-patients")
    assert shown[0] in stderr and shown[1] in stderr  # the accepted key, the seeded patients
    assert shown[2].startswith("Cliniko sandbox ready: http://127.0.0.1:8765/v1")
    assert start_up_stderr(tmp_path, "--seed-example-patients").count("(0 created now)") == 1  # idempotent
