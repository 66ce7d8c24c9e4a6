"""The S3 POST endpoint: every rule of shared/reference/s3-post.md, over real HTTP.

Policies the sandbox would never hand out (other conditions, an expired date, another
access key) are signed here with boto3 and the sandbox's own secret from its data dir,
which also checks the sandbox's verifier against an independent signer.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import cache
from typing import Any
from urllib.parse import quote

import boto3
import pytest
import requests
from botocore.config import Config

from cliniko_provider.sandbox.config import S3_ACCESS_KEY_ID
from cliniko_provider.sandbox.process import SandboxProcess
from cliniko_provider.sandbox.s3_policy import sign_policy
from tests.sandbox.helpers import (
    Client,
    Part,
    decode_policy,
    form_parts,
    s3_post,
    set_faults,
    stats,
    store_secret,
    xml_value,
)

BUCKET = "cliniko-sandbox-au1"
REGION = "ap-southeast-2"


@cache
def _s3_client(access_key: str, secret: str, region: str) -> Any:
    return boto3.client(
        "s3",
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=Config(signature_version="s3v4"),
    )


def sandbox_secret(sandbox: SandboxProcess) -> str:
    assert sandbox.data_dir is not None
    return store_secret(sandbox.data_dir)


def signed_fields(
    sandbox: SandboxProcess,
    conditions: list[Any] | None = None,
    fields: dict[str, str] | None = None,
    expires: int = 900,
    access_key: str = S3_ACCESS_KEY_ID,
    region: str = REGION,
) -> dict[str, str]:
    """A presigned post of our own making, signed with the sandbox's secret."""
    client = _s3_client(access_key, sandbox_secret(sandbox), region)
    key = f"tests/{uuid.uuid4()}/${{filename}}"
    post = client.generate_presigned_post(
        BUCKET, key, Fields=fields or {}, Conditions=conditions or [], ExpiresIn=expires
    )
    return dict(post["fields"])


def bucket_url(sandbox: SandboxProcess) -> str:
    return f"{sandbox.root_url}/s3/{BUCKET}/"


def s3_error(response: requests.Response) -> dict[str, str]:
    assert response.headers["Content-Type"].startswith("application/xml"), response.text
    root = ET.fromstring(response.text)
    assert root.tag == "Error"
    error = {child.tag: child.text or "" for child in root}
    assert {"Code", "Message", "RequestId", "HostId"} <= set(error)
    return error


@pytest.fixture
def presign(api: Client, patient: dict[str, Any]) -> dict[str, Any]:
    return api.presign(patient["id"])


def test_sandbox_signature_code_matches_boto3() -> None:
    """Our HMAC chain gives boto3's signature, and a change to the policy changes it."""
    client = _s3_client(S3_ACCESS_KEY_ID, "not-the-sandbox-secret", "eu-west-2")
    fields = client.generate_presigned_post("bucket", "a/${filename}", ExpiresIn=60)["fields"]
    day = fields["x-amz-credential"].split("/")[1]
    assert (
        sign_policy(fields["policy"], "not-the-sandbox-secret", day, "eu-west-2") == fields["x-amz-signature"]
    )
    assert (
        sign_policy(fields["policy"] + "x", "not-the-sandbox-secret", day, "eu-west-2")
        != fields["x-amz-signature"]
    )
    assert sign_policy(fields["policy"], "other-secret", day, "eu-west-2") != fields["x-amz-signature"]


def test_presign_fields_order_and_policy(
    presign: dict[str, Any], api: Client, patient: dict[str, Any]
) -> None:
    fields = presign["fields"]
    assert list(fields) == [
        "key",
        "policy",
        "x-amz-credential",
        "x-amz-signature",
        "x-amz-algorithm",
        "x-amz-date",
        "success_action_status",
        "acl",
    ]
    assert re.fullmatch(
        rf"\d+/patients/{patient['id']}/attachments/temp/[0-9a-f-]{{36}}/\$\{{filename\}}", fields["key"]
    )
    assert fields["x-amz-algorithm"] == "AWS4-HMAC-SHA256"
    assert (fields["success_action_status"], fields["acl"]) == ("201", "private")
    conditions = decode_policy(fields["policy"])["conditions"]
    assert {"bucket": BUCKET} in conditions
    assert ["starts-with", "$key", fields["key"].removesuffix("${filename}")] in conditions
    assert {"acl": "private"} in conditions and {"success_action_status": "201"} in conditions
    assert ["content-length-range", 0, 5 * 1024**3] in conditions
    assert presign["url"] == f"{api.sandbox.root_url}/s3/{BUCKET}/"


