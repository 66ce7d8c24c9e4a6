"""Rate limit, fault injection, storage limit and the `/_sandbox` controls."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from cliniko_provider.sandbox.process import SandboxProcess
from tests.sandbox.helpers import (
    FAST_ARGS,
    Client,
    decode_policy,
    form_parts,
    s3_post,
    set_faults,
    stats,
    xml_value,
)

Start = Callable[..., SandboxProcess]


def test_rate_limit_answers_429_until_the_reset_time(start_sandbox: Start) -> None:
    sandbox = start_sandbox("--rate-limit", "3/1")
    api = Client(sandbox, "sandbox-api-key-au1")
    assert [api.get("/user").status_code for _ in range(3)] == [200, 200, 200]
    limited = api.get("/user")
    now = time.time()
    assert limited.status_code == 429
    reset_at = int(limited.headers["X-RateLimit-Reset"])
    assert now < reset_at <= now + 2
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    assert api.get("/user").status_code == 429  # refused requests do not buy time
    time.sleep(max(0.0, reset_at - time.time()) + 0.05)
    assert api.get("/user").status_code == 200
    assert stats(sandbox)["rate_limited"] == 2


def test_rate_limit_is_per_user(start_sandbox: Start) -> None:
    sandbox = start_sandbox(
        *("--rate-limit", "2/60", "--api-key", "first-au1", "--api-key", "second-au1"),
        *("--same-user-key", "first-again-au1=first-au1"),
    )
    first, second = Client(sandbox, "first-au1"), Client(sandbox, "second-au1")
    again = Client(sandbox, "first-again-au1")
    assert again.get("/user").json()["id"] == first.get("/user").json()["id"]  # one user: 2 of 2 spent
    assert first.get("/user").status_code == 429 and again.get("/user").status_code == 429
    assert second.get("/user").status_code == 200  # another user
    # The key without its shard suffix is the same key, so it shares the budget.
    assert Client(sandbox, "first").get("/user").status_code == 429
    assert Client(sandbox, "first-again").get("/user").status_code == 429


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("no-equals", "NEW_KEY=KEY"),
        ("new-au1=unknown-au1", "'unknown-au1' is not an --api-key"),
        ("second-au1=first-au1", "'second-au1' is already an --api-key"),
    ],
)
def test_same_user_key_is_checked(value: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cliniko_provider.sandbox.cli import main

    with pytest.raises(SystemExit):
        main(["--api-key", "first-au1", "--api-key", "second-au1", "--same-user-key", value])
    assert error in capsys.readouterr().err


def test_fault_injection_on_api_and_s3(start_sandbox: Start) -> None:
    sandbox = start_sandbox(*FAST_ARGS)
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    post = api.presign(patient["id"])
    set_faults(sandbox, fail_rate=1.0)
    failed = api.get("/user")
    assert failed.status_code in (500, 502, 503) and failed.headers["X-Sandbox-Fault"] == "fail"
    s3_failed = s3_post(post["url"], form_parts(post["fields"], file=("a.txt", b"abc")))
    assert s3_failed.status_code in (500, 502, 503) and "<Code>InternalError</Code>" in s3_failed.text
    set_faults(sandbox, fail_rate=0.0, throttle_rate=1.0)
    throttled = api.get("/user")
    assert throttled.status_code == 429 and int(throttled.headers["X-RateLimit-Reset"]) >= int(time.time())
    s3_throttled = s3_post(post["url"], form_parts(post["fields"], file=("a.txt", b"abc")))
    assert s3_throttled.status_code == 503 and "<Code>SlowDown</Code>" in s3_throttled.text
    assert s3_throttled.headers["Content-Type"] == "application/xml"
    assert s3_throttled.headers["X-Sandbox-Fault"] == "throttle"
    set_faults(sandbox, throttle_rate=0.0)
    assert api.get("/user").status_code == 200
    counts = stats(sandbox)
    assert (counts["injected_failures"], counts["injected_throttles"]) == (2, 2)
    assert counts["requests_by_route"]["POST /s3/{bucket}/"] == 2


@pytest.mark.slow
def test_faults_are_reproducible_with_a_seed(start_sandbox: Start) -> None:
    def statuses(sandbox: SandboxProcess) -> list[int]:
        api = Client(sandbox, "sandbox-api-key-au1")
        return [api.get("/user").status_code for _ in range(30)]

    args = ("--fail-rate", "0.3", "--throttle-rate", "0.2", "--seed", "7", "--rate-limit", "1000/60")
    sandbox = start_sandbox(*args)
    first = statuses(sandbox)
    assert {200, 429} <= set(first) and set(first) & {500, 502, 503}
    sandbox.restart()
    assert statuses(sandbox) == first


def test_controls_validate_their_input(sandbox: SandboxProcess) -> None:
    url = f"{sandbox.root_url}/_sandbox/faults"
    for bad in ({"fail_rate": 2}, {"fail_rate": 0.6, "throttle_rate": 0.6}, {"nope": 1}, {"rate_limit": "x"}):
        assert requests.post(url, json=bad, timeout=5).status_code == 400
    current = requests.get(url, timeout=5).json()
    assert current["fail_rate"] == 0.0 and current["rate_limit"] == "100000/60"


def test_stats_count_and_reset(start_sandbox: Start) -> None:
    sandbox = start_sandbox(*FAST_ARGS)
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    api.attach(patient["id"], b"x" * 1000)
    counts = stats(sandbox)
    assert counts["requests_by_route"]["POST /v1/patients"] == 1
    assert counts["requests_by_route"]["POST /v1/patient_attachments"] == 1
    assert sum(counts["requests_by_key"].values()) == 3
    assert not any("sandbox-api-key-au1" in key for key in counts["requests_by_key"])  # masked
    assert counts["bytes_received"] > 1000 and counts["uploads"] == 1
    assert (counts["patients"], counts["attachments"]) == (1, 1)
    assert requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", timeout=5).status_code == 403
    assert requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json=[], timeout=5).status_code == 400
    assert requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", json={}, timeout=5).status_code == 204
    after = stats(sandbox)
    assert after["requests_total"] == 0 and after["attachments"] == 1


@pytest.mark.slow
def test_processing_delay_control_and_per_mb_component(start_sandbox: Start) -> None:
    sandbox = start_sandbox("--processing-delay", "0", "--processing-delay-per-mb", "1.0")
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    started = time.monotonic()
    record = api.attach(patient["id"], b"m" * (1024 * 1024))  # 1 MiB: about a second
    assert api.get(f"/patient_attachments/{record['id']}").json()["processing_completed"] is False
    api.wait_processed(record["id"])
    assert time.monotonic() - started >= 0.9
    set_faults(sandbox, processing_delay=0, processing_delay_per_mb=0)
    quick = api.attach(patient["id"], b"q")
    api.wait_processed(quick["id"], timeout=1.0)


def upload(api: Client, patient_id: str, size: int, post: dict[str, Any] | None = None) -> Any:
    post = post or api.presign(patient_id)
    return post, s3_post(post["url"], form_parts(post["fields"], file=("f.bin", b"s" * size)))


def test_storage_limit(start_sandbox: Start) -> None:
    sandbox = start_sandbox(*FAST_ARGS, "--storage-limit", "100")
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    _, too_big = upload(api, patient["id"], 101)
    assert too_big.status_code == 400 and "<Code>EntityTooLarge</Code>" in too_big.text
    # Two presigns made while 100 bytes are free; the second create would pass the limit.
    first_post, first = upload(api, patient["id"], 60)
    second_post, second = upload(api, patient["id"], 60)
    assert first.status_code == second.status_code == 201

    def create(post: dict[str, Any], response: Any) -> Any:
        upload_url = post["url"] + xml_value(response.text, "Key")
        return api.post("/patient_attachments", json={"patient_id": patient["id"], "upload_url": upload_url})

    assert create(first_post, first).status_code == 201
    refused = create(second_post, second)
    assert refused.status_code == 422
    assert refused.json()["errors"]["base"].startswith("File storage limit reached")
    policy = api.presign(patient["id"])["fields"]["policy"]
    assert ["content-length-range", 0, 40] in decode_policy(policy)["conditions"]
    last_post, last = upload(api, patient["id"], 40)
    assert create(last_post, last).status_code == 201
    full = api.get(f"/patients/{patient['id']}/attachment_presigned_post")
    assert full.status_code == 422
    assert full.json()["message"] == "Validation Failed"
    assert full.json()["errors"]["base"].startswith("File storage limit reached")


def test_controls_cannot_be_used_from_a_web_page(sandbox: SandboxProcess) -> None:
    """A page in the user's browser: form posts, other origins, DNS rebinding; all refused (403)."""
    url = f"{sandbox.root_url}/_sandbox/faults"
    port = sandbox.port
    before = requests.get(url, timeout=5).json()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    attempts = [
        ({**form}, '{"fail_rate": 1}'),
        ({"Content-Type": "text/plain"}, '{"fail_rate": 1}'),
        ({}, '{"fail_rate": 1}'),
        ({"Content-Type": "application/json", "Origin": "https://evil.example"}, '{"fail_rate": 1}'),
        ({"Content-Type": "application/json", "Origin": "null"}, '{"fail_rate": 1}'),
        ({"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port + 1}"}, '{"fail_rate": 1}'),
        ({"Content-Type": "application/json", "Host": f"evil.example:{port}"}, '{"fail_rate": 1}'),
        ({"Content-Type": "application/json", "Host": f"127.0.0.1:{port + 1}"}, '{"fail_rate": 1}'),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, '{"fail_rate": 1}'),
    ]
    for headers, body in attempts:
        response = requests.post(url, data=body, headers=headers, timeout=5)
        assert response.status_code == 403, (headers, response.text)
        assert response.json()["message"].startswith("Refused: ")
    rebound = requests.get(f"{sandbox.root_url}/_sandbox/stats", headers={"Host": "evil.example"}, timeout=5)
    assert rebound.status_code == 403
    reset = requests.post(f"{sandbox.root_url}/_sandbox/stats/reset", headers=form, data="{}", timeout=5)
    assert reset.status_code == 403
    assert requests.get(url, timeout=5).json() == before
    same_origin = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
    assert requests.post(url, json={}, headers=same_origin, timeout=5).status_code == 200
    assert requests.post(url, json=[], timeout=5).status_code == 400


