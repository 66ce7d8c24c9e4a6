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
    for dotted in info["extra-links"]:
        module_name, _, class_name = dotted.rpartition(".")
        assert getattr(importlib.import_module(module_name), class_name)().name == "Cliniko attachments"
    module_name, _, class_name = info["connection-types"][0]["hook-class-name"].rpartition(".")
    assert getattr(importlib.import_module(module_name), class_name).conn_type == "cliniko"


def test_airflow_providers_list_shows_the_provider_as_the_readme_says() -> None:
    from cliniko_provider import __version__

    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow), "providers", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        check=True,
    )
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("airflow-provider-cliniko ")]
    cells = [cell.strip() for cell in line.split("|")]
    assert cells[0] == "airflow-provider-cliniko" and cells[2] == __version__
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "airflow providers list | grep cliniko\n# " + " | ".join(cells) + "\n" in readme


def test_the_version_moves_with_the_changelog() -> None:
    """A dev version while the changelog has an Unreleased section; the release's number once released."""
    import re

    from cliniko_provider import __version__

    root = Path(__file__).parents[1]
    assert f'\nversion = "{__version__}"\n' in (root / "pyproject.toml").read_text()
    changelog = (root / "CHANGELOG.md").read_text()
    released = re.findall(r"^## (\d+\.\d+\.\d+)$", changelog, re.M)
    if "## Unreleased" in changelog:
        assert ".dev" in __version__ and __version__.split(".dev")[0] not in released
    else:
        assert released[0] == __version__


def test_the_readme_install_lines_name_tested_constraint_sets() -> None:
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    for airflow_version, constraints in (
        ("3.3.2", "constraints.txt"),
        ("3.1.8", ".ci/constraints-py310-af31.txt"),
    ):
        command = f"pip install apache-airflow=={airflow_version} ./airflow-provider-cliniko -c "
        assert f"{command}airflow-provider-cliniko/{constraints}\n" in readme
        assert f"apache-airflow=={airflow_version}\n" in (root / constraints).read_text()


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


def test_user_agent_is_required_and_shows_its_shape() -> None:
    from cliniko_provider.utils.settings import USER_AGENT_EXAMPLE, USER_AGENT_PATTERN

    (conn_type,) = get_provider_info()["connection-types"]
    schema = conn_type["conn-fields"]["user_agent"]["schema"]
    assert schema["type"] == "string"  # no "null": Airflow's form marks the field required
    assert schema["minLength"] == 1
    # A placeholder, never a value: Airflow 3.2+ offers a schema's examples as one-click values.
    assert "examples" not in schema and "default" not in schema
    assert USER_AGENT_EXAMPLE in conn_type["ui-field-behaviour"]["placeholders"]["user_agent"]
    assert USER_AGENT_PATTERN.match(USER_AGENT_EXAMPLE)


def test_the_help_texts_say_what_the_settings_do() -> None:
    from cliniko_provider.utils import settings

    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    assert "A 429 is not an attempt" in fields["max_attempts"]["description"]
    assert "429" in fields["max_rate_limit_wait"]["description"]
    limits = {
        "max_attempts": (1, settings.MAX_ATTEMPTS),
        "max_rate_limit_wait": (0, settings.MAX_RATE_LIMIT_WAIT),
        "timeout": (1, settings.MAX_TIMEOUT),
        "requests_per_minute": (1, settings.MAX_REQUESTS_PER_MINUTE),
    }
    for name, (low, high) in limits.items():
        schema = fields[name]["schema"]
        assert (schema["minimum"], schema["maximum"]) == (low, high), name
        assert f"{low} to {int(high)}" in fields[name]["description"].replace(",", ""), name


