"""Nightly export: one report per patient, attached to the patient's Cliniko record, exactly once.

What it does for each run date (``ds``):

1. ``extract_patients`` reads the patients to report on. Here they come from the ``patients`` param (a
   stand-in for your warehouse query); replace it with your own query.
2. ``generate_reports`` writes one real CSV report per patient under ``report_root`` (default
   ``$AIRFLOW_HOME/cliniko-reports``; a local path or any object-storage URI, e.g.
   ``s3://my-bucket/cliniko-reports``, which every worker can read).
3. ``resolve_patients`` maps each report to a Cliniko patient id through the hook: by
   ``old_reference_id`` (Cliniko's one filterable external id), falling back to email, and splits them
   into batches of ``batch_size`` (default 100). Reports with no matching patient are skipped with a
   reason. Reports already attached for this date are skipped too, so re-running a date creates no
   duplicates.
4. ``upload_reports`` is a ``@task.cliniko_upload`` function mapped over the batches: it returns one
   batch's uploads (patient, file, description) and the decorator attaches them (a
   ``ClinikoBatchUploadOperator`` per batch, streaming a few files at once). A night of 5,000 reports is
   50 tasks, far below Airflow's ``max_map_length`` (1024), and each batch shows in the UI. Each batch
   waits for Cliniko's processing with one deferral to the triggerer, where all waits of one connection
   share one poller (about one request per 100 attachments per round). A bad report fails only itself;
   its batch task fails at the end, naming it. Each batch task that succeeds emits an event on the asset
   ``cliniko://cliniko_default/attachments`` (counts only), on which ``cliniko_tell_clinicians`` is
   scheduled.
5. ``summarize`` runs whatever happened and names every report uploaded, skipped and failed, with
   reasons, and the night's audit manifest.

**The audit trail.** Each upload task writes its manifest (one JSON line per report: patient, file,
size, SHA-256, MD5, attachment, times, verification, error) under ``audit_path`` (default
``$AIRFLOW_HOME/cliniko-audit``; any object-storage URI works too), and ``summarize`` merges the night's
into ``<audit_path>/cliniko_nightly_report_export/<run id>.jsonl``. ``cliniko_reconcile_manifest``
checks such a manifest against Cliniko later.

**The rate limit.** Cliniko allows 200 requests a minute per API key. Each upload costs two requests
(presign and create) plus a share of the coalesced polling; every request of every task draws from
the key's one rate budget, which paces them under the limit and waits for ``X-RateLimit-Reset`` after
a 429. At most ``MAX_ACTIVE_BATCHES`` (4) upload tasks of this DAG run at once
(``max_active_tis_per_dag``: nothing to create first); each streams up to ``max_concurrency`` (4) files at
once, so a few large files can stream while others wait for the limit. To cap the Cliniko tasks of
several DAGs together, create a pool (``airflow pools set cliniko_api 4 "Cliniko API"``) and pass
``pool="cliniko_api"`` to the upload task: a task whose pool does not exist never starts.
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
from cliniko_provider.utils.audit import merge_manifests

# Seconds between checks while Cliniko processes the files. `make demo` sets 2 to finish sooner;
# at night, 15 keeps the requests few.
POLL_INTERVAL = float(os.environ.get("CLINIKO_EXAMPLE_POLL_INTERVAL", "15"))
CLINIKO_CONN_ID = "cliniko_default"
NIGHTLY_ATTACHMENTS = cliniko_attachments(CLINIKO_CONN_ID)  # the asset cliniko_tell_clinicians waits for
BATCH_SIZE = 100  # reports per upload task
MAX_ACTIVE_BATCHES = 4  # upload tasks of this DAG running at once
# Where the reports are written unless the run says otherwise: under AIRFLOW_HOME, as Airflow's logs are.
AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser()
REPORT_ROOT = (AIRFLOW_HOME / "cliniko-reports").as_uri()
AUDIT_PATH = str(AIRFLOW_HOME / "cliniko-audit")  # one manifest per upload task, merged per night

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


def report_date(dag_run: Any) -> str:
    """The date a run reports on: its logical date, or the day it ran for a manual run without one."""
    return str((dag_run.logical_date or dag_run.run_after).date().isoformat())


def report_description(ds: str, reference: str) -> str:
    """The description shown in Cliniko; also how a re-run recognises reports already attached."""
    return f"Nightly report {ds} ({reference})"


def write_report(path: ObjectStoragePath, patient: dict[str, str], ds: str) -> int:
    """Write one patient's CSV report for the date; return its size in bytes."""
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
    },
    tags=["cliniko", "example"],
)
def cliniko_nightly_report_export() -> None:
    """Generate, attach and confirm one report per patient for the run date."""

    @task
    def extract_patients(params: Any = None) -> list[dict[str, str]]:
        """Return the patients to report on (replace with your warehouse query)."""
        return [dict(row) for row in params["patients"]]

    @task
    def generate_reports(
        patients: list[dict[str, str]], dag_run: Any = None, params: Any = None
    ) -> list[dict[str, str]]:
        """Write one CSV per patient; return where each report is."""
        ds = report_date(dag_run)
        root = ObjectStoragePath(params["report_root"]) / ds
        reports = []
        for patient in patients:
            path = root / f"report-{patient['reference']}-{ds}.csv"
            size = write_report(path, patient, ds)
            reports.append({**patient, "date": ds, "file_path": str(path), "size": str(size)})
        return reports

    @task
    def resolve_patients(
        reports: list[dict[str, str]], ti: Any = None, params: Any = None
    ) -> list[list[dict[str, Any]]]:
        """Map reports to Cliniko patient ids; skip unknown patients and reports already attached.

        Returns the resolved reports in batches of ``batch_size``; the skipped ones go to XCom ``skipped``.
        """
        if not reports:
            return []
        ds = reports[0]["date"]
        hook = ClinikoHook(CLINIKO_CONN_ID)
        patients = hook.match_patients(
            [report["reference"] for report in reports], [report["email"] for report in reports]
        )
        attached = {
            (str(record["patient"]["links"]["self"]).rsplit("/", 1)[-1], record.get("description"))
            for record in hook.list_attachments(f"description:~Nightly report {ds} (")
        }
        resolved: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        for report in reports:
            patient = patients.get(report["reference"]) or patients.get(report["email"])
            if patient is None:
                skipped.append({**report, "reason": "no Cliniko patient with this old_reference_id or email"})
                continue
            description = report_description(ds, report["reference"])
            if (str(patient["id"]), description) in attached:
                skipped.append({**report, "reason": f"already attached to patient {patient['id']}"})
                continue
            resolved.append({**report, "patient_id": str(patient["id"])})
        ti.xcom_push(key="skipped", value=skipped)
        size = max(1, int(params["batch_size"]))
        return [resolved[start : start + size] for start in range(0, len(resolved), size)]

    @task.cliniko_upload(
        cliniko_conn_id=CLINIKO_CONN_ID,
        max_active_tis_per_dag=MAX_ACTIVE_BATCHES,
        max_concurrency=4,
        wait_for_completion=True,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
        timeout=3600,
        audit_path="{{ params.audit_path }}",
        retries=2,
        retry_delay=pendulum.duration(seconds=30),
        retry_exponential_backoff=2.0,
        outlets=[NIGHTLY_ATTACHMENTS],
    )
    def upload_reports(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return one batch's uploads; the decorator attaches them and waits until Cliniko processed them.

        resolve_patients already checked, in bulk, what is attached for this date; the upload looks for
        its own earlier uploads only when a try is retried or cleared, by description and content.
        """
        return [
            {
                "patient_id": report["patient_id"],
                "file_path": report["file_path"],
                "description": report_description(report["date"], report["reference"]),
            }
            for report in batch
        ]

    @task(trigger_rule="all_done")
    def summarize(
        reports: list[dict[str, str]], ti: Any = None, params: Any = None, dag_run: Any = None
    ) -> dict[str, Any]:
        """Name every report uploaded, skipped and failed, with reasons, and the night's manifest."""
        batches = ti.xcom_pull(task_ids="resolve_patients") or []
        skipped = ti.xcom_pull(task_ids="resolve_patients", key="skipped") or []
        uploaded, failed = [], []
        for index, batch in enumerate(batches):
            # A batch task leaves one result per report, in order, even when it fails; a task that died
            # before it could (a killed worker) leaves none: then each of its reports failed with it.
            results = ti.xcom_pull(task_ids="upload_reports", map_indexes=index)
            if not isinstance(results, list) or len(results) != len(batch):
                error = ti.xcom_pull(task_ids="upload_reports", key="cliniko_error", map_indexes=index)
                results = [{"error": error or "the batch's upload task failed; see its log"}] * len(batch)
            for upload, result in zip(batch, results, strict=True):
                entry = {
                    "reference": upload["reference"],
                    "patient_id": upload["patient_id"],
                    "attachment_id": result.get("attachment_id"),
                }
                if result.get("error"):
                    failed.append({**entry, "file_path": upload["file_path"], "reason": result["error"]})
                elif result.get("status") != "processed":  # only what Cliniko confirmed counts as uploaded
                    reason = (
                        "not confirmed processed by Cliniko (the task's wait ended early); a rerun checks"
                    )
                    failed.append({**entry, "file_path": upload["file_path"], "reason": reason})
                else:
                    uploaded.append({**entry, "processed_at": result.get("processed_at")})
        summary = {"reports": len(reports or []), "uploaded": uploaded, "skipped": skipped, "failed": failed}
        if params and dag_run is not None:
            manifest, lines = merge_manifests(params["audit_path"], dag_run.dag_id, dag_run.run_id)
            summary["manifest"] = manifest
            log.info("Audit manifest of the night: %s (%d line(s))", manifest, len(lines))
        log.info(
            "Cliniko nightly export: %d uploaded, %d skipped, %d failed",
            len(uploaded),
            len(skipped),
            len(failed),
        )
        for item in uploaded:
            log.info(
                "  uploaded %s: patient %s, attachment %s",
                item["reference"],
                item["patient_id"],
                item["attachment_id"],
            )
        for item in skipped:
            log.info("  skipped %s: %s", item["reference"], item["reason"])
        for item in failed:
            log.warning("  failed %s (patient %s): %s", item["reference"], item["patient_id"], item["reason"])
        if failed:
            raise RuntimeError(f"{len(failed)} report(s) failed to upload; see the summary above")
        return summary

    patients = extract_patients()
    reports = generate_reports(patients)
    batches = resolve_patients(reports)
    uploaded = upload_reports.expand(batch=batches)
    uploaded >> summarize(reports)


cliniko_nightly_report_export()
