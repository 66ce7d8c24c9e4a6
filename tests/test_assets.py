"""The ``cliniko`` asset scheme: its URI shape (no patient text), its registration with Airflow, its
OpenLineage dataset, and the counts-only ``extra`` the upload operators give their outlets' events."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from airflow.sdk import Asset
from airflow.sdk.execution_time.context import OutletEventAccessors

from cliniko_provider.assets.cliniko import (
    attachment_counts,
    cliniko_attachments,
    convert_asset_to_openlineage,
    create_asset,
    record_asset_events,
    sanitize_uri,
)
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator, ClinikoBatchUploadOperator
from tests.helpers import fake_context, write_file

EXTRA_KEYS = {"files", "attached", "reused", "processed", "failed", "run_id", "cliniko_conn_id"}


def asset_context(run_id: str = "scheduled__2026-12-06") -> Any:
    context = fake_context(run_id=run_id)
    context["run_id"] = run_id
    context["outlet_events"] = OutletEventAccessors()  # Airflow's own: keyed by the asset's unique key
    return context


def test_the_asset_of_a_connection_is_its_attachments() -> None:
    assert cliniko_attachments().uri == "cliniko://cliniko_default/attachments"
    assert cliniko_attachments("cliniko_prod", name="nightly").uri == "cliniko://cliniko_prod/attachments"
    assert create_asset(cliniko_conn_id="x") == cliniko_attachments("x")
    assert Asset(uri="cliniko://x/attachments/").uri == "cliniko://x/attachments"  # Airflow's normalising


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("cliniko://x/patients/12/attachments/34", "assets name no patient"),
        ("cliniko://x/attachments?patient=12", "and a query"),
        ("cliniko://x/attachments/34", "got path '/attachments/34'"),
        ("cliniko://x", "got path"),
        ("cliniko:///attachments", "needs a connection id"),
        ("cliniko://ada@x/attachments", "takes no user info"),
    ],
)
def test_uris_that_could_carry_patient_text_are_refused(uri: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):  # Airflow calls the provider's normaliser
        Asset(uri=uri)
    with pytest.raises(ValueError, match=says):
        sanitize_uri(urlsplit(uri))


def test_airflow_knows_the_scheme_from_the_provider_metadata() -> None:
    try:  # Airflow 3.2+: the task SDK's registry
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime as ProvidersManager
    except ImportError:
        from airflow.providers_manager import ProvidersManager  # type: ignore[assignment]

    manager = ProvidersManager()
    assert manager.asset_uri_handlers["cliniko"] is sanitize_uri
    assert manager.asset_factories["cliniko"] is create_asset
    assert manager.asset_to_openlineage_converters["cliniko"] is convert_asset_to_openlineage


def test_the_openlineage_dataset_is_the_api_hosts_attachments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLINIKO_PROD",
        '{"conn_type": "cliniko", "password": "k-uk2", "extra": {"user_agent": "T (t@example.com)"}}',
    )
    dataset = convert_asset_to_openlineage(cliniko_attachments("cliniko_prod"), None)
    assert (dataset.namespace, dataset.name) == ("cliniko://api.uk2.cliniko.com", "attachments")
    unknown = convert_asset_to_openlineage(cliniko_attachments("no_such_conn"), None)
    assert (unknown.namespace, unknown.name) == ("cliniko://no_such_conn", "attachments")


def test_counts_say_how_many_not_which() -> None:
    results = [
        {"index": 0, "patient_id": "1", "file_path": "/a", "attachment_id": "7", "processed_at": "t"},
        {"index": 1, "patient_id": "1", "file_path": "/b", "attachment_id": "8", "reused": "journal"},
        {
            "index": 2,
            "patient_id": "2",
            "file_path": "/c",
            "attachment_id": None,
            "error": "x",
            "retryable": 0,
        },
    ]
    assert attachment_counts(results) == {"files": 3, "attached": 2, "reused": 1, "processed": 1, "failed": 1}
    assert attachment_counts([]) == {"files": 0, "attached": 0, "reused": 0, "processed": 0, "failed": 0}


def test_only_this_connections_outlets_get_the_extra() -> None:
    context = asset_context()
    mine, other, plain = cliniko_attachments(), cliniko_attachments("other"), Asset(uri="s3://b/k")
    filled = record_asset_events(context, [mine, other, plain], "cliniko_default", {"files": 1})
    assert filled == [mine]
    assert context["outlet_events"][mine].extra == {
        "files": 1,
        "run_id": "scheduled__2026-12-06",
        "cliniko_conn_id": "cliniko_default",
    }
    assert context["outlet_events"][other].extra == {}
    assert context["outlet_events"][plain].extra == {}


def test_a_batch_gives_its_outlet_counts_and_no_patient_text(sandbox_conn: str, tmp_path: Path) -> None:
    hook = ClinikoHook(sandbox_conn)
    patient = str(hook.create_patient("Asset", "Extra")["id"])
    files = [write_file(tmp_path, f"secret-name-{n}.csv", 100 + n, seed=n) for n in range(2)]
    asset = cliniko_attachments(sandbox_conn)
    op = ClinikoBatchUploadOperator(
        task_id="upload",
        uploads=[{"patient_id": patient, "file_path": str(f), "description": "Ada's knee"} for f in files],
        cliniko_conn_id=sandbox_conn,
        outlets=[asset],
    )
    context = asset_context()
    results = op.execute(context)
    extra = context["outlet_events"][asset].extra
    assert set(extra) == EXTRA_KEYS
    assert extra["attached"] == extra["files"] == 2 and extra["failed"] == 0
    text = repr(extra)
    for secret in (patient, "secret-name", "knee", str(results[0]["attachment_id"])):
        assert secret not in text


def test_a_single_upload_gives_its_outlet_counts(sandbox_conn: str, tmp_path: Path) -> None:
    hook = ClinikoHook(sandbox_conn)
    patient = str(hook.create_patient("Asset", "Single")["id"])
    asset = cliniko_attachments(sandbox_conn)
    op = ClinikoAttachmentUploadOperator(
        task_id="upload",
        patient_id=patient,
        file_path=str(write_file(tmp_path, "one.csv", 50)),
        cliniko_conn_id=sandbox_conn,
        outlets=[asset],
    )
    context = asset_context()
    op.execute(context)
    extra = context["outlet_events"][asset].extra
    assert {k: extra[k] for k in ("files", "attached", "reused", "failed")} == {
        "files": 1,
        "attached": 1,
        "reused": 0,
        "failed": 0,
    }
    assert set(extra) == EXTRA_KEYS


def test_the_clinicians_dag_is_scheduled_on_the_asset_and_sums_the_events() -> None:
    from dags_examples import cliniko_tell_clinicians as example

    dag = example.cliniko_tell_clinicians()
    condition = dag.timetable.asset_condition  # type: ignore[attr-defined]
    assert [asset.uri for asset in condition.objects] == ["cliniko://cliniko_default/attachments"]
    events = [
        SimpleNamespace(extra={"files": 10, "attached": 9, "processed": 9, "failed": 1, "run_id": "r1"}),
        SimpleNamespace(extra={"files": 5, "attached": 5, "reused": 2, "processed": 5, "run_id": "r1"}),
    ]
    from airflow.sdk.definitions.asset import AssetUniqueKey
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    # Airflow's own accessor (an Asset is not a dict key on Airflow 3.1: its extra makes it unhashable)
    triggering = TriggeringAssetEventsAccessor(
        {AssetUniqueKey.from_asset(example.NIGHTLY_ATTACHMENTS): events}
    )
    told = dag.get_task("tell_clinicians").python_callable(  # type: ignore[attr-defined]
        triggering_asset_events=triggering
    )
    assert told == {
        "files": 15, "attached": 14, "reused": 2, "processed": 14, "failed": 1, "events": 2, "runs": ["r1"]
    }  # fmt: skip
