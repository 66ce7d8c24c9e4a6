"""Apache Airflow provider for Cliniko."""

__version__ = "0.2.0.dev0"