def test_upload_answers_201_with_post_response(presign: dict[str, Any], sandbox: SandboxProcess) -> None:
    data = b"%PDF-1.4 hello" * 100
    response = s3_post(presign["url"], form_parts(presign["fields"], file=("My Report.pdf", data)))
    assert response.status_code == 201, response.text
    root = ET.fromstring(response.text)
    assert root.tag == "PostResponse"
    key = presign["fields"]["key"].replace("${filename}", "My Report.pdf")
    assert xml_value(response.text, "Key") == key
    assert xml_value(response.text, "Bucket") == BUCKET
    assert xml_value(response.text, "Location") == presign["url"] + quote(key, safe="")
    assert "%2F" in xml_value(response.text, "Location")
    etag = f'"{hashlib.md5(data).hexdigest()}"'
    assert xml_value(response.text, "ETag") == response.headers["ETag"] == etag


def test_field_names_are_case_insensitive(presign: dict[str, Any]) -> None:
    fields = {name.upper() if name != "key" else "Key": value for name, value in presign["fields"].items()}
    response = s3_post(presign["url"], form_parts(fields, file=("a.txt", b"abc")))
    assert response.status_code == 201, response.text


def test_filename_takes_only_the_last_path_segment(presign: dict[str, Any]) -> None:
    response = s3_post(presign["url"], form_parts(presign["fields"], file=("C:\\Users\\me\\scan.png", b"x")))
    assert response.status_code == 201
    assert xml_value(response.text, "Key").endswith("/scan.png")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"x-amz-signature": "0" * 64}, "SignatureDoesNotMatch"),
        (
            {"x-amz-credential": "AKIAOTHERKEY00000000/20240101/ap-southeast-2/s3/aws4_request"},
            "InvalidAccessKeyId",
        ),
    ],
)
def test_tampered_credentials_are_refused(presign: dict[str, Any], change: dict[str, str], code: str) -> None:
    response = s3_post(presign["url"], form_parts({**presign["fields"], **change}, file=("a.txt", b"abc")))
    assert response.status_code == 403
    assert s3_error(response)["Code"] == code


def test_a_policy_edited_by_the_client_fails_the_signature(presign: dict[str, Any]) -> None:
    import base64

    document = decode_policy(presign["fields"]["policy"])
    document["conditions"] = [c for c in document["conditions"] if c != {"acl": "private"}]
    forged = base64.b64encode(json.dumps(document).encode()).decode()
    parts = form_parts({**presign["fields"], "policy": forged, "acl": "public-read"}, file=("a.txt", b"abc"))
    response = s3_post(presign["url"], parts)
    assert response.status_code == 403
    assert s3_error(response)["Code"] == "SignatureDoesNotMatch"


def test_signature_made_by_boto3_with_the_sandbox_secret_is_accepted(sandbox: SandboxProcess) -> None:
    fields = signed_fields(sandbox)
    response = s3_post(bucket_url(sandbox), form_parts(fields, file=("ok.bin", b"123")))
    assert response.status_code == 204  # no success_action_status: S3's default
    assert response.text == ""


def test_success_action_status_200(sandbox: SandboxProcess) -> None:
    fields = signed_fields(sandbox, [{"success_action_status": "200"}], {"success_action_status": "200"})
    response = s3_post(bucket_url(sandbox), form_parts(fields, file=("ok.bin", b"123")))
    assert response.status_code == 200 and response.text == ""


def test_wrong_region_is_refused(sandbox: SandboxProcess) -> None:
    fields = signed_fields(sandbox, region="us-west-1")
    response = s3_post(bucket_url(sandbox), form_parts(fields, file=("a.bin", b"1")))
    assert response.status_code == 400
    assert s3_error(response)["Code"] == "AuthorizationQueryParametersError"


def test_expired_policy_is_refused(sandbox: SandboxProcess) -> None:
    fields = signed_fields(sandbox, expires=-5)
    response = s3_post(bucket_url(sandbox), form_parts(fields, file=("a.bin", b"1")))
    assert response.status_code == 403
    error = s3_error(response)
    assert (error["Code"], error["Message"]) == (
        "AccessDenied",
        "Invalid according to Policy: Policy expired.",
    )


def test_presign_ttl_control_shortens_the_policy(
    sandbox: SandboxProcess, api: Client, patient: dict[str, Any]
) -> None:
    set_faults(sandbox, presign_ttl=0)
    try:
        post = api.presign(patient["id"])
    finally:
        set_faults(sandbox, presign_ttl=900)
    response = s3_post(post["url"], form_parts(post["fields"], file=("a.bin", b"1")))
    assert response.status_code == 403
    assert s3_error(response)["Message"] == "Invalid according to Policy: Policy expired."


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"acl": "public-read"}, '["eq", "$acl", "private"]'),
        ({"success_action_status": "200"}, '["eq", "$success_action_status", "201"]'),
        ({"key": "elsewhere/${filename}"}, '["starts-with", "$key", '),
    ],
)
def test_failed_conditions_are_named(presign: dict[str, Any], change: dict[str, str], failed: str) -> None:
    response = s3_post(presign["url"], form_parts({**presign["fields"], **change}, file=("a.txt", b"abc")))
    assert response.status_code == 403
    error = s3_error(response)
    assert error["Code"] == "AccessDenied"
    assert error["Message"].startswith(f"Invalid according to Policy: Policy Condition failed: {failed}")


