"""Lineage datasets: the file as common-io names it, the attachment under the API host; none without
the OpenLineage provider."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath

from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator, ClinikoBatchUploadOperator
from cliniko_provider.utils.lineage import (
    MAX_FILES_NAMED,
    attachment_dataset,
    batch_lineage,
    source_dataset,
    upload_lineage,
)


def common_io_name(uri: str) -> tuple[str, str]:
    """What ``FileTransferOperator.get_openlineage_facets_on_start`` reports for ``uri``."""
    path = ObjectStoragePath(uri)
    return path.namespace, path.key


def test_a_local_path_is_named_as_its_file_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "a report.csv"
    report.write_text("x")
    assert source_dataset(str(report)) == ("file", str(report).lstrip("/"))
    assert source_dataset(str(report)) == common_io_name(f"file://{report}")
    monkeypatch.chdir(tmp_path)
    assert source_dataset("a report.csv") == ("file", str(report).lstrip("/"))  # relative: made absolute


def test_object_storage_uris_are_named_as_common_io_names_them(tmp_path: Path) -> None:
    for uri in ("s3://reports/2026/a.pdf", "memory://bucket/dir/b.csv", f"file://{tmp_path}/c.csv"):
        assert source_dataset(uri) == common_io_name(uri)
    assert source_dataset("s3://reports/2026/a.pdf") == ("s3://reports", "2026/a.pdf")


def test_a_percent_encoded_file_uri_is_named_as_the_file_read(tmp_path: Path) -> None:
    report = tmp_path / "a report.csv"
    report.write_text("x")
    assert source_dataset(report.as_uri()) == ("file", str(report).lstrip("/"))
    literal = tmp_path / "100%25.csv"  # a name that really holds '%25' stays literal
    literal.write_text("x")
    assert source_dataset(f"file://{literal}") == ("file", str(literal).lstrip("/"))


@pytest.mark.parametrize(
    ("base_url", "namespace"),
    [
        ("https://api.au1.cliniko.com/v1", "cliniko://api.au1.cliniko.com"),
        ("http://127.0.0.1:8765/v1", "cliniko://127.0.0.1:8765"),
        ("https://proxy.example:8443/cliniko/v1", "cliniko://proxy.example:8443"),
    ],
)
def test_the_attachment_is_named_under_the_api_host(base_url: str, namespace: str) -> None:
    assert attachment_dataset(base_url, "12", "34") == (namespace, "patients/12/attachments/34")


def test_upload_lineage_has_the_file_in_and_the_attachment_out(tmp_path: Path) -> None:
    lineage = upload_lineage("s3://reports/a.pdf", "https://api.uk2.cliniko.com/v1", "12", "34")
    assert lineage is not None
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://reports", "a.pdf")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("cliniko://api.uk2.cliniko.com", "patients/12/attachments/34")
    ]


def test_nothing_without_the_openlineage_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", None)
    assert upload_lineage("s3://reports/a.pdf", "https://api.au1.cliniko.com/v1", "12", "34") is None


def test_operator_reports_nothing_before_it_uploaded() -> None:
    operator = ClinikoAttachmentUploadOperator(task_id="t", patient_id="12", file_path="/tmp/a.csv")
    assert operator.get_openlineage_facets_on_complete(None) is None


def test_operator_reports_what_it_uploaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLINIKO_DEFAULT",
        '{"conn_type": "cliniko", "password": "k-au3", "extra": {"user_agent": "T (t@example.com)"}}',
    )
    operator = ClinikoAttachmentUploadOperator(task_id="t", patient_id=" 12", file_path="s3://r/a.pdf")
    operator._attachment_id = "34"  # as execute() or execute_complete() leaves it
    lineage = operator.get_openlineage_facets_on_complete(None)
    assert lineage is not None
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("cliniko://api.au3.cliniko.com", "patients/12/attachments/34")
    ]


def batch_results(count: int) -> list[dict[str, object]]:
    return [
        {
            "index": n,
            "patient_id": str(n % 7),
            "file_path": f"s3://r/{n // 500}/f{n}.pdf",
            "attachment_id": str(n),
        }
        for n in range(count)
    ]


def test_a_batch_names_every_file_and_attachment_made_up_to_the_limit() -> None:
    results = batch_results(MAX_FILES_NAMED)
    results.append(
        {"index": -1, "patient_id": "1", "file_path": "/gone.csv", "attachment_id": None, "error": "x"}
    )
    lineage = batch_lineage(results, "https://api.au1.cliniko.com/v1")
    assert lineage is not None
    assert len(lineage.inputs) == len(lineage.outputs) == MAX_FILES_NAMED  # the failed file is not named
    assert (lineage.inputs[7].namespace, lineage.inputs[7].name) == ("s3://r", "0/f7.pdf")
    assert (lineage.outputs[7].namespace, lineage.outputs[7].name) == (
        "cliniko://api.au1.cliniko.com",
        "patients/0/attachments/7",
    )


def test_above_the_limit_a_batch_names_directories_and_one_cliniko() -> None:
    lineage = batch_lineage(batch_results(MAX_FILES_NAMED + 1), "https://api.au1.cliniko.com/v1")
    assert lineage is not None
    assert [(d.namespace, d.name) for d in lineage.inputs] == [
        ("s3://r", "0"),
        ("s3://r", "1"),
        ("s3://r", "2"),
    ]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("cliniko://api.au1.cliniko.com", "attachments")
    ]


def test_a_batch_that_attached_nothing_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        batch_lineage([{"index": 0, "patient_id": "1", "file_path": "/a", "attachment_id": None}], "x")
        is None
    )
    operator = ClinikoBatchUploadOperator(task_id="t", uploads=[])
    assert operator.get_openlineage_facets_on_complete(None) is None
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", None)
    assert batch_lineage(batch_results(1), "https://api.au1.cliniko.com/v1") is None


def test_a_batch_event_of_100_files_stays_small() -> None:
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.serde import Serde

    lineage = batch_lineage(batch_results(100), "https://api.au1.cliniko.com/v1")
    assert lineage is not None
    event = RunEvent(
        eventType=RunState.COMPLETE,
        eventTime="2026-12-07T02:00:00Z",
        run=Run(runId="01939b5e-0000-7000-8000-000000000000"),
        job=Job(namespace="default", name="nightly.upload"),
        producer="test",
        inputs=[InputDataset(namespace=d.namespace, name=d.name) for d in lineage.inputs],
        outputs=[OutputDataset(namespace=d.namespace, name=d.name) for d in lineage.outputs],
    )
    assert len(Serde.to_json(event)) < 30_000  # about 250 bytes a file, input and output
