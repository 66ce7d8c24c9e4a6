"""The process: command line, ready line, signals, persistence across restarts, the guide's curl."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cliniko_provider.sandbox.process import SandboxProcess
from tests.sandbox.helpers import USER_AGENT, Client, query_store, set_faults, stats, store_secret

Start = Callable[..., SandboxProcess]
COMMAND = [sys.executable, "-m", "cliniko_provider.sandbox"]


def run_until_ready(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_and_clean_stop(signum: int, tmp_path: Path) -> None:
    process, line = run_until_ready("--port", "0", "--data-dir", str(tmp_path))
    assert re.fullmatch(r"Cliniko sandbox ready: http://127\.0\.0\.1:\d+/v1\n", line), line
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert stdout == ""  # exactly one line on stdout
    assert (tmp_path / "sandbox.db").exists()


@pytest.mark.slow
def test_default_data_dir_is_temporary_and_removed(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([*COMMAND, "--port", "0"], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None and process.stdout.readline().startswith("Cliniko sandbox ready")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("cliniko-sandbox-")]
    process.terminate()
    assert process.wait(10) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("cliniko-sandbox-")]


@pytest.mark.slow
def test_installed_command_and_help() -> None:
    script = shutil.which("cliniko-sandbox", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in (
        "--api-key",
        "--data-dir",
        "--processing-delay",
        "--rate-limit",
        "--storage-limit",
        "--presign-ttl",
        "--fail-rate",
        "--throttle-rate",
        "--seed",
        "--host",
        "--port",
    ):
        assert option in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [["--rate-limit", "lots"], ["--fail-rate", "1.5"], ["--fail-rate", "0.7", "--throttle-rate", "0.7"]],
)
def test_bad_arguments_exit_2(args: list[str]) -> None:
    result = subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_fixed_port_and_restart_keep_state_and_resume_processing(
    start_sandbox: Start, tmp_path: Path
) -> None:
    sandbox = start_sandbox("--processing-delay", "0", "--processing-delay-per-mb", "0")
    port = sandbox.port
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient(old_reference_id="P-42")
    processed = api.attach(patient["id"], b"done")
    api.wait_processed(processed["id"])
    _, waiting_url = api.upload(patient["id"], b"waiting in temp")
    set_faults(sandbox, processing_delay=10)  # still pending after a restart on a busy machine
    pending = api.attach(patient["id"], b"still processing", "pending.txt")

    sandbox.kill()  # no clean shutdown
    sandbox.start()
    assert sandbox.port == port
    assert api.get(f"/patients/{patient['id']}").json() == patient
    assert api.get(f"/patient_attachments/{processed['id']}/content").content == b"done"
    assert api.get(f"/patient_attachments/{pending['id']}").json()["processing_completed"] is False
    record = api.wait_processed(pending["id"], timeout=30)
    assert record["filename"] == "pending.txt"
    assert api.get(record["content"]["links"]["self"]).content == b"still processing"
    # An upload made before the restart can still become an attachment, with the same presign secret.
    created = api.post("/patient_attachments", json={"patient_id": patient["id"], "upload_url": waiting_url})
    assert created.status_code == 201
    assert sandbox.stop() == 0


def test_state_files_hold_no_api_keys(sandbox: SandboxProcess, api: Client) -> None:
    api.get("/user")
    assert sandbox.data_dir is not None
    state = b"".join(path.read_bytes() for path in sandbox.data_dir.glob("sandbox.db*"))
    assert b"sandbox-au-test-key" not in state
    digests = {row[0] for row in query_store(sandbox.data_dir, "SELECT key_digest FROM accounts")}
    assert hashlib.sha256(b"sandbox-au-test-key").hexdigest() in digests


def test_two_keys_on_different_shards_for_one_key_are_refused(tmp_path: Path) -> None:
    process = subprocess.run(
        [*COMMAND, "--port", "0", "--data-dir", str(tmp_path), "--api-key", "k-au1", "--api-key", "k-uk1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert process.returncode == 2 and "shard suffix" in process.stderr


def curl(*args: str) -> tuple[str, str]:
    """Run curl; returns the body and the HTTP status."""
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, check=True, timeout=30
    )
    body, status = result.stdout.rsplit("\n", 1)
    return body, status


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_upload_guide_curl_commands(sandbox: SandboxProcess, api: Client, tmp_path: Path) -> None:
    """The guide's three steps with real curl, only the URL, key and file changed."""
    patient_id = api.create_patient()["id"]
    api_headers = [
        "-u",
        "sandbox-au-test-key-au1:",
        "-H",
        f"User-Agent: {USER_AGENT}",
        "-H",
        "Accept: application/json",
    ]
    body, status = curl(*api_headers, f"{sandbox.base_url}/patients/{patient_id}/attachment_presigned_post")
    assert status == "200", body
    post = json.loads(body)
    fields = post["fields"]
    document = tmp_path / "test.pdf"
    document.write_bytes(b"%PDF-1.4 curl upload")
    body, status = curl(
        post["url"],
        *("-F", f"x-amz-credential={fields['x-amz-credential']}"),
        *("-F", f"key={fields['key']}"),
        *("-F", f"policy={fields['policy']}"),
        *("-F", f"x-amz-signature={fields['x-amz-signature']}"),
        *("-F", f"x-amz-algorithm={fields['x-amz-algorithm']}"),
        *("-F", f"x-amz-date={fields['x-amz-date']}"),
        *("-F", "success_action_status=201"),
        *("-F", "acl=private"),
        *("-F", f"file=@{document}"),
    )
    assert status == "201", body
    s3_key = re.search(r"<Key>(.*)</Key>", body)
    assert s3_key and s3_key[1].endswith("/test.pdf")
    create_body = {
        "description": "Custom description for this attachment",
        "patient_id": patient_id,
        "upload_url": post["url"] + s3_key[1],
    }
    body, status = curl(
        *api_headers,
        *("-H", "Content-Type: application/json", "-d", json.dumps(create_body)),
        f"{sandbox.base_url}/patient_attachments",
    )
    assert status == "201", body
    record = api.wait_processed(json.loads(body)["id"])
    assert record["filename"] == "test.pdf" and record["content_type"] == "application/pdf"
    assert stats(sandbox)["uploads"] >= 1


