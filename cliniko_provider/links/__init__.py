"""Operator extra links: from an upload task in Airflow's UI to its records in Cliniko."""
