"""The provider registers with Airflow: metadata schema, connection form, and the CLI listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cliniko_provider.get_provider_info import get_provider_info


def test_provider_info_validates_against_airflows_schema() -> None:
    import jsonschema
    from airflow import providers_manager

    schema_path = Path(providers_manager.__file__).with_name("provider_info.schema.json")
    jsonschema.validate(get_provider_info(), json.loads(schema_path.read_text()))


def test_connection_form_asks_for_key_base_url_and_user_agent() -> None:
    (conn_type,) = get_provider_info()["connection-types"]
    assert conn_type["connection-type"] == "cliniko"
    assert conn_type["hook-class-name"] == "cliniko_provider.hooks.cliniko.ClinikoHook"
    behaviour = conn_type["ui-field-behaviour"]
    assert behaviour["relabeling"] == {"password": "API key", "host": "Base URL (optional)"}
    assert set(behaviour["hidden-fields"]) == {"login", "schema", "port", "extra"}
    assert "(" in behaviour["placeholders"]["user_agent"]
    assert "user_agent" in conn_type["conn-fields"]


def test_every_module_named_in_the_metadata_imports() -> None:
    import importlib

    info = get_provider_info()
    for section in ("hooks", "operators", "sensors", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)
    module_name, _, class_name = info["connection-types"][0]["hook-class-name"].rpartition(".")
    assert getattr(importlib.import_module(module_name), class_name).conn_type == "cliniko"


def test_airflow_providers_list_shows_the_provider() -> None:
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow), "providers", "list", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        check=True,
    )
    listed = {item["package_name"]: item for item in json.loads(result.stdout)}
    assert listed["airflow-provider-cliniko"]["version"] == "0.1.0"


def test_the_form_has_every_extra_the_settings_read() -> None:
    import dataclasses

    from cliniko_provider.utils.settings import ClinikoSettings

    (conn_type,) = get_provider_info()["connection-types"]
    read_from_extra = {field.name for field in dataclasses.fields(ClinikoSettings)} - {
        "conn_id",
        "api_key",
        "base_url",
    }
    assert set(conn_type["conn-fields"]) == read_from_extra
    redis_field = conn_type["conn-fields"]["redis_conn_id"]
    assert "default" not in redis_field["schema"]  # empty by default: the machine budget
    assert conn_type["conn-fields"]["requests_per_minute"]["schema"]["default"] == 200
