"""The wiring of a nightly export DAG: reports resolved to patients, batched, and the night summarised.

A nightly export maps ``@task.cliniko_upload`` (or ``ClinikoBatchUploadOperator``) over batches of
reports. :func:`resolve_reports` finds each report's Cliniko patient and skips the ones already attached;
:func:`in_batches` splits the rest; :func:`summarize_night`, in a task with ``trigger_rule="all_done"``,
reads what every batch task left in XCom and names each report uploaded, skipped and failed.
``dags_examples/cliniko_nightly_report_export.py`` shows them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cliniko_provider.utils.audit import merge_manifests
from cliniko_provider.utils.batch import PROCESSED, UPLOAD_FIELDS

if TYPE_CHECKING:
    from cliniko_provider.hooks.cliniko import ClinikoHook

JsonDict = dict[str, Any]

NO_PATIENT = "no Cliniko patient with this old_reference_id or email"
BATCH_DIED = "the batch's upload task failed; see its log"
NOT_CONFIRMED = "not confirmed processed by Cliniko (the task's wait ended early); a rerun checks"
log = logging.getLogger(__name__)


def resolve_reports(
    hook: ClinikoHook,
    reports: Sequence[Mapping[str, Any]],
    description: Callable[[Mapping[str, Any]], str],
    attached_filter: str | None = None,
    *,
    reference_key: str = "reference",
    email_key: str = "email",
) -> tuple[list[JsonDict], list[JsonDict]]:
    """Find each report's Cliniko patient; skip unknown patients and reports already attached.

    A report matches by ``old_reference_id`` first, then by email, in bulk
    (:meth:`~cliniko_provider.hooks.cliniko.ClinikoHook.match_patients`). It is already attached when its
    patient has an attachment whose description is the one ``description`` gives it, among those
    ``attached_filter`` lists (one paged query for the whole night).

    Returns ``(resolved, skipped)``: the resolved reports, in order, each a copy with ``patient_id`` and
    ``description`` added (:func:`uploads_of` makes them uploads); the skipped ones, each a copy with a
    ``reason``.

    :param hook: the hook of the Cliniko connection.
    :param reports: the reports, mappings with a reference and an email.
    :param description: returns the attachment description a report gets.
    :param attached_filter: the description filter of the night's attachments, e.g.
        ``"description:~Nightly report 2026-01-01 ("``; None checks nothing (a rerun may then duplicate).
    :param reference_key: the key of a report's ``old_reference_id``.
    :param email_key: the key of a report's email.
    """
    if not reports:
        return [], []
    patients = hook.match_patients(
        [str(report.get(reference_key) or "") for report in reports],
        [str(report.get(email_key) or "") for report in reports],
    )
    attached: set[tuple[str, Any]] = set()
    if attached_filter:
        attached = {
            (str(record["patient"]["links"]["self"]).rsplit("/", 1)[-1], record.get("description"))
            for record in hook.list_attachments(attached_filter)
        }
    resolved: list[JsonDict] = []
    skipped: list[JsonDict] = []
    for report in reports:
        reference = str(report.get(reference_key) or "")
        patient = patients.get(reference) if reference else None
        email = str(report.get(email_key) or "").lower()
        if patient is None and email:
            patient = patients.get(email)
        if patient is None:
            skipped.append({**report, "reason": NO_PATIENT})
            continue
        patient_id, text = str(patient["id"]), description(report)
        if (patient_id, text) in attached:
            skipped.append({**report, "reason": f"already attached to patient {patient_id}"})
            continue
        resolved.append({**report, "patient_id": patient_id, "description": text})
    return resolved, skipped


def uploads_of(reports: Sequence[Mapping[str, Any]]) -> list[JsonDict]:
    """Return resolved reports as uploads: only the keys an upload takes (``patient_id``, ``file_path``...).

    What ``@task.cliniko_upload`` and ``ClinikoBatchUploadOperator`` take; they reject other keys.

    :param reports: resolved reports (:func:`resolve_reports`).
    """
    return [{key: report[key] for key in UPLOAD_FIELDS if key in report} for report in reports]


def run_date(dag_run: Any) -> str:
    """Return the date a run reports on (``YYYY-MM-DD``): its logical date, else the day it ran for.

    A manual run may have no logical date; then its ``run_after`` counts.

    :param dag_run: the DAG run.
    """
    return str((dag_run.logical_date or dag_run.run_after).date().isoformat())


def in_batches(items: Sequence[JsonDict], size: int) -> list[list[JsonDict]]:
    """Split ``items`` into consecutive batches of at most ``size`` (the last may be shorter).

    :param items: what to split.
    :param size: the largest batch; below 1 counts as 1.
    """
    size = max(1, int(size))
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def summarize_batches(
    batches: Sequence[Sequence[Mapping[str, Any]]],
    results: Sequence[Any],
    errors: Sequence[str | None] = (),
) -> tuple[list[JsonDict], list[JsonDict]]:
    """Sort every report of the batches into uploaded and failed, from its batch task's results.

    A batch task leaves one result per report, in order, even when it fails; a task that died before it
    could (a killed worker) leaves none: then each of its reports failed with the batch's error. Only a
    result with status ``"processed"`` (confirmed by Cliniko) counts as uploaded.

    Returns ``(uploaded, failed)``: entries with ``reference``, ``patient_id`` and ``attachment_id``, and
    ``processed_at`` and ``verification`` (uploaded: the highest integrity check passed, e.g. ``"content"``)
    or ``file_path`` and ``reason`` (failed: a failed check's reason names both sides).

    :param batches: the resolved batches, reports with ``reference``, ``patient_id`` and ``file_path``.
    :param results: per batch, what its task returned (a list of results), or None.
    :param errors: per batch, its task's XCom ``cliniko_error``, or None.
    """
    uploaded: list[JsonDict] = []
    failed: list[JsonDict] = []
    for index, batch in enumerate(batches):
        outcome = results[index] if index < len(results) else None
        if not isinstance(outcome, list) or len(outcome) != len(batch):
            error = errors[index] if index < len(errors) else None
            outcome = [{"error": error or BATCH_DIED}] * len(batch)
        for upload, result in zip(batch, outcome, strict=True):
            result = result if isinstance(result, Mapping) else {"error": BATCH_DIED}
            entry = {
                "reference": upload.get("reference"),
                "patient_id": upload.get("patient_id"),
                "attachment_id": result.get("attachment_id"),
            }
            if result.get("error"):
                failed.append({**entry, "file_path": upload.get("file_path"), "reason": result["error"]})
            elif result.get("status") != PROCESSED:
                failed.append({**entry, "file_path": upload.get("file_path"), "reason": NOT_CONFIRMED})
            else:
                uploaded.append(
                    {
                        **entry,
                        "processed_at": result.get("processed_at"),
                        "verification": result.get("verification"),
                    }
                )
    return uploaded, failed


def log_summary(summary: Mapping[str, Any], logger: logging.Logger | None = None) -> None:
    """Log a night's counts, then one line per report uploaded, skipped and failed.

    :param summary: what :func:`summarize_night` returns.
    :param logger: where to log; this module's logger when None.
    """
    logger = logger or log
    uploaded, skipped, failed = summary["uploaded"], summary["skipped"], summary["failed"]
    logger.info(
        "Cliniko nightly export: %d uploaded, %d skipped, %d failed", len(uploaded), len(skipped), len(failed)
    )
    for item in uploaded:
        logger.info(
            "  uploaded %s: patient %s, attachment %s%s",
            item["reference"],
            item["patient_id"],
            item["attachment_id"],
            f" (verified: {item['verification']})" if item.get("verification") else "",
        )
    for item in skipped:
        logger.info("  skipped %s: %s", item.get("reference"), item.get("reason"))
    for item in failed:
        logger.warning("  failed %s (patient %s): %s", item["reference"], item["patient_id"], item["reason"])


def summarize_night(
    ti: Any,
    reports: Sequence[Any] | None,
    *,
    resolve_task_id: str = "resolve_patients",
    upload_task_id: str = "upload_reports",
    audit_path: str | None = None,
    dag_run: Any = None,
    logger: logging.Logger | None = None,
) -> JsonDict:
    """Summarise a night from XCom, merge its audit manifests, log it and fail when any report failed.

    Reads the batches ``resolve_task_id`` returned and its XCom ``skipped``, and each mapped
    ``upload_task_id`` task's results and XCom ``cliniko_error``. Returns ``{"reports", "uploaded",
    "skipped", "failed"}`` (see :func:`summarize_batches`), plus ``"manifest"``, the merged manifest's
    location, when ``audit_path`` and ``dag_run`` are given. Raises ``RuntimeError`` after logging when any
    report failed, so the task (and the run) fails.

    :param ti: the summarising task's task instance.
    :param reports: the night's reports (only counted).
    :param resolve_task_id: the task that returned the batches and pushed XCom ``skipped``.
    :param upload_task_id: the upload task mapped over the batches.
    :param audit_path: where the upload tasks wrote their manifests, or None to merge none.
    :param dag_run: the DAG run, whose ``dag_id`` and ``run_id`` name the merged manifest.
    :param logger: where to log; this module's logger when None.
    """
    logger = logger or log
    batches = ti.xcom_pull(task_ids=resolve_task_id) or []
    skipped = ti.xcom_pull(task_ids=resolve_task_id, key="skipped") or []
    results, errors = [], []
    for index, batch in enumerate(batches):
        outcome = ti.xcom_pull(task_ids=upload_task_id, map_indexes=index)
        results.append(outcome)
        if not isinstance(outcome, list) or len(outcome) != len(batch):
            errors.append(ti.xcom_pull(task_ids=upload_task_id, key="cliniko_error", map_indexes=index))
        else:
            errors.append(None)
    uploaded, failed = summarize_batches(batches, results, errors)
    summary: JsonDict = {
        "reports": len(reports or []),
        "uploaded": uploaded,
        "skipped": skipped,
        "failed": failed,
    }
    if audit_path and dag_run is not None:
        manifest, lines = merge_manifests(audit_path, dag_run.dag_id, dag_run.run_id)
        summary["manifest"] = manifest
        logger.info("Audit manifest of the night: %s (%d line(s))", manifest, len(lines))
    log_summary(summary, logger)
    if failed:
        raise RuntimeError(f"{len(failed)} report(s) failed to upload; see the summary above")
    return summary
