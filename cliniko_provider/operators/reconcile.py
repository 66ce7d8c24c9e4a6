"""Reconcile an audit manifest with Cliniko: is every attachment it lists still there, as sent?"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from cliniko_provider.exceptions import ClinikoInputError, ClinikoReconcileError
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.utils.audit import (
    CONFIRMED,
    attached,
    compare,
    content_changed,
    read_manifest,
    reconcile_summary,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

JsonDict = dict[str, Any]
VERIFY = (None, "", "size", "content")
SUMMARY_LINES = 20  # attachments named in the log and the error; XCom lists them all


class ClinikoReconcileOperator(BaseOperator):
    """Check an audit manifest against Cliniko now; fail, naming them, if attachments are gone or changed.

    Read-only. For every attachment the manifest lists (failed uploads have none and are skipped): it
    must still exist (a deleted one is absent from Cliniko's answers), not be archived, be in the same
    patient's record and, once processed, have the size that was sent. Records are read 100 per request
    (``GET /patient_attachments?q[]=id:=1,2,...``, archived ones included), so 1,000 attachments cost 10
    requests. With ``verify="content"`` each confirmed attachment's bytes are also streamed from
    ``/content`` (never more than its size) and their SHA-256 compared with the manifest's: one request
    and the file's bytes per attachment.

    Returns (XCom) ``{"manifest", "checked", "skipped", "counts", "findings"}``, ``findings`` listing every
    attachment not confirmed (``attachment_id``, ``patient_id``, ``filename``, ``status``, ``detail``);
    the summary is logged (``Reconciled 96 attachment(s) of ...: 94 confirmed, 1 missing, 1 archived``,
    then one line per attachment not confirmed). The task fails, without retries, when any attachment is
    missing, archived or changed; one still processing is reported but does not fail it.

    :param manifest: the manifest's local path or ObjectStoragePath URI (templated), e.g. a night's merged
        manifest or one task's.
    :param verify: ``"content"`` to compare each attachment's bytes too; ``"size"`` or None (default) for
        existence, archive state, patient and size (templated).
    :param cliniko_conn_id: the Cliniko connection id.
    """

    template_fields: Sequence[str] = ("manifest", "verify")
    ui_color = "#e8f4f8"

    def __init__(
        self,
        *,
        manifest: str | os.PathLike[str],
        verify: str | None = None,
        cliniko_conn_id: str = ClinikoHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if verify not in VERIFY and "{{" not in str(verify):
            raise ValueError(f"verify must be 'size', 'content' or None, got {verify!r}")
        self.manifest = manifest
        self.verify = verify
        self.cliniko_conn_id = cliniko_conn_id

    @cached_property
    def hook(self) -> ClinikoHook:
        """The Cliniko hook."""
        return ClinikoHook(self.cliniko_conn_id)

    def execute(self, context: Context) -> JsonDict:
        """Read the manifest, fetch its attachments 100 at a time, compare; fail if any is gone or changed."""
        if self.verify not in VERIFY:
            raise ClinikoInputError(f"verify must be 'size', 'content' or None, got {self.verify!r}")
        source = os.fspath(self.manifest)
        lines = read_manifest(source)
        to_check = attached(lines)
        found = self.hook.get_attachments(line.attachment_id for line in to_check if line.attachment_id)
        findings = []
        for line in to_check:
            finding = compare(line, found.get(str(line.attachment_id)))
            if self.verify == "content" and finding.status == CONFIRMED:
                sha256 = self.hook.attachment_sha256(finding.attachment_id, max_bytes=line.size)
                finding = content_changed(finding, line, sha256)
            findings.append(finding)
        skipped = len(lines) - sum(1 for line in lines if line.attachment_id and not line.failed)
        summary = reconcile_summary(source, findings, skipped, limit=SUMMARY_LINES)
        counts: dict[str, int] = {}
        for finding in findings:
            counts[finding.status] = counts.get(finding.status, 0) + 1
        report = {
            "manifest": source,
            "checked": len(findings),
            "skipped": skipped,
            "counts": counts,
            "findings": [asdict(finding) for finding in findings if finding.status != CONFIRMED],
        }
        if any(finding.problem for finding in findings):
            context["ti"].xcom_push(key="return_value", value=report)
            raise ClinikoReconcileError(summary)
        self.log.info("%s", summary)  # at most a few lines per status: every finding is in XCom
        return report
