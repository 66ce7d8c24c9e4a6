"""The process: command line, ready line, signals, persistence across restarts, the guide's curl."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cliniko_provider.sandbox.process import SandboxProcess
from tests.sandbox.helpers import USER_AGENT, Client, set_faults, stats

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
    assert (tmp_path / "state.json").exists()


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
    set_faults(sandbox, processing_delay=2.5)
    pending = api.attach(patient["id"], b"still processing", "pending.txt")

    sandbox.kill()  # no clean shutdown
    sandbox.start()
    assert sandbox.port == port
    assert api.get(f"/patients/{patient['id']}").json() == patient
    assert api.get(f"/patient_attachments/{processed['id']}/content").content == b"done"
    assert api.get(f"/patient_attachments/{pending['id']}").json()["processing_completed"] is False
    record = api.wait_processed(pending["id"])
    assert record["filename"] == "pending.txt"
    assert api.get(record["content"]["links"]["self"]).content == b"still processing"
    # An upload made before the restart can still become an attachment, with the same presign secret.
    created = api.post("/patient_attachments", json={"patient_id": patient["id"], "upload_url": waiting_url})
    assert created.status_code == 201
    assert sandbox.stop() == 0


def test_state_file_holds_no_api_keys(sandbox: SandboxProcess, api: Client) -> None:
    api.get("/user")
    assert sandbox.data_dir is not None
    state = (sandbox.data_dir / "state.json").read_text()
    assert api.session.auth is not None
    assert "sandbox-au-test-key" not in state
    assert json.loads(state)["accounts"]


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
