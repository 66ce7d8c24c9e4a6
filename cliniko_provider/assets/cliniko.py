"""The ``cliniko`` asset URI scheme: ``cliniko://<connection id>/attachments``, the attachments made through
one Cliniko connection.

A DAG schedules on it to run after uploads (``schedule=[cliniko_attachments()]``); the upload operators
given it as an outlet fill the event's ``extra`` with counts only. No patient text is ever in the URI or in
``extra``: the normaliser refuses any other path, a query or user info, and the extra holds counts, the run
id and the connection id (never names, descriptions, paths or file contents).

Registered with Airflow through ``asset-uris`` in the provider's metadata (normaliser, factory and
OpenLineage converter); the OpenLineage dataset is ``cliniko://<API host>``, ``attachments``, the namespace
the uploads' lineage uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

from airflow.sdk import Asset

if TYPE_CHECKING:
    from airflow.providers.common.compat.openlineage.facet import Dataset as OpenLineageDataset
    from airflow.sdk import Context

SCHEME = "cliniko"
PATH = "/attachments"
DEFAULT_CONN_ID = "cliniko_default"  # a literal: Airflow imports this module while it discovers providers


def cliniko_attachments(cliniko_conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> Asset:
    """Return the asset of the attachments made through a connection: ``cliniko://<conn id>/attachments``.

    Give it to an upload operator's (or ``@task.cliniko_upload``'s) ``outlets`` and to a downstream DAG's
    ``schedule``. Each upload task that succeeds emits one event whose ``extra`` holds counts only
    (``files``, ``attached``, ``reused``, ``processed``, ``failed``), the ``run_id`` and the
    ``cliniko_conn_id``: never a patient, file name, path, description or content. The scheme's
    normaliser (the provider's ``asset-uris``) refuses any path but ``/attachments``, a query or user
    info, so the URI holds no patient text either. A mapped upload emits one event per batch task, which
    Airflow may group into one or more downstream runs: sum the triggering events' counts. In
    OpenLineage the asset is ``cliniko://<API host>``, ``attachments``.

    :param cliniko_conn_id: the Cliniko connection id the uploads use.
    :param kwargs: passed to :class:`~airflow.sdk.Asset` (e.g. ``name``, ``group``).
    """
    return Asset(uri=f"{SCHEME}://{cliniko_conn_id}{PATH}", **kwargs)


def create_asset(*, cliniko_conn_id: str = DEFAULT_CONN_ID, extra: dict[str, Any] | None = None) -> Asset:
    """The scheme's asset factory (``asset-uris`` ``factory``): :func:`cliniko_attachments`.

    :param cliniko_conn_id: the Cliniko connection id.
    :param extra: the asset's static extra.
    """
    return cliniko_attachments(cliniko_conn_id, extra=extra or {})


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Check a ``cliniko://`` URI (Airflow's normaliser for the scheme); raise ValueError naming the fix.

    :param uri: the URI, split (Airflow has dropped a password, a fragment and trailing slashes).
    """
    if uri.username is not None or "@" in uri.netloc:
        raise ValueError("A cliniko:// asset URI takes no user info: cliniko://<connection id>/attachments.")
    if not uri.hostname:
        raise ValueError(
            "A cliniko:// asset URI needs a connection id: cliniko://<connection id>/attachments."
        )
    if uri.path != PATH or uri.query:
        raise ValueError(
            f"A cliniko:// asset URI is cliniko://<connection id>/attachments, got path {uri.path!r}"
            f"{' and a query' if uri.query else ''}: assets name no patient, file or attachment."
        )
    return uri


def conn_id_of(asset: Asset) -> str | None:
    """Return the connection id a ``cliniko://`` asset names, or None for an asset of another scheme.

    :param asset: any asset.
    """
    parts = urlsplit(asset.uri)
    return parts.netloc if parts.scheme == SCHEME else None


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any) -> OpenLineageDataset:
    """Translate the asset into the OpenLineage dataset ``cliniko://<API host>``, ``attachments``.

    The API host comes from the connection (no request is sent); if the connection cannot be read, the
    namespace is ``cliniko://<connection id>``.

    :param asset: a ``cliniko://`` asset.
    :param lineage_context: unused.
    """
    from airflow.providers.common.compat.openlineage.facet import Dataset as OpenLineageDataset

    from cliniko_provider.hooks.cliniko import ClinikoHook
    from cliniko_provider.utils.lineage import attachment_dataset

    conn_id = conn_id_of(asset) or DEFAULT_CONN_ID
    try:
        namespace, _ = attachment_dataset(ClinikoHook(conn_id).settings.base_url, "0", "0")
    except Exception:  # lineage must not fail the task: name the connection instead of the host
        namespace = f"{SCHEME}://{conn_id}"
    return OpenLineageDataset(namespace=namespace, name=PATH.lstrip("/"))


def attachment_counts(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Count a task's uploads for an asset event: files, attached (new and reused), processed, failed.

    :param results: one result per file: ``attachment_id``, and ``reused``, ``processed_at`` or ``error``.
    """
    results = list(results)
    ok = [r for r in results if r.get("attachment_id") and "error" not in r]
    return {
        "files": len(results),
        "attached": len(ok),
        "reused": sum(1 for r in ok if r.get("reused")),
        "processed": sum(1 for r in ok if r.get("processed_at")),
        "failed": sum(1 for r in results if "error" in r),
    }


def record_asset_events(
    context: Context, outlets: Iterable[object], cliniko_conn_id: str, counts: Mapping[str, int]
) -> list[Asset]:
    """Fill the ``extra`` of each ``cliniko://`` outlet of this connection with counts, run and connection.

    Airflow emits the events when the task succeeds. Returns the assets filled; a ``cliniko://`` outlet of
    another connection is left as it is.

    :param context: the task context (its ``outlet_events`` and ``run_id``).
    :param outlets: the task's outlets.
    :param cliniko_conn_id: the connection the task uploaded through.
    :param counts: from :func:`attachment_counts`.
    """
    filled = []
    for outlet in outlets:
        if isinstance(outlet, Asset) and conn_id_of(outlet) == cliniko_conn_id:
            extra: dict[str, str | int] = {
                **counts,
                "run_id": str(context["run_id"]),
                "cliniko_conn_id": cliniko_conn_id,
            }
            context["outlet_events"][outlet].extra.update(extra)
            filled.append(outlet)
    return filled
