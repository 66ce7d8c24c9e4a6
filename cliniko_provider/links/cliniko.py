"""The "Cliniko attachments" button of the upload tasks.

Cliniko's API does not give the account's web address for a patient's page, so the link is the API URL
of the task's records: the attachment (``/patient_attachments/<id>``) for a single upload, or the list
of the batch's attachments (``/patient_attachments?q[]=id:=1,2,...``), as JSON (a browser asks for the
API key as the user name, password empty). Nothing secret is in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from airflow.providers.common.compat.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey

IDS_ATTRIBUTE = "cliniko_attachment_ids"  # where an upload operator keeps the ids it made or found


def attachments_url(base_url: str, attachment_ids: Iterable[str]) -> str:
    """Return the API URL of some attachments: one record, or the list of several; "" for none.

    :param base_url: the connection's API base URL (``.../v1``).
    :param attachment_ids: the attachment ids.
    """
    ids = list(dict.fromkeys(str(value) for value in attachment_ids if value))
    if not ids:
        return ""
    if len(ids) == 1:
        return f"{base_url}/patient_attachments/{ids[0]}"
    return f"{base_url}/patient_attachments?" + urlencode(
        [("q[]", f"id:={','.join(ids)}"), ("per_page", "100")]
    )


class ClinikoAttachmentsLink(BaseOperatorLink):
    """The records an upload task made in Cliniko (their API URL), once the task knows them."""

    name = "Cliniko attachments"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        """Return the API URL of the operator's attachments; "" before it has any.

        Airflow 3 asks on the worker when the task ends and keeps the answer in XCom for the UI.

        :param operator: the upload operator.
        :param ti_key: the task instance (unused: the operator carries its ids).
        """
        ids = getattr(operator, IDS_ATTRIBUTE, None)
        if not ids:
            return ""
        return attachments_url(operator.hook.settings.base_url, ids)