def test_acknowledged_writes_survive_kill_9(start_sandbox: Start, tmp_path: Path) -> None:
    """Writes answered a moment before SIGKILL are all there after a restart on the same data dir."""
    sandbox = start_sandbox("--processing-delay", "30")
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    attachment = api.attach(patient["id"], b"acknowledged", "kept.txt", description="kept")
    _, upload_url = api.upload(patient["id"], b"uploaded, not attached")

    def create(number: int) -> str:
        return str(
            Client(sandbox, "sandbox-api-key-au1").create_patient(old_reference_id=f"K-{number}")["id"]
        )

    with ThreadPoolExecutor(4) as pool:
        created = list(pool.map(create, range(40)))
    archived = api.post(f"/patients/{created[0]}/archive")
    assert archived.status_code == 204
    sandbox.kill()

    sandbox.start()
    api = Client(sandbox, "sandbox-api-key-au1")
    listed = api.get("/patients", params={"q[]": ["old_reference_id:~K-", "archived_at:*"], "per_page": 100})
    assert sorted(p["id"] for p in listed.json()["patients"]) == sorted(created)
    assert api.get(f"/patients/{created[0]}").json()["archived_at"] is not None
    assert api.get(f"/patient_attachments/{attachment['id']}").json()["description"] == "kept"
    again = api.post("/patient_attachments", json={"patient_id": patient["id"], "upload_url": upload_url})
    assert again.status_code == 201, again.text


def test_data_dir_is_private(start_sandbox: Start, tmp_path: Path) -> None:
    data_dir = tmp_path / "shared-looking"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    sandbox = start_sandbox("--processing-delay", "0", data_dir=data_dir)
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    api.wait_processed(api.attach(patient["id"], b"private")["id"])
    api.upload(patient["id"], b"private too")
    modes = {
        str(path.relative_to(data_dir)): (path.is_dir(), stat.S_IMODE(path.stat().st_mode))
        for path in [data_dir, *data_dir.rglob("*")]
    }
    assert {"sandbox.db", "objects", "attachments"} <= set(modes)
    assert len([name for name in modes if name.startswith(("objects/", "attachments/"))]) == 2
    wrong = {
        name: oct(mode) for name, (is_dir, mode) in modes.items() if mode != (0o700 if is_dir else 0o600)
    }
    assert wrong == {}


def test_a_data_dir_from_before_sqlite_is_imported_once(start_sandbox: Start, tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    digest = hashlib.sha256(b"sandbox-api-key").hexdigest()
    now = "2026-01-02T03:04:05Z"
    state = {
        "version": 1,
        "s3_secret_key": "old-secret",
        "last_id": 99,
        "accounts": [{"id": 7, "user_id": 8, "shard": "au1", "key_digest": digest, "created_at": now}],
        "patients": [
            {
                "id": 42,
                "account_id": 7,
                "first_name": "Old",
                "last_name": "Timer",
                "email": None,
                "date_of_birth": None,
                "old_reference_id": "OLD-1",
                "created_at": now,
                "updated_at": now,
                "archived_at": None,
            }
        ],
        "attachments": [],
        "objects": [],
    }
    (data_dir / "state.json").write_text(json.dumps(state))
    sandbox = start_sandbox(data_dir=data_dir)
    api = Client(sandbox, "sandbox-api-key-au1")
    assert api.get("/patients", params={"q[]": "old_reference_id:=OLD-1"}).json()["patients"][0]["id"] == "42"
    assert not (data_dir / "state.json").exists() and (data_dir / "state.json.imported").exists()
    assert store_secret(data_dir) == "old-secret"
    assert int(api.create_patient()["id"]) > 99