def test_a_field_the_policy_does_not_cover_is_refused(presign: dict[str, Any]) -> None:
    parts = form_parts(presign["fields"], extra={"Content-Type": "application/pdf"}, file=("a.pdf", b"abc"))
    response = s3_post(presign["url"], parts)
    assert response.status_code == 403
    assert s3_error(response)["Message"] == "Invalid according to Policy: Extra input fields: content-type"


def test_x_ignore_fields_need_no_condition(presign: dict[str, Any]) -> None:
    parts = form_parts(presign["fields"], extra={"x-ignore-trace": "42"}, file=("a.pdf", b"abc"))
    assert s3_post(presign["url"], parts).status_code == 201


def test_fields_after_the_file_are_ignored(presign: dict[str, Any]) -> None:
    parts = [*form_parts(presign["fields"], file=("a.pdf", b"abc")), Part("Content-Type", b"text/plain")]
    assert s3_post(presign["url"], parts).status_code == 201
    # ...so a required field sent after the file counts as missing.
    fields = dict(presign["fields"])
    acl = fields.pop("acl")
    parts = [*form_parts(fields, file=("a.pdf", b"abc")), Part("acl", acl.encode())]
    response = s3_post(presign["url"], parts)
    assert response.status_code == 403
    assert "Policy Condition failed" in s3_error(response)["Message"]


@pytest.mark.parametrize("field", ["key", "policy", "x-amz-signature", "x-amz-credential"])
def test_a_missing_or_late_field_is_an_invalid_argument(presign: dict[str, Any], field: str) -> None:
    fields = dict(presign["fields"])
    value = fields.pop(field)
    parts = [*form_parts(fields, file=("a.pdf", b"abc")), Part(field, value.encode())]
    response = s3_post(presign["url"], parts)
    assert response.status_code == 400
    error = s3_error(response)
    assert error["Code"] == "InvalidArgument"
    assert error["Message"].startswith(f"Bucket POST must contain a field named '{field}'")
    assert error["ArgumentName"] == field


def test_no_file_is_refused(presign: dict[str, Any]) -> None:
    response = s3_post(presign["url"], form_parts(presign["fields"]))
    assert response.status_code == 400
    assert s3_error(response)["ArgumentName"] == "file"


def test_exactly_one_file(presign: dict[str, Any]) -> None:
    parts = [*form_parts(presign["fields"], file=("a.pdf", b"abc")), Part("file", b"more", "b.pdf")]
    response = s3_post(presign["url"], parts)
    assert response.status_code == 400
    assert s3_error(response)["Code"] == "IncorrectNumberOfFilesInPostRequest"


def test_duplicate_field_is_malformed(presign: dict[str, Any]) -> None:
    parts = [Part("acl", b"private"), *form_parts(presign["fields"], file=("a.pdf", b"abc"))]
    response = s3_post(presign["url"], parts)
    assert response.status_code == 400
    assert s3_error(response)["Code"] == "MalformedPOSTRequest"


def test_pre_data_over_20_kb_is_refused(presign: dict[str, Any]) -> None:
    parts = form_parts(presign["fields"], extra={"x-ignore-padding": "p" * 20_000}, file=("a.pdf", b"abc"))
    response = s3_post(presign["url"], parts)
    assert response.status_code == 400
    assert s3_error(response)["Code"] == "MaxPostPreDataLengthExceededError"
    # Just under the limit is fine.
    parts = form_parts(presign["fields"], extra={"x-ignore-padding": "p" * 15_000}, file=("a.pdf", b"abc"))
    assert s3_post(presign["url"], parts).status_code == 201


def test_entity_too_large_and_too_small(sandbox: SandboxProcess) -> None:
    fields = signed_fields(sandbox, [["content-length-range", 5, 10]])
    large = s3_post(bucket_url(sandbox), form_parts(fields, file=("a.bin", b"x" * 11)))
    assert large.status_code == 400
    error = s3_error(large)
    assert (error["Code"], error["ProposedSize"], error["MaxSizeAllowed"]) == ("EntityTooLarge", "11", "10")
    small = s3_post(bucket_url(sandbox), form_parts(fields, file=("a.bin", b"x" * 4)))
    assert small.status_code == 400
    error = s3_error(small)
    assert (error["Code"], error["ProposedSize"], error["MinSizeAllowed"]) == ("EntityTooSmall", "4", "5")
    for size in (5, 10):
        assert (
            s3_post(bucket_url(sandbox), form_parts(fields, file=("a.bin", b"x" * size))).status_code == 204
        )


