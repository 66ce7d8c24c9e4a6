"""Attachment records: creation from an upload, processing, content, archive, filters."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.helpers import sandbox_faults
from tests.sandbox.helpers import Client, form_parts, s3_post, stats, xml_value


def create(api: Client, patient_id: str, upload_url: Any, **body: Any) -> Any:
    return api.post("/patient_attachments", json={"patient_id": patient_id, "upload_url": upload_url, **body})


def test_lifecycle_from_upload_to_content(api: Client, patient: dict[str, Any]) -> None:
    data = bytes(range(256)) * 40
    _, upload_url = api.upload(patient["id"], data, "scan 01.png")
    temp_before = stats(api.sandbox)["temp_objects"]
    response = create(api, patient["id"], upload_url, description="Nightly scan")
    assert response.status_code == 201
    record = response.json()
    assert response.headers["Location"] == record["links"]["self"]
    assert record["processing_completed"] is False
    assert record["filename"] is record["content_type"] is record["size"] is record["processed_at"] is None
    assert record["description"] == "Nightly scan"
    assert record["patient"]["links"]["self"] == patient["links"]["self"]
    assert api.get(record["content"]["links"]["self"]).status_code == 404  # not processed yet

    processed = api.wait_processed(record["id"])
    assert processed["filename"] == "scan 01.png"
    assert processed["content_type"] == "image/png"
    assert processed["size"] == len(data)
    assert processed["processed_at"] is not None
    assert stats(api.sandbox)["temp_objects"] == temp_before - 1  # the temp upload is gone
    content = api.get(processed["content"]["links"]["self"])
    assert content.status_code == 200
    assert hashlib.sha256(content.content).digest() == hashlib.sha256(data).digest()
    assert content.headers["Content-Type"].startswith("image/png")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda post, key: post["url"] + "/" + key,  # the classic `//`
        lambda post, key: post["url"] + quote(key, safe=""),  # the Location element
        lambda post, key: post["url"] + key.replace("report 1", "report1"),  # a space dropped
        lambda post, key: post["url"] + key + "x",
        lambda post, key: post["url"].replace("127.0.0.1", "localhost") + key,
        lambda post, key: post["url"].replace("-au1", "-uk1") + key,
        lambda post, key: key,
        lambda post, key: 42,
        lambda post, key: None,
    ],
    ids=[
        "double-slash",
        "location",
        "space-dropped",
        "altered",
        "other-host",
        "other-bucket",
        "key-only",
        "number",
        "missing",
    ],
)
def test_upload_url_must_be_url_plus_key(api: Client, patient: dict[str, Any], mangle: Any) -> None:
    post, upload_url = api.upload(patient["id"], b"abc", "report 1.pdf")
    key = upload_url.removeprefix(post["url"])
    response = create(api, patient["id"], mangle(post, key))
    assert response.status_code == 422
    assert response.json() == {
        "message": "Validation Failed",
        "errors": {"temp_attachment_url": "is invalid"},
    }
    assert create(api, patient["id"], upload_url).status_code == 201  # the right one still works


def test_upload_url_must_belong_to_that_patient_and_be_fresh(api: Client, patient: dict[str, Any]) -> None:
    other = api.create_patient()
    _, upload_url = api.upload(patient["id"], b"abc")
    assert create(api, other["id"], upload_url).status_code == 422
    assert create(api, patient["id"], upload_url).status_code == 201
    assert create(api, patient["id"], upload_url).status_code == 422  # already used


def test_another_accounts_upload_is_invalid(api: Client, api_uk: Client, patient: dict[str, Any]) -> None:
    _, upload_url = api.upload(patient["id"], b"abc")
    uk_patient = api_uk.create_patient()
    assert create(api_uk, uk_patient["id"], upload_url).status_code == 422


def test_create_validation(api: Client, patient: dict[str, Any]) -> None:
    _, upload_url = api.upload(patient["id"], b"abc")
    long = create(api, patient["id"], upload_url, description="d" * 256)
    assert long.status_code == 422
    assert long.json()["errors"] == {"description": "is too long (maximum is 255 characters)"}
    assert create(api, patient["id"], upload_url, description="d" * 255).status_code == 201
    assert create(api, "", upload_url).status_code == 422
    assert create(api, "999", upload_url).status_code == 404
    assert create(api, "abc", upload_url).status_code == 404
    assert api.post("/patient_attachments", data=b"[1]").status_code == 400


def test_patient_id_may_be_a_json_number(api: Client, patient: dict[str, Any]) -> None:
    _, upload_url = api.upload(patient["id"], b"abc")
    assert create(api, int(patient["id"]), upload_url).status_code == 201  # type: ignore[arg-type]


def test_presign_for_unknown_patient_is_404(api: Client) -> None:
    assert api.get("/patients/123/attachment_presigned_post").status_code == 404
    assert api.get("/patients/x/attachment_presigned_post").status_code == 404


def test_archive_and_delete(api: Client, patient: dict[str, Any]) -> None:
    first = api.attach(patient["id"], b"one", "one.txt")
    second = api.attach(patient["id"], b"two", "two.txt")
    assert api.post(f"/patient_attachments/{first['id']}/archive").status_code == 204
    assert api.delete(f"/patient_attachments/{second['id']}").status_code == 204
    listed = api.get(f"/patients/{patient['id']}/patient_attachments").json()
    assert listed["total_entries"] == 0
    everything = api.get(
        f"/patients/{patient['id']}/patient_attachments", params={"q[]": "archived_at:*"}
    ).json()
    assert {a["id"] for a in everything["patient_attachments"]} == {first["id"], second["id"]}
    archived = api.get(f"/patient_attachments/{first['id']}").json()
    assert archived["archived_at"] is not None
    assert api.post("/patient_attachments/123/archive").status_code == 404
    assert api.delete("/patient_attachments/abc").status_code == 404


def test_attachment_filters(api: Client, patient: dict[str, Any]) -> None:
    a = api.attach(patient["id"], b"a", "alpha.pdf", description="Report 2024-01 for Alpha")
    b = api.attach(patient["id"], b"bb", "beta.csv", description="Invoice batch")
    c = api.attach(patient["id"], b"ccc", "gamma.pdf", description="report 2024-02")
    for record in (a, b, c):
        api.wait_processed(record["id"])

    def ids(*filters: str) -> list[str]:
        response = api.get("/patient_attachments", params={"q[]": [f"patient_id:={patient['id']}", *filters]})
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["patient_attachments"]]

    assert ids() == [a["id"], b["id"], c["id"]]
    assert ids("description:~report") == [a["id"], c["id"]]
    assert ids("description:~~report 2024-0%") == [a["id"], c["id"]]
    assert ids(f"id:={a['id']},{c['id']}") == [a["id"], c["id"]]
    assert ids("filename:=beta.csv") == [b["id"]]
    assert ids("size:>=2") == [b["id"], c["id"]]
    assert ids("processed_at:?") == [a["id"], b["id"], c["id"]]
    assert ids(f"created_at:>={a['created_at']}", "content_type:=application/pdf") == [a["id"], c["id"]]
    other = api.get(f"/patients/{api.create_patient()['id']}/patient_attachments").json()
    assert other["total_entries"] == 0


def test_other_accounts_cannot_see_attachments(api: Client, api_uk: Client, patient: dict[str, Any]) -> None:
    record = api.attach(patient["id"], b"secret")
    assert api_uk.get(f"/patient_attachments/{record['id']}").status_code == 404
    assert api_uk.get(f"/patient_attachments/{record['id']}/content").status_code == 404
    assert api_uk.post(f"/patient_attachments/{record['id']}/archive").status_code == 404
    assert api_uk.get(f"/patients/{patient['id']}/patient_attachments").status_code == 404


def test_upload_overwriting_a_claimed_key_leaves_the_attachment_intact(
    api: Client, patient: dict[str, Any]
) -> None:
    post = api.presign(patient["id"])
    first = s3_post(post["url"], form_parts(post["fields"], file=("same.txt", b"original")))
    upload_url = post["url"] + xml_value(first.text, "Key")
    record = create(api, patient["id"], upload_url).json()
    again = s3_post(post["url"], form_parts(post["fields"], file=("same.txt", b"replaced!")))
    assert again.status_code == 201
    processed = api.wait_processed(record["id"])
    assert api.get(processed["content"]["links"]["self"]).content == b"original"


def finish(api: Client, body: Any) -> requests.Response:
    return requests.post(f"{api.sandbox.root_url}/_sandbox/processing/finish", json=body, timeout=10)


def test_finish_processing_releases_every_pending_attachment_at_once(
    api: Client, patient: dict[str, Any]
) -> None:
    with sandbox_faults(api.sandbox, processing_delay=3600):
        held = []
        for number in range(2):
            _, upload_url = api.upload(patient["id"], b"held %d" % number, f"held-{number}.txt")
            held.append(create(api, patient["id"], upload_url).json()["id"])
    answer = finish(api, {"after": 0})
    assert answer.status_code == 200
    assert answer.json()["rescheduled"] >= 2  # every one still processing, these two included
    for attachment_id in held:
        assert api.wait_processed(attachment_id, timeout=10)["processing_completed"] is True
    assert finish(api, {"after": 86_400}).status_code == 200  # the upper edge; nothing left to move
    assert finish(api, {"after": 86_400}).json() == {"rescheduled": 0}


@pytest.mark.parametrize(
    "body", [{}, {"after": -1}, {"after": 86_401}, {"after": True}, {"after": "5"}, {"after": 1, "x": 2}, [1]]
)
def test_finish_processing_refuses_anything_but_a_delay_in_range(api: Client, body: Any) -> None:
    answer = finish(api, body)
    assert answer.status_code == 400
    assert answer.json()["message"] == 'Expected {"after": seconds}, 0 to 86400'
