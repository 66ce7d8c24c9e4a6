"""Nightly export: one report per patient, attached to the patient's Cliniko record, exactly once.

extract_patients (stands in for your warehouse query) -> generate_reports (one CSV each under
``report_root``, a path or URI every worker reads) -> resolve_patients (Cliniko patient by
``old_reference_id``, then email; skips unknown patients and reports already attached for the date) ->
upload_reports (``@task.cliniko_upload`` mapped over batches of ``batch_size``; waits in the triggerer;
checks what Cliniko holds as ``verify`` says; emits the asset ``cliniko_tell_clinicians`` is scheduled
on) -> summarize (every report uploaded, skipped or failed, with reasons and how each was verified;
merges the night's audit manifest under ``audit_path``). The wiring is ``cliniko_provider.nightly``;
README.md ("The nightly export example") and the API reference say more.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, Param, dag, task

from cliniko_provider.assets.cliniko import cliniko_attachments
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.nightly import in_batches, resolve_reports, run_date, summarize_night, uploads_of

# Seconds between checks while Cliniko processes the files (`make demo` sets 2).
POLL_INTERVAL = float(os.environ.get("CLINIKO_EXAMPLE_POLL_INTERVAL", "15"))
CLINIKO_CONN_ID = "cliniko_default"
NIGHTLY_ATTACHMENTS = cliniko_attachments(CLINIKO_CONN_ID)  # the asset cliniko_tell_clinicians waits for
BATCH_SIZE = 100  # reports per upload task
MAX_ACTIVE_BATCHES = 4  # upload tasks of this DAG running at once
# Where the reports are written unless the run says otherwise: under AIRFLOW_HOME, as Airflow's logs are.
AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser()
REPORT_ROOT = (AIRFLOW_HOME / "cliniko-reports").as_uri()
AUDIT_PATH = str(AIRFLOW_HOME / "cliniko-audit")  # one manifest per upload task, merged per night
Reports = list[dict[str, Any]]

log = logging.getLogger("cliniko_nightly_report_export")  # its lines go to the task log

# A stand-in for the warehouse: who gets a report. ``reference`` is your own patient id, stored in
# Cliniko as the patient's ``old_reference_id``.
SAMPLE_PATIENTS = [
    {"reference": "WH-1001", "email": "ada.lovelace@example.com", "name": "Ada Lovelace"},
    {"reference": "WH-1002", "email": "alan.turing@example.com", "name": "Alan Turing"},
    {"reference": "WH-1003", "email": "grace.hopper@example.com", "name": "Grace Hopper"},
    {"reference": "WH-1004", "email": "edsger.dijkstra@example.com", "name": "Edsger Dijkstra"},
    {"reference": "WH-9999", "email": "nobody@example.com", "name": "Not In Cliniko"},
]
# The trigger form shows and edits the list as JSON, checked against this schema.
PATIENT_SCHEMA = {
    "type": "object",
    "properties": {
        "reference": {"type": "string", "minLength": 1},
        "email": {"type": "string"},
        "name": {"type": "string"},
    },
    "required": ["reference", "email", "name"],
}


def report_description(ds: str, reference: str) -> str:
    """The description shown in Cliniko; also how a re-run recognises reports already attached."""
    return f"Nightly report {ds} ({reference})"


def write_report(path: ObjectStoragePath, patient: dict[str, str], ds: str) -> int:
    """Write one patient's CSV report for the date (made-up measures); return its size in bytes."""
    seed = int(hashlib.sha256(f"{patient['reference']}|{ds}".encode()).hexdigest()[:8], 16)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["date", "patient_reference", "patient_name", "measure", "value", "unit"])
    for index, (measure, unit, low, span) in enumerate(
        [("resting_heart_rate", "bpm", 52, 30), ("sleep_hours", "h", 5, 4), ("steps", "count", 2000, 9000)]
    ):
        value = low + (seed >> (index * 5)) % span
        writer.writerow([ds, patient["reference"], patient["name"], measure, value, unit])
    data = out.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(data)
    return len(data)