def test_policy_must_name_the_sigv4_fields(sandbox: SandboxProcess) -> None:
    """A policy without a bucket condition (hand-signed, since boto3 always adds one) is invalid."""
    import base64

    fields = signed_fields(sandbox)
    document = decode_policy(fields["policy"])
    document["conditions"] = [c for c in document["conditions"] if "bucket" not in c]
    policy = base64.b64encode(json.dumps(document).encode()).decode()
    day = fields["x-amz-credential"].split("/")[1]
    signature = sign_policy(policy, sandbox_secret(sandbox), day, REGION)
    parts = form_parts({**fields, "policy": policy, "x-amz-signature": signature}, file=("a.bin", b"1"))
    response = s3_post(bucket_url(sandbox), parts)
    assert response.status_code == 400
    assert s3_error(response)["Code"] == "InvalidPolicyDocument"


def test_content_length_is_required(presign: dict[str, Any]) -> None:
    from tests.sandbox.helpers import encode_multipart

    body, content_type = encode_multipart(form_parts(presign["fields"], file=("a.pdf", b"abc")))

    def chunks() -> Iterator[bytes]:
        yield body  # a generator makes requests send Transfer-Encoding: chunked

    response = requests.post(
        presign["url"], data=chunks(), headers={"Content-Type": content_type}, timeout=10
    )
    assert response.status_code == 411
    assert s3_error(response)["Code"] == "MissingContentLength"


def test_malformed_bodies(presign: dict[str, Any], sandbox: SandboxProcess) -> None:
    form = requests.post(presign["url"], data={"key": "x"}, timeout=10)  # urlencoded, not multipart
    assert form.status_code == 400 and s3_error(form)["Code"] == "MalformedPOSTRequest"
    from tests.sandbox.helpers import encode_multipart

    body, content_type = encode_multipart(form_parts(presign["fields"], file=("a.pdf", b"abc")))
    truncated = body[: -len(b"--sandbox-test-boundary--\r\n") - 5]
    response = requests.post(
        presign["url"], data=truncated, headers={"Content-Type": content_type}, timeout=10
    )
    assert response.status_code == 400 and s3_error(response)["Code"] == "MalformedPOSTRequest"


def test_unknown_bucket(sandbox: SandboxProcess, presign: dict[str, Any]) -> None:
    response = s3_post(
        f"{sandbox.root_url}/s3/no-such-bucket/", form_parts(presign["fields"], file=("a", b"1"))
    )
    assert response.status_code == 404 and s3_error(response)["Code"] == "NoSuchBucket"


def test_connection_reset_mid_upload_stores_nothing(sandbox: SandboxProcess, presign: dict[str, Any]) -> None:
    before = stats(sandbox)["temp_objects"]
    set_faults(sandbox, s3_reset_after_bytes=200_000)
    with pytest.raises(requests.ConnectionError):
        s3_post(presign["url"], form_parts(presign["fields"], file=("big.bin", b"z" * 3_000_000)))
    assert stats(sandbox)["temp_objects"] == before
    assert set_faults(sandbox)["s3_reset_after_bytes"] is None  # one-shot
    response = s3_post(presign["url"], form_parts(presign["fields"], file=("big.bin", b"z" * 3_000_000)))
    assert response.status_code == 201
    assert stats(sandbox)["temp_objects"] == before + 1


def test_corrupt_s3_objects_flips_a_byte_and_answers_the_stored_etag(
    sandbox: SandboxProcess, api: Client, patient: dict[str, Any]
) -> None:
    data = b"%PDF-1.4 report" * 1000
    assert set_faults(sandbox, corrupt_s3_objects=1)["corrupt_s3_objects"] == 1
    post = api.presign(patient["id"])
    response = s3_post(post["url"], form_parts(post["fields"], file=("r.pdf", data)))
    assert response.status_code == 201
    stored = bytes([data[0] ^ 0xFF]) + data[1:]
    etag = f'"{hashlib.md5(stored).hexdigest()}"'
    assert response.headers["ETag"] == xml_value(response.text, "ETag") == etag
    assert set_faults(sandbox)["corrupt_s3_objects"] == 0  # counted down
    record = api.post(
        "/patient_attachments",
        json={"patient_id": patient["id"], "upload_url": post["url"] + xml_value(response.text, "Key")},
    ).json()
    assert api.get(f"/patient_attachments/{api.wait_processed(record['id'])['id']}/content").content == stored
    again = api.presign(patient["id"])
    clean = s3_post(again["url"], form_parts(again["fields"], file=("r.pdf", data)))
    assert clean.headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert stats(sandbox)["corrupted"]["s3_objects"] >= 1