def test_corruption_controls_take_whole_counts(sandbox: SandboxProcess) -> None:
    url = f"{sandbox.root_url}/_sandbox/faults"
    for name in ("corrupt_s3_objects", "corrupt_processed_sizes", "corrupt_processed_contents"):
        for bad in (-1, 1.5, True, "1", None):
            response = requests.post(url, json={name: bad}, timeout=5)
            assert response.status_code == 400 and name in response.json()["message"], (name, bad)
        assert requests.post(url, json={name: 0}, timeout=5).json()[name] == 0


def test_corrupt_processed_size_and_content(start_sandbox: Start) -> None:
    sandbox = start_sandbox(*FAST_ARGS)
    api = Client(sandbox, "sandbox-api-key-au1")
    patient = api.create_patient()
    data = b"0123456789" * 100
    set_faults(sandbox, corrupt_processed_sizes=1)
    sized = api.attach(patient["id"], data)
    assert sized["size"] is None  # set only once processed
    processed = api.wait_processed(sized["id"])
    assert processed["size"] == len(data) + 1
    assert api.get(f"/patient_attachments/{sized['id']}/content").content == data
    set_faults(sandbox, corrupt_processed_contents=1)
    changed = api.wait_processed(api.attach(patient["id"], data)["id"])
    assert changed["size"] == len(data)
    assert api.get(f"/patient_attachments/{changed['id']}/content").content == b"\xcf" + data[1:]
    clean = api.wait_processed(api.attach(patient["id"], data)["id"])
    assert clean["size"] == len(data)
    assert api.get(f"/patient_attachments/{clean['id']}/content").content == data
    assert stats(sandbox)["corrupted"] == {"processed_sizes": 1, "processed_contents": 1}
    current = set_faults(sandbox)
    assert current["corrupt_processed_sizes"] == current["corrupt_processed_contents"] == 0
