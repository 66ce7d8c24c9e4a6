"""Scheduled on the nightly export's asset: runs once reports are attached, and says how many.

``cliniko_nightly_report_export`` names the asset ``cliniko://cliniko_default/attachments`` as the outlet
of its upload tasks; every upload task that succeeds emits an event whose ``extra`` holds counts, the run
id and the connection id, never patient text. Airflow runs this DAG after such events (a mapped upload
emits one per batch, which Airflow may group into one run or spread over a few), and it sums what they
say. Replace the log line with your own message to the clinic (email, Slack, a ticket...).
"""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.sdk import dag, task

from cliniko_provider.assets.cliniko import cliniko_attachments

NIGHTLY_ATTACHMENTS = cliniko_attachments("cliniko_default")
COUNTS = ("files", "attached", "reused", "processed", "failed")
log = logging.getLogger(__name__)


@dag(
    schedule=[NIGHTLY_ATTACHMENTS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["cliniko", "example"],
)
def cliniko_tell_clinicians() -> None:
    """Sum the triggering asset events' counts and tell the clinicians."""

    @task
    def tell_clinicians(triggering_asset_events: Any = None) -> dict[str, Any]:
        events = list((triggering_asset_events or {}).get(NIGHTLY_ATTACHMENTS, []))
        totals = {name: sum(int(event.extra.get(name, 0)) for event in events) for name in COUNTS}
        runs = sorted({str(event.extra.get("run_id")) for event in events})
        log.info(
            "Reports attached in Cliniko: %d (%d processed) from %d upload task(s) of run(s) %s",
            totals["attached"],
            totals["processed"],
            len(events),
            ", ".join(runs),
        )
        return {**totals, "events": len(events), "runs": runs}

    tell_clinicians()


cliniko_tell_clinicians()
