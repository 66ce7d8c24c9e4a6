"""Apache Airflow provider for Cliniko."""

__version__ = "0.1.0"