@dag(
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "patients": Param(
            SAMPLE_PATIENTS,
            type="array",
            items=PATIENT_SCHEMA,
            title="Patients",
            description="Who gets a report: your own reference (Cliniko's old_reference_id), email, name.",
        ),
        "report_root": Param(
            REPORT_ROOT,
            type="string",
            minLength=1,
            title="Report root",
            description="Where the reports are written: a local path or an object-storage URI (s3://...).",
        ),
        "batch_size": Param(BATCH_SIZE, type="integer", minimum=1, title="Reports per upload task"),
        "audit_path": Param(
            AUDIT_PATH,
            type="string",
            minLength=1,
            title="Audit path",
            description="Where each night's audit manifest goes: a local directory or a URI (s3://...).",
        ),
        "verify": Param(
            "size",
            enum=["size", "content"],
            title="Verification",
            description="'size': Cliniko's processed size and name are checked, at no request. 'content': "
            "each file is also read back and its SHA-256 compared (a request and the file's bytes each).",
        ),
    },
    tags=["cliniko", "example"],
)
def cliniko_nightly_report_export() -> None:
    """Generate, attach and confirm one report per patient for the run date."""

    @task
    def extract_patients(params: Any = None) -> Reports:
        """Return the patients to report on (replace with your warehouse query)."""
        return [dict(row) for row in params["patients"]]

    @task
    def generate_reports(patients: Reports, dag_run: Any = None, params: Any = None) -> Reports:
        """Write one CSV per patient; return where each report is."""
        ds = run_date(dag_run)
        root = ObjectStoragePath(params["report_root"]) / ds
        reports = []
        for patient in patients:
            path = root / f"report-{patient['reference']}-{ds}.csv"
            size = write_report(path, patient, ds)
            reports.append({**patient, "date": ds, "file_path": str(path), "size": str(size)})
        return reports

    @task
    def resolve_patients(reports: Reports, ti: Any = None, params: Any = None) -> list[Reports]:
        """Map reports to patient ids in batches; the skipped ones (with reasons) go to XCom ``skipped``."""
        ds = reports[0]["date"] if reports else ""
        resolved, skipped = resolve_reports(
            ClinikoHook(CLINIKO_CONN_ID),
            reports,
            lambda report: report_description(report["date"], report["reference"]),
            attached_filter=f"description:~Nightly report {ds} (",
        )
        ti.xcom_push(key="skipped", value=skipped)
        return in_batches(resolved, params["batch_size"])

    @task.cliniko_upload(
        cliniko_conn_id=CLINIKO_CONN_ID,
        max_active_tis_per_dag=MAX_ACTIVE_BATCHES,
        max_concurrency=4,
        wait_for_completion=True,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=3600,
        audit_path="{{ params.audit_path }}",
        verify="{{ params.verify }}",
        retries=2,
        retry_delay=pendulum.duration(seconds=30),
        retry_exponential_backoff=2.0,
        outlets=[NIGHTLY_ATTACHMENTS],
    )
    def upload_reports(batch: Reports) -> Reports:
        """Return one batch's uploads; the decorator attaches them and waits until Cliniko processed them."""
        return uploads_of(batch)

    @task(trigger_rule="all_done")
    def summarize(
        reports: Reports, ti: Any = None, params: Any = None, dag_run: Any = None
    ) -> dict[str, Any]:
        """Name every report uploaded, skipped and failed, with reasons, and the night's manifest."""
        audit_path = params["audit_path"] if params else None
        return summarize_night(ti, reports, audit_path=audit_path, dag_run=dag_run, logger=log)

    patients = extract_patients()
    reports = generate_reports(patients)
    batches = resolve_patients(reports)
    uploaded = upload_reports.expand(batch=batches)
    uploaded >> summarize(reports)


cliniko_nightly_report_export()
