"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from cliniko_provider import __version__

# Literals, not imports from the package: Airflow imports this module while it discovers providers.
USER_AGENT_EXAMPLE = "Acme Reports (ops@acme.example)"
API_KEY_LOCATION = "My Info > Manage API keys"


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata: hooks, operators, sensors, triggers, the ``@task.cliniko_upload``
    decorator, the ``cliniko`` asset scheme and the connection form."""
    integration = "Cliniko"
    info: dict[str, Any] = {
        "package-name": "airflow-provider-cliniko",
        "name": "Cliniko",
        "description": "Upload patient attachments to `Cliniko <https://www.cliniko.com/>`__ "
        "and wait until Cliniko has processed them.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": integration,
                "external-doc-url": "https://docs.api.cliniko.com/",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": integration, "python-modules": ["cliniko_provider.hooks.cliniko"]}],
        "operators": [
            {
                "integration-name": integration,
                "python-modules": [
                    "cliniko_provider.operators.cliniko",
                    "cliniko_provider.operators.reconcile",
                ],
            }
        ],
        "sensors": [
            {"integration-name": integration, "python-modules": ["cliniko_provider.sensors.cliniko"]}
        ],
        "extra-links": ["cliniko_provider.links.cliniko.ClinikoAttachmentsLink"],
        "triggers": [
            {"integration-name": integration, "python-modules": ["cliniko_provider.triggers.cliniko"]}
        ],
        "task-decorators": [
            {
                "class-name": "cliniko_provider.decorators.cliniko.cliniko_upload_task",
                "name": "cliniko_upload",
            }
        ],
        "asset-uris": [
            {
                "schemes": ["cliniko"],
                "handler": "cliniko_provider.assets.cliniko.sanitize_uri",
                "factory": "cliniko_provider.assets.cliniko.create_asset",
                "to_openlineage_converter": "cliniko_provider.assets.cliniko.convert_asset_to_openlineage",
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "cliniko_provider.hooks.cliniko.ClinikoHook",
                "hook-name": "Cliniko",
                "connection-type": "cliniko",
                "conn-fields": {
                    "user_agent": {
                        "label": "User-Agent",
                        "description": "Required by Cliniko: your own app or company name and a contact "
                        "email, as 'App name (email)'.",
                        # Not nullable: the form marks it required. No "examples": the UI offers those as
                        # one-click values, and a sample name must never reach Cliniko as yours.
                        "schema": {"type": "string", "minLength": 1},
                    },
                    "max_attempts": {
                        "label": "Max attempts",
                        "description": "Attempts per request on 5xx answers and connection errors, 1 to "
                        "20. A 429 is not an attempt: it is waited out.",
                        "schema": {"type": ["integer", "null"], "default": 5, "minimum": 1, "maximum": 20},
                    },
                    "max_rate_limit_wait": {
                        "label": "Max wait on 429 (seconds)",
                        "description": "Longest single wait for a 429 to clear, 0 to 3600 seconds.",
                        "schema": {"type": ["number", "null"], "default": 65, "minimum": 0, "maximum": 3600},
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "description": "Each attempt's total deadline (connect, answer and body), 1 to 3600 "
                        "seconds.",
                        "schema": {"type": ["number", "null"], "default": 60, "minimum": 1, "maximum": 3600},
                    },
                    "requests_per_minute": {
                        "label": "Requests per minute",
                        "description": "The API key's budget, shared by every process that uses the key "
                        "(Cliniko allows 200 a minute per key), 1 to 1,000,000.",
                        "schema": {
                            "type": ["number", "null"],
                            "default": 200,
                            "minimum": 1,
                            "maximum": 1_000_000,
                        },
                    },
                    "redis_conn_id": {
                        "label": "Redis connection id (optional)",
                        "description": "An Airflow Redis connection: every worker and triggerer on every "
                        "machine then shares the key's budget. Empty: shared by one machine's processes.",
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["login", "schema", "port", "extra"],
                    "relabeling": {"password": "API key", "host": "Base URL (optional)"},
                    "placeholders": {
                        "password": f"Your API key, e.g. MS0xLWFi...-au2 (Cliniko: {API_KEY_LOCATION})",
                        "host": "Leave empty for real Cliniko (shard from the key); "
                        "e.g. http://127.0.0.1:8765/v1 for the sandbox",
                        "user_agent": f"App name (email), e.g. {USER_AGENT_EXAMPLE}",
                        "redis_conn_id": "redis_default",
                    },
                },
            }
        ],
    }
    from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS

    if AIRFLOW_V_3_3_PLUS:  # `airflow cliniko ...`; elsewhere the console script `cliniko` does the same
        info["cli"] = ["cliniko_provider.cli.definition.get_cliniko_cli_commands"]
    return info


def connection_fields() -> dict[str, Any]:
    """Return the ``cliniko`` connection type's entry of the metadata (its form)."""
    (connection_type,) = get_provider_info()["connection-types"]
    return dict(connection_type)


def connection_form_widgets() -> dict[str, Any]:
    """Return the form's extra fields as wtforms fields, for Airflow 3.1 (3.2+ reads ``conn-fields``).

    Built from ``conn-fields``, so the two forms cannot drift apart. Imports wtforms, which only the UI
    has; Airflow catches the ImportError elsewhere.
    """
    from wtforms import IntegerField, StringField
    from wtforms.validators import InputRequired, NumberRange, Optional

    widgets: dict[str, Any] = {}
    for name, spec in connection_fields()["conn-fields"].items():
        schema = spec["schema"]
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        required = "null" not in types
        label = spec["label"] + (" (required)" if required else "")
        validators: list[Any] = [InputRequired()] if required else [Optional()]
        if "minimum" in schema:
            validators.append(NumberRange(min=schema["minimum"], max=schema.get("maximum")))
        field = IntegerField if "integer" in types else StringField  # 3.1 allows no float field
        widgets[name] = field(
            label,
            validators=validators,
            description=spec.get("description", ""),
            default=schema.get("default"),
        )
    return widgets


def ui_field_behaviour() -> dict[str, Any]:
    """Return the standard fields' behaviour (hidden, relabelled, placeholders) the Airflow 3.1 way."""
    behaviour = connection_fields()["ui-field-behaviour"]
    return {
        "hidden_fields": list(behaviour["hidden-fields"]),
        "relabeling": dict(behaviour["relabeling"]),
        "placeholders": dict(behaviour["placeholders"]),
    }
