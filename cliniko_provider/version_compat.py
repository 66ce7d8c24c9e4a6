"""Which Airflow this is, for the features only newer Airflow has (as Airflow's own providers do)."""

from __future__ import annotations


def get_base_airflow_version_tuple() -> tuple[int, int, int]:
    """Return the running Airflow's ``(major, minor, micro)``, pre-release and local parts dropped."""
    from airflow import __version__
    from packaging.version import Version

    version = Version(__version__)
    return version.major, version.minor, version.micro


AIRFLOW_V_3_3_PLUS = get_base_airflow_version_tuple() >= (3, 3, 0)
