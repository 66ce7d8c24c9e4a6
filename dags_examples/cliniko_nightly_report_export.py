"""Nightly export: one report per patient, attached to the patient's Cliniko record, exactly once.

What it does for each run date (``ds``):

1. ``extract_patients`` reads the patients to report on. Here they come from the ``patients`` param (a
   stand-in for your warehouse query); replace it with your own query.
2. ``generate_reports`` writes one real CSV report per patient under ``report_root`` (a local path or
   any object-storage URI, e.g. ``s3://my-bucket/cliniko-reports``).
3. ``resolve_patients`` maps each report to a Cliniko patient id through the hook: by
   ``old_reference_id`` (Cliniko's one filterable external id), falling back to email. Reports with no
   matching patient are skipped with a reason. Reports already attached for this date are skipped too,
   so re-running a date creates no duplicates.
4. ``upload_report`` is one mapped ``ClinikoAttachmentUploadOperator`` task per report. It waits for
   Cliniko's processing by deferring to the triggerer, where all waits of one connection share one
   poller (about one request per 100 attachments per round).
5. ``summarize`` runs whatever happened and reports uploaded, skipped and failed, each with reasons.

**The rate limit.** Cliniko allows 200 requests a minute per API key. Each upload costs about two
requests (presign and create) plus a share of the coalesced polling. The upload tasks run in the
Airflow pool ``cliniko_api`` (create it: ``airflow pools set cliniko_api 4 "Cliniko API"``): the pool
caps how many uploads run at once across *all* workers and DAGs, which a per-process limit cannot do.
Inside each process the hook also paces requests under 200 a minute and waits for
``X-RateLimit-Reset`` after a 429, so a pool that is a little too large costs waiting, not failures.
Four slots keep a few uploads overlapping while large files stream; raise it for many small files only
if 429s stay rare (the task logs say when the hook waits).
"""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, dag, task

from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.operators.cliniko import ClinikoAttachmentUploadOperator

CLINIKO_CONN_ID = "cliniko_default"
CLINIKO_POOL = "cliniko_api"

# A stand-in for the warehouse: who gets a report. ``reference`` is your own patient id, stored in
# Cliniko as the patient's ``old_reference_id``.
SAMPLE_PATIENTS = [
    {"reference": "WH-1001", "email": "ada.lovelace@example.com", "name": "Ada Lovelace"},
    {"reference": "WH-1002", "email": "alan.turing@example.com", "name": "Alan Turing"},
    {"reference": "WH-1003", "email": "grace.hopper@example.com", "name": "Grace Hopper"},
    {"reference": "WH-1004", "email": "edsger.dijkstra@example.com", "name": "Edsger Dijkstra"},
    {"reference": "WH-9999", "email": "nobody@example.com", "name": "Not In Cliniko"},
]


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
    params={"patients": SAMPLE_PATIENTS, "report_root": "file:///tmp/cliniko-reports"},
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
    def resolve_patients(reports: list[dict[str, str]], ti: Any = None) -> list[dict[str, Any]]:
        """Map reports to Cliniko patient ids; skip unknown patients and reports already attached.

        Returns one set of upload arguments per report to upload; the skipped ones go to XCom ``skipped``.
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
        uploads: list[dict[str, Any]] = []
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
            uploads.append(
                {
                    "patient_id": str(patient["id"]),
                    "file_path": report["file_path"],
                    "description": description,
                }
            )
        ti.xcom_push(key="skipped", value=skipped)
        return uploads

    @task(trigger_rule="all_done")
    def summarize(reports: list[dict[str, str]], ti: Any = None) -> dict[str, Any]:
        """Report what was uploaded, skipped and failed, with reasons."""
        planned = ti.xcom_pull(task_ids="resolve_patients") or []
        skipped = ti.xcom_pull(task_ids="resolve_patients", key="skipped") or []
        results = ti.xcom_pull(task_ids="upload_report", map_indexes=list(range(len(planned)))) or []
        if len(planned) == 1:  # a single map index comes back as a bare value
            results = [results]
        uploaded, failed = [], []
        for index, upload in enumerate(planned):
            record = results[index] if index < len(results) else None
            if record:
                uploaded.append(
                    {
                        "patient_id": upload["patient_id"],
                        "attachment_id": record["id"],
                        "filename": record.get("filename"),
                        "size": record.get("size"),
                        "processed_at": record.get("processed_at"),
                    }
                )
            else:
                error = ti.xcom_pull(task_ids="upload_report", key="cliniko_error", map_indexes=index)
                reason = error or "the upload task failed; see its log"
                failed.append(
                    {"patient_id": upload["patient_id"], "file_path": upload["file_path"], "reason": reason}
                )
        summary = {"reports": len(reports or []), "uploaded": uploaded, "skipped": skipped, "failed": failed}
        print(
            f"Cliniko nightly export: {len(uploaded)} uploaded, {len(skipped)} skipped, {len(failed)} failed"
        )
        for item in skipped:
            print(f"  skipped {item['reference']}: {item['reason']}")
        for item in failed:
            print(f"  failed patient {item['patient_id']}: {item['reason']}")
        if failed:
            raise RuntimeError(f"{len(failed)} report(s) failed to upload; see the summary above")
        return summary

    patients = extract_patients()
    reports = generate_reports(patients)
    resolved = resolve_patients(reports)
    uploaded = ClinikoAttachmentUploadOperator.partial(
        task_id="upload_report",
        cliniko_conn_id=CLINIKO_CONN_ID,
        pool=CLINIKO_POOL,
        wait_for_completion=True,
        deferrable=True,
        # resolve_patients already checked, in bulk, what is attached for this date; the operator looks
        # for its own earlier upload only when a try is retried or cleared (look_for_existing="on_retry",
        # the default), by description and content: the description shows exactly as written.
        poll_interval=15,
        timeout=3600,
        retries=2,
        retry_delay=pendulum.duration(seconds=30),
        retry_exponential_backoff=2.0,
    ).expand_kwargs(resolved)
    uploaded >> summarize(reports)


cliniko_nightly_report_export()
