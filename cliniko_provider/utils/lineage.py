"""OpenLineage datasets of an upload: the source file in, the Cliniko attachment out.

Used only when ``apache-airflow-providers-openlineage`` is installed (extra ``[openlineage]``): every
OpenLineage import is inside a function, and without the provider nothing here is imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from airflow.sdk import ObjectStoragePath

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


def source_dataset(file_path: str) -> tuple[str, str]:
    """Return the (namespace, name) of the file read, as common-io's ``FileTransferOperator`` names it.

    That is ``ObjectStoragePath.namespace`` and ``.key``: ``("s3://bucket", "dir/a.pdf")``,
    ``("file", "data/a.pdf")``. A local path is named as its absolute ``file://`` URI; a percent-encoded
    ``file://`` URI whose literal name does not exist is named decoded, as the upload read it.

    :param file_path: the operator's rendered ``file_path``.
    """
    text = file_path.strip()
    if "://" not in text:
        text = "file://" + str(Path(text).expanduser().absolute())
    path = ObjectStoragePath(text)
    if path.protocol in ("file", "local") and unquote(text) != text and not path.exists():
        path = ObjectStoragePath(unquote(text))
    return str(path.namespace), str(path.key)


def attachment_dataset(base_url: str, patient_id: str, attachment_id: str) -> tuple[str, str]:
    """Return an attachment's (namespace, name): ``cliniko://<API host>``, ``patients/<p>/attachments/<a>``.

    :param base_url: the connection's API base URL, e.g. ``https://api.au1.cliniko.com/v1``.
    :param patient_id: the patient id.
    :param attachment_id: the attachment id.
    """
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port is not None:  # the sandbox, a proxy: two ports are two different Clinikos
        host = f"{host}:{parts.port}"
    return f"cliniko://{host}", f"patients/{patient_id}/attachments/{attachment_id}"


def upload_lineage(
    file_path: str, base_url: str, patient_id: str, attachment_id: str
) -> OperatorLineage[Any, Any] | None:
    """Return the upload's lineage (the file in, the attachment out), or None without OpenLineage.

    :param file_path: the operator's rendered ``file_path``.
    :param base_url: the connection's API base URL.
    :param patient_id: the patient id.
    :param attachment_id: the attachment id.
    """
    try:
        from airflow.providers.common.compat.openlineage.facet import Dataset
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    source_namespace, source_name = source_dataset(file_path)
    target_namespace, target_name = attachment_dataset(base_url, patient_id, attachment_id)
    return OperatorLineage(
        inputs=[Dataset(namespace=source_namespace, name=source_name)],
        outputs=[Dataset(namespace=target_namespace, name=target_name)],
    )


# Datasets named one by one up to this many files per task; above it a batch's event names groups (each
# source directory, each Cliniko), so it stays small. Measured: 100 files make an event of about 33 KB.
MAX_FILES_NAMED = 1000


def batch_lineage(results: Iterable[Mapping[str, Any]], base_url: str) -> OperatorLineage[Any, Any] | None:
    """Return one task's lineage for many uploads: every file read in, every attachment made out.

    Files that failed before an attachment existed are left out. Above :data:`MAX_FILES_NAMED` files the
    event is aggregated: one input per source directory and one output, ``attachments``, per Cliniko.
    Returns None without OpenLineage or when nothing was attached.

    :param results: the batch's results (``file_path``, ``patient_id``, ``attachment_id`` per file).
    :param base_url: the connection's API base URL.
    """
    try:
        from airflow.providers.common.compat.openlineage.facet import Dataset
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    attached = [r for r in results if r.get("attachment_id") and r.get("file_path") and r.get("patient_id")]
    if not attached:
        return None
    inputs = {source_dataset(str(r["file_path"])): None for r in attached}
    outputs = {
        attachment_dataset(base_url, str(r["patient_id"]), str(r["attachment_id"])): None for r in attached
    }
    if len(attached) > MAX_FILES_NAMED:
        inputs = {(namespace, str(PurePosixPath(name).parent)): None for namespace, name in inputs}
        outputs = {(namespace, "attachments"): None for namespace, _ in outputs}
    return OperatorLineage(
        inputs=[Dataset(namespace=namespace, name=name) for namespace, name in inputs],
        outputs=[Dataset(namespace=namespace, name=name) for namespace, name in outputs],
    )
