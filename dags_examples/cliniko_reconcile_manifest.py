"""Reconcile: is everything a night attached still in Cliniko, as it was sent?

Reads a night's audit manifest (by default the newest one the nightly export wrote under
``$AIRFLOW_HOME/cliniko-audit/cliniko_nightly_report_export/``) and checks every attachment it lists against
Cliniko now: still there, not archived, in the same patient's record, the same size; with
``verify="content"`` also byte for byte (SHA-256 of ``/content``: one request and the file's bytes each).
Read-only; 100 attachments per request. The task fails, naming each attachment, when any is missing,
archived or changed, so a weekly run alerts like any failed task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, Param, dag, task

from cliniko_provider.operators.reconcile import ClinikoReconcileOperator

NIGHTLY_MANIFESTS = str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser()
    / "cliniko-audit"
    / "cliniko_nightly_report_export"
)


@dag(
    schedule="0 6 * * 1",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "manifest": Param(
            "",
            type="string",
            title="Manifest",
            description="A manifest's path or URI; empty for the newest night's merged manifest.",
        ),
        "verify": Param(
            "size", enum=["size", "content"], title="Check", description="'content' reads every file back."
        ),
    },
    tags=["cliniko", "example"],
)
def cliniko_reconcile_manifest() -> None:
    """Check a night's attachments against Cliniko now."""

    @task
    def choose_manifest(params: Any = None) -> str:
        """Return the manifest given, or the newest night's merged manifest."""
        if params["manifest"]:
            return str(params["manifest"])
        root = ObjectStoragePath(NIGHTLY_MANIFESTS)
        found = root.iterdir() if root.is_dir() else []
        nights = sorted(
            (path for path in found if path.name.endswith(".jsonl")), key=lambda p: p.stat().st_mtime
        )
        if not nights:
            raise FileNotFoundError(f"No night manifest in {NIGHTLY_MANIFESTS}: run the nightly export first")
        return str(nights[-1])

    ClinikoReconcileOperator(
        task_id="reconcile",
        manifest=choose_manifest(),
        verify="{{ params.verify }}",
    )


cliniko_reconcile_manifest()
