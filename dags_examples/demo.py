"""``make demo``: the nightly export, end to end, against a local sandbox.

Starts the sandbox with the example's patients (``--seed-example-patients``), runs the nightly DAG for
today in a real ``airflow dags test`` run (upload, then deferred wait for processing), prints what was
attached, and stops the sandbox. Airflow's state lives in ``$AIRFLOW_HOME`` (``.airflow/`` under ``make``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pendulum

HERE = Path(__file__).resolve().parent
API_KEY = "demo-sandbox-key-au1"
USER_AGENT = "Cliniko Provider Demo (demo@cliniko-provider.example)"
DAG_ID = "cliniko_nightly_report_export"
RECONCILE_ID = "cliniko_reconcile_manifest"


def airflow(*args: str, env: dict[str, str], log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``airflow`` CLI of this virtualenv."""
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    if log is None:
        return subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    with log.open("w") as out:
        return subprocess.run(command, env=env, check=False, stdout=out, stderr=subprocess.STDOUT, text=True)


def main() -> int:
    from cliniko_provider.sandbox.process import SandboxProcess

    work = Path(tempfile.mkdtemp(prefix="cliniko-demo-"))
    home = Path(os.environ.get("AIRFLOW_HOME", HERE.parent / ".airflow"))
    home.mkdir(parents=True, exist_ok=True)
    ds = pendulum.now("UTC").to_date_string()
    started = time.monotonic()
    with SandboxProcess(
        "--api-key",
        API_KEY,
        "--processing-delay",
        "2",
        "--seed-example-patients",
        data_dir=work / "sandbox-data",
    ) as sandbox:
        print(f"1. Sandbox running at {sandbox.base_url}")
        connection = json.dumps(
            {
                "conn_type": "cliniko",
                "password": API_KEY,
                "host": sandbox.base_url,
                "extra": {"user_agent": USER_AGENT},
            }
        )
        os.environ["AIRFLOW_CONN_CLINIKO_DEFAULT"] = connection
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(HERE),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "CLINIKO_EXAMPLE_POLL_INTERVAL": "2",  # the example's 15 s suits a night, not a demo
        }

        from cliniko_provider.hooks.cliniko import ClinikoHook
        from dags_examples.cliniko_nightly_report_export import SAMPLE_PATIENTS

        hook = ClinikoHook()
        found = hook.match_patients([row["reference"] for row in SAMPLE_PATIENTS])
        created = list(found.values())
        print(
            f"2. The sandbox has {len(created)} of the example's {len(SAMPLE_PATIENTS)} patients "
            "(--seed-example-patients; one warehouse row has no patient on purpose)"
        )

        airflow("db", "migrate", env=env)
        log = home / "demo-dags-test.log"
        conf = json.dumps({"report_root": (work / "reports").as_uri()})
        print(f"3. Running `airflow dags test {DAG_ID} {ds}` (log: {log})")
        result = airflow("dags", "test", DAG_ID, ds, "--conf", conf, env=env, log=log)
        output = log.read_text()
        for line in output.splitlines():
            if any(
                words in line
                for words in ("Cliniko nightly export:", "  skipped ", "  failed ", "manifest of")
            ):
                print("   " + line.split("] ", 1)[-1].split(" [cliniko_nightly", 1)[0].strip())
        if result.returncode != 0 or ("state=DagRunState.SUCCESS" not in output and "success" not in output):
            print("\n".join(output.splitlines()[-40:]))
            print(f"The DAG run failed (exit {result.returncode}); full log: {log}")
            return 1

        print("4. Attached in Cliniko (sandbox):")
        header = f"   {'patient':<38} {'filename':<32} {'size':>6}  processed_at"
        print(header)
        print("   " + "-" * (len(header) - 3))
        for patient in created:
            for record in hook.list_attachments(patient_id=patient["id"]):
                name = f"{patient['first_name']} {patient['last_name']} ({patient['id']})"
                print(
                    f"   {name:<38} {record['filename']!s:<32} "
                    f"{record['size']!s:>6}  {record['processed_at']}"
                )
        log = home / "demo-reconcile.log"
        print(
            f"5. Reconciling the night's manifest with Cliniko (airflow dags test {RECONCILE_ID}; log: {log})"
        )
        result = airflow("dags", "test", RECONCILE_ID, ds, env=env, log=log)
        for line in log.read_text().splitlines():
            if "Reconciled " in line:
                print("   " + line.split("] ", 1)[-1].split(" [airflow.task", 1)[0].strip())
        if result.returncode != 0:
            print(f"The reconcile run failed (exit {result.returncode}); full log: {log}")
            return 1
    print(f"Demo finished in {time.monotonic() - started:.0f} s; sandbox stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
