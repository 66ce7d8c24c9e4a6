"""`cliniko-sandbox --seed-example-patients`: the example DAG's patients, once, whatever the restarts."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.sandbox.examples import EXAMPLE_PATIENTS
from cliniko_provider.sandbox.process import SandboxProcess
from tests.conftest import connection_json

KEY = "seed-test-key-uk1"


def test_the_seed_is_the_example_dags_patients_less_the_one_it_skips() -> None:
    example = importlib.import_module("dags_examples.cliniko_nightly_report_export")
    expected = [row for row in example.SAMPLE_PATIENTS if row["reference"] != "WH-9999"]
    seeded = [
        {
            "reference": row["reference"],
            "email": row["email"],
            "name": f"{row['first_name']} {row['last_name']}",
        }
        for row in EXAMPLE_PATIENTS
    ]
    assert seeded == expected


def test_seeds_the_example_patients_once_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SandboxProcess("--api-key", KEY, "--seed-example-patients", data_dir=tmp_path) as sandbox:
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, sandbox.base_url))
        hook = ClinikoHook()
        found = hook.match_patients([row["reference"] for row in EXAMPLE_PATIENTS], [])
        assert sorted(found) == [row["reference"] for row in EXAMPLE_PATIENTS]
        assert found["WH-1001"]["email"] == "ada.lovelace@example.com"
        sandbox.restart()
        assert len(list(hook.find_patients())) == len(EXAMPLE_PATIENTS)
    # Without the option, a fresh sandbox has no patients.
    with SandboxProcess("--api-key", KEY, data_dir=tmp_path / "plain") as sandbox:
        monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, sandbox.base_url))
        assert list(ClinikoHook().find_patients()) == []
