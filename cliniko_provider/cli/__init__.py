"""The command line for the first night: ``airflow cliniko ...`` (Airflow 3.3+) or ``cliniko ...``."""
