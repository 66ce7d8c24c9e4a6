"""The first night's command line (``airflow cliniko`` / ``cliniko``): check, patients, try-upload.

Against the sandbox; the last test runs against a real Cliniko account only when
``CLINIKO_TEST_API_KEY`` and ``CLINIKO_TEST_PATIENT_ID`` are set (never in CI).
"""

from __future__ import annotations

import io
import os
import re
import uuid
from typing import Any

import pytest

from cliniko_provider.cli import commands
from cliniko_provider.cli.commands import check, patients, read_connection, try_upload
from cliniko_provider.hooks.cliniko import ClinikoHook
from cliniko_provider.version_compat import AIRFLOW_V_3_3_PLUS
from tests.conftest import SANDBOX_KEY, connection_json
from tests.e2e.stack import free_port


def connect(monkeypatch: pytest.MonkeyPatch, api_key: str, host: str | None, **extra: Any) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_CLI", connection_json(api_key, host, **extra))
    return read_connection("cliniko_cli")


def run(command: Any, connection: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    """Run a command as the CLI does; return its exit code and output."""
    out = io.StringIO()
    code = command(connection, out, *args, **kwargs)
    return code, out.getvalue()


def test_check_is_green_on_a_good_connection(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = run(check, connect(monkeypatch, SANDBOX_KEY, sandbox.base_url))
    assert code == 0, text
    assert "ok    API key: set (20 characters), shard au1" in text
    assert f"ok    Base URL: {sandbox.base_url} (the connection's host)" in text
    assert "ok    User-Agent: Cliniko Provider Tests (tests@cliniko-provider.example)" in text
    assert "ok    Reachable: GET /user answered 200" in text
    assert "ok    Key's user: " in text
    user = re.search(r"ok    Key's user: .* \(user (\d+)\)", text)
    assert user, text
    assert (
        f"ok    Rate budget: 200 requests a minute for user {user[1]} (every key of that user draws on it), "
        "shared by this machine's processes" in text
    )
    assert text.endswith("All good.\n") and SANDBOX_KEY not in text


def test_check_names_the_fix_for_a_wrong_key(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = run(check, connect(monkeypatch, "wrong-key-au1", sandbox.base_url))
    assert code == 1
    assert "FAIL  Reachable: Cliniko answered 401 to GET /user" in text
    assert "Check the API key" in text and "My Info > Manage API keys" in text
    assert "wrong-key" not in text


def test_check_names_the_fix_for_a_missing_user_agent(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = run(check, connect(monkeypatch, SANDBOX_KEY, sandbox.base_url, user_agent=""))
    assert code == 1
    assert "FAIL  Settings: The Cliniko connection 'cliniko_cli' has no User-Agent" in text
    assert "Set the extra field 'user_agent'" in text
    assert "Reachable" not in text  # nothing is sent without one


def test_check_asks_whether_the_sandbox_runs_when_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    code, text = run(check, connect(monkeypatch, SANDBOX_KEY, base_url))
    assert code == 1
    assert f"FAIL  Reachable: Could not reach Cliniko at {base_url} for GET /user after 1 attempt(s)" in text
    assert "Is `cliniko-sandbox` running?" in text


def test_check_fails_when_the_cluster_budget_cannot_reach_redis(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``redis_conn_id`` whose Redis is down (or not defined) is a problem with its fix, not "ok".

    Uploads would go on with the machine budget, so only the check can tell the team before the night.
    """
    monkeypatch.setenv("AIRFLOW_CONN_BUDGET_DOWN", f"redis://127.0.0.1:{free_port()}?db=3")
    code, text = run(check, connect(monkeypatch, SANDBOX_KEY, sandbox.base_url, redis_conn_id="budget_down"))
    assert code == 1, text
    assert "ok    Reachable: GET /user answered 200" in text
    assert "FAIL  Rate budget: Redis connection 'budget_down' cannot be used (ConnectionError" in text
    assert "Fix: check that Redis is up" in text and "shared cluster-wide" not in text

    code, text = run(
        check, connect(monkeypatch, SANDBOX_KEY, sandbox.base_url, redis_conn_id="no_such_redis")
    )
    assert code == 1, text
    assert "FAIL  Rate budget: Redis connection 'no_such_redis' cannot be used" in text
    assert "Fix: create the Airflow connection 'no_such_redis' (type redis), or correct redis_conn_id" in text


def test_check_is_green_with_a_reachable_redis(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from tests.redis_server import RedisServer

    with RedisServer(tmp_path) as server:
        monkeypatch.setenv("AIRFLOW_CONN_BUDGET_UP", server.connection_json())
        code, text = run(
            check, connect(monkeypatch, SANDBOX_KEY, sandbox.base_url, redis_conn_id="budget_up")
        )
    assert code == 0, text
    assert "shared cluster-wide through Redis connection 'budget_up'" in text


def test_check_names_the_fix_for_a_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = run(check, connect(monkeypatch, "", None))
    assert code == 1 and "FAIL  API key: none. Fix: put the key in the connection's Password" in text


def test_a_missing_connection_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["check", "--conn-id", "no_such_cliniko"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  Connection 'no_such_cliniko'" in out and "Admin > Connections" in out
    assert "AIRFLOW_CONN_NO_SUCH_CLINIKO" in out


def test_patients_are_found_by_reference_and_email(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    connection = connect(monkeypatch, SANDBOX_KEY, sandbox.base_url)
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(SANDBOX_KEY, sandbox.base_url))
    tag = uuid.uuid4().hex[:8]
    ann = ClinikoHook().create_patient(
        "Ann", tag, email=f"ann-{tag}@example.com", old_reference_id=f"R-{tag}"
    )
    code, text = run(patients, connection, [f"R-{tag}", f"none-{tag}"], [f"ann-{tag}@example.com"])
    assert code == 0, text
    found = f"patient {ann['id']} Ann {tag} <ann-{tag}@example.com> reference R-{tag}"
    assert text.splitlines() == [
        f"reference R-{tag}: {found}",
        f"reference none-{tag}: no patient",
        f"email ann-{tag}@example.com: {found}",
    ]
    code, text = run(patients, connection)
    assert code == 1 and "give --reference REF or --email EMAIL" in text


def test_try_upload_uploads_waits_verifies_and_archives(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = connect(monkeypatch, SANDBOX_KEY, sandbox.base_url)
    hook = ClinikoHook("cliniko_cli")
    patient = str(hook.create_patient("Try", uuid.uuid4().hex[:8])["id"])
    code, text = run(try_upload, connection, patient, poll_interval=0.2)
    assert code == 0, text
    lines = text.splitlines()
    steps = [
        "1. Patient",
        "2. File",
        "3. Upload",
        "4. Attachment",
        "5. Processing",
        "6. Verify",
        "7. Archive",
    ]
    assert [line.split(":")[0].strip() for line in lines[1:8]] == [f"ok    {step}" for step in steps]
    assert "S3's ETag matches the bytes sent" in text
    assert "file name, size and content (sha256) match" in text and lines[-1] == "All good."
    (record,) = hook.list_attachments(patient_id=patient, include_archived=True)
    assert record["archived_at"] and record["description"] == commands.TRY_UPLOAD_DESCRIPTION
    assert f"attachment {record['id']} archived" in text


def test_try_upload_to_an_unknown_patient_stops_at_the_first_step(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, text = run(try_upload, connect(monkeypatch, SANDBOX_KEY, sandbox.base_url), "123456789")
    assert code == 1
    assert "FAIL  1. Patient: Cliniko answered 404" in text
    assert "2. File" not in text and "Archive" not in text


def test_the_console_scripts_help_reads_as_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """No reStructuredText markup in a terminal, and every option's default said."""
    with pytest.raises(SystemExit):
        commands.main(["--help"])
    text = capsys.readouterr().out
    assert "Cliniko: check a connection, find patients, try one upload" in text and "``" not in text
    with pytest.raises(SystemExit):
        commands.main(["try-upload", "--help"])
    assert "seconds to wait for processing (default: 300)" in " ".join(capsys.readouterr().out.split())


def test_airflow_loads_the_command_group_where_it_supports_provider_commands() -> None:
    from cliniko_provider.cli.definition import get_cliniko_cli_commands
    from cliniko_provider.get_provider_info import get_provider_info

    info = get_provider_info()
    if not AIRFLOW_V_3_3_PLUS:
        assert "cli" not in info  # Airflow 3.1: the console script `cliniko` instead
        return
    assert info["cli"] == ["cliniko_provider.cli.definition.get_cliniko_cli_commands"]
    (group,) = get_cliniko_cli_commands()
    assert group.name == "cliniko"
    assert [command.name for command in group.subcommands] == ["check", "patients", "try-upload"]
    from airflow.cli.cli_parser import get_parser

    args = get_parser().parse_args(["cliniko", "try-upload", "42", "--conn-id", "mine", "--keep"])
    assert (args.patient_id, args.conn_id, args.keep, args.timeout) == ("42", "mine", True, 300.0)


@pytest.mark.skipif(
    not (os.environ.get("CLINIKO_TEST_API_KEY") and os.environ.get("CLINIKO_TEST_PATIENT_ID")),
    reason="a real Cliniko account: set CLINIKO_TEST_API_KEY and CLINIKO_TEST_PATIENT_ID (a test patient)",
)
def test_against_a_real_cliniko_account(monkeypatch: pytest.MonkeyPatch) -> None:
    user_agent = os.environ.get(
        "CLINIKO_TEST_USER_AGENT", "Airflow Cliniko provider tests (tests@example.com)"
    )
    connection = connect(monkeypatch, os.environ["CLINIKO_TEST_API_KEY"], None, user_agent=user_agent)
    code, text = run(check, connection)
    assert code == 0, text
    code, text = run(try_upload, connection, os.environ["CLINIKO_TEST_PATIENT_ID"])
    assert code == 0, text