def test_the_api_key_location_is_the_same_in_form_readme_and_errors() -> None:
    from cliniko_provider.exceptions import ClinikoAuthError
    from cliniko_provider.utils.settings import API_KEY_LOCATION

    assert API_KEY_LOCATION == "My Info > Manage API keys"
    (conn_type,) = get_provider_info()["connection-types"]
    assert API_KEY_LOCATION in conn_type["ui-field-behaviour"]["placeholders"]["password"]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"*{API_KEY_LOCATION}*" in readme
    assert "Integrations" not in readme
    assert API_KEY_LOCATION in str(ClinikoAuthError(401, "HTTP Basic: Access denied", request="GET /user"))


def test_the_connection_form_airflow_serves_to_its_ui() -> None:
    """Airflow 3.2+ reads conn-fields; 3.1 calls the hook's get_connection_form_widgets and
    get_ui_field_behaviour (with wtforms mocked, as its UI does): both forms must carry every field."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    (meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "cliniko"]
    (conn_type,) = get_provider_info()["connection-types"]
    assert meta.extra_fields is not None
    assert set(meta.extra_fields) == set(conn_type["conn-fields"])
    user_agent = meta.extra_fields["user_agent"]
    assert user_agent["schema"]["title"].startswith("User-Agent")
    if "null" in user_agent["schema"]["type"]:  # Airflow 3.1: its form has no required mark, the label does
        assert user_agent["schema"]["title"] == "User-Agent (required)"
    assert meta.extra_fields["requests_per_minute"]["value"] == 200
    assert meta.standard_fields is not None
    assert meta.standard_fields.password is not None
    assert meta.standard_fields.password.title == "API key"
    assert "My Info > Manage API keys" in (meta.standard_fields.password.placeholder or "")
    assert meta.standard_fields.port is not None and meta.standard_fields.port.hidden


def test_the_airflow_31_form_is_built_from_conn_fields() -> None:
    from wtforms.validators import InputRequired, NumberRange, Optional

    from cliniko_provider.hooks.cliniko import ClinikoHook

    widgets = ClinikoHook.get_connection_form_widgets()
    (conn_type,) = get_provider_info()["connection-types"]
    assert set(widgets) == set(conn_type["conn-fields"])
    user_agent = widgets["user_agent"].kwargs
    assert any(isinstance(v, InputRequired) for v in user_agent["validators"])
    attempts = widgets["max_attempts"]
    assert attempts.field_class.__name__ == "IntegerField"
    assert any(isinstance(v, Optional) for v in attempts.kwargs["validators"])
    assert [(v.min, v.max) for v in attempts.kwargs["validators"] if isinstance(v, NumberRange)] == [(1, 20)]
    assert ClinikoHook.get_ui_field_behaviour() == {
        "hidden_fields": conn_type["ui-field-behaviour"]["hidden-fields"],
        "relabeling": conn_type["ui-field-behaviour"]["relabeling"],
        "placeholders": conn_type["ui-field-behaviour"]["placeholders"],
    }


def test_the_api_server_serves_the_form_without_importing_the_hook(tmp_path: Path) -> None:
    """Airflow 3.2+ builds the connection form from the metadata alone: neither the hook nor wtforms is
    imported (3.1 has no such path and imports the hook, as before)."""
    probe = """
import json, sys
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
from airflow.providers_manager import ProvidersManager
(meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "cliniko"]
print(json.dumps({
    "metadata_path": hasattr(ProvidersManager, "_load_ui_metadata"),
    "fields": sorted(meta.extra_fields or {}),
    "hook_name": meta.hook_name,
    "hook_imported": "cliniko_provider.hooks.cliniko" in sys.modules,
    "wtforms_imported": "wtforms" in sys.modules,
    "cliniko_modules": sorted(m for m in sys.modules if m.startswith("cliniko_provider")),
}))
"""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    (conn_type,) = get_provider_info()["connection-types"]
    assert seen["fields"] == sorted(conn_type["conn-fields"])
    assert seen["hook_name"] == "Cliniko"
    if seen["metadata_path"]:
        assert not seen["hook_imported"], seen["cliniko_modules"]
        assert not any(name.startswith("cliniko_provider.hooks") for name in seen["cliniko_modules"])
        assert not seen["wtforms_imported"]
