"""Lineage datasets: the file as common-io names it, the attachment under the API host; none without
the OpenLineage provider."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath

from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator
from cliniko_provider.utils.lineage import attachment_dataset, source_dataset, upload_lineage


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
