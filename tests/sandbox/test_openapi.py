"""Real sandbox answers validated against Cliniko's official OpenAPI description.

The schemas come from `tests/data/cliniko-openapi-subset.json`: the operations the sandbox implements,
extracted from the official description by `make openapi-subset`. OpenAPI 3.0's `nullable`
becomes a JSON-Schema `null` type, and schema patterns are applied case-insensitively (the
published e-mail pattern only admits capitals, which real Cliniko answers do not use).
Formats (`int64`, `date-time`, `date`, `uri`) are checked strictly, and every key the sandbox
sends must be a property the schema declares.
"""

from __future__ import annotations

import json
import re
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from tests.sandbox.helpers import Client

OPENAPI = Path(__file__).resolve().parents[1] / "data" / "cliniko-openapi-subset.json"
BASE = "urn:cliniko-openapi"
# Sent by real Cliniko (upload guide) and required by SigV4, but missing from the schema.
SCHEMA_OMISSIONS = {"x-amz-date"}


def _to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _to_json_schema(value) for key, value in node.items()}
    if converted.pop("nullable", False) is True:
        if isinstance(converted.get("type"), str):
            converted["type"] = [converted["type"], "null"]
        if "enum" in converted:
            converted["enum"] = [*converted["enum"], None]
    if isinstance(converted.get("pattern"), str):
        converted["pattern"] = "(?i)" + converted["pattern"]
    return converted


def _is_int64(value: object) -> bool:
    return not isinstance(value, str) or (re.fullmatch(r"\d{1,19}", value) is not None and int(value) < 2**63)


def _is_datetime(value: object) -> bool:
    return not isinstance(value, str) or re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value) is not None


def _is_date(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        return date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


def _is_uri(value: object) -> bool:
    return not isinstance(value, str) or bool(urlparse(value).scheme and urlparse(value).netloc)


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int64")(_is_int64)
FORMATS.checks("date-time")(_is_datetime)
FORMATS.checks("date")(_is_date)
FORMATS.checks("uri")(_is_uri)


@cache
def registry() -> Registry:
    document = _to_json_schema(json.loads(OPENAPI.read_text()))
    return Registry().with_resource(BASE, Resource.from_contents(document, default_specification=DRAFT7))


def _pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = registry().resolver(BASE).lookup(schema["$ref"]).contents
    return schema


def _declared_keys_only(instance: Any, schema: dict[str, Any], where: str) -> None:
    """Every key sent must be one the schema names (catches misspelt or invented fields)."""
    schema = _resolve(schema)
    for option in schema.get("anyOf", []):
        option = _resolve(option)
        if isinstance(instance, dict) and "filename" in option.get("properties", {}):
            schema = option  # UploadedPatientAttachment, within PatientAttachment
    properties = schema.get("properties")
    if isinstance(instance, dict) and properties:
        unknown = set(instance) - set(properties) - SCHEMA_OMISSIONS
        assert not unknown, f"{where}: keys not in the schema: {sorted(unknown)}"
        for key, value in instance.items():
            _declared_keys_only(value, properties.get(key, {}), f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            _declared_keys_only(item, schema["items"], f"{where}[{index}]")


def _validate(instance: Any, pointer: str, declared_keys_only: bool = True) -> None:
    schema = {"$ref": f"{BASE}#/{pointer}"}
    jsonschema.Draft7Validator(schema, registry=registry(), format_checker=FORMATS).validate(instance)
    if declared_keys_only:
        _declared_keys_only(instance, schema, pointer)


def assert_matches(instance: Any, path: str, method: str = "get", status: str = "200") -> None:
    """Validate against the response schema the OpenAPI file gives for that operation."""
    response_pointer = _pointer("paths", path, method, "responses", status)
    response = registry().resolver(BASE).lookup(f"{BASE}#/{response_pointer}").contents
    if "$ref" in response:  # a shared response, e.g. components/responses/ValidationError
        response_pointer = response["$ref"].removeprefix("#/")
    _validate(instance, f"{response_pointer}/{_pointer('content', 'application/json', 'schema')}")
    # PatientAttachment is "anyOf" a full export or an upload: hold uploads to their own schema.
    records = instance.get("patient_attachments", [instance]) if "patient_attachments" in path else []
    for record in records:
        _validate(record, "components/schemas/UploadedPatientAttachment")


def test_the_checker_rejects_wrong_answers() -> None:
    """The validation used below can fail: bad ids, dates, types and unknown keys are caught."""
    good = {"id": "1", "created_at": "2024-01-01T00:00:00Z", "processing_completed": False, "size": None}
    assert_matches(good, "/patient_attachments/{id}")
    for bad in (
        {**good, "id": 1},
        {**good, "id": "12a"},
        {**good, "created_at": "2024-01-01 00:00"},
        {**good, "size": "12"},
        {**good, "processing_completed": "no"},
        {**good, "procesing_completed": True},
    ):
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            assert_matches(bad, "/patient_attachments/{id}")


def test_user(api: Client) -> None:
    assert_matches(api.get("/user").json(), "/user")


def test_patient_create_get_and_list(api: Client) -> None:
    created = api.post(
        "/patients",
        json={
            "first_name": "Zoë",
            "last_name": "Schema",
            "email": "zo@example.com",
            "date_of_birth": "1990-02-03",
        },
    )
    assert created.status_code == 201
    assert_matches(created.json(), "/patients", "post", "201")
    assert_matches(api.get(f"/patients/{created.json()['id']}").json(), "/patients/{id}")
    assert_matches(api.get("/patients", params={"per_page": 2}).json(), "/patients")


def test_presigned_post(api: Client, patient: dict[str, Any]) -> None:
    assert_matches(api.presign(patient["id"]), "/patients/{patient_id}/attachment_presigned_post")


def test_attachment_before_and_after_processing(api: Client, patient: dict[str, Any]) -> None:
    _, upload_url = api.upload(patient["id"], b"%PDF-1.4 schema", "schema.pdf")
    created = api.post("/patient_attachments", json={"patient_id": patient["id"], "upload_url": upload_url})
    assert created.status_code == 201
    assert_matches(created.json(), "/patient_attachments", "post", "201")
    assert_matches(
        api.get(f"/patient_attachments/{created.json()['id']}").json(), "/patient_attachments/{id}"
    )
    processed = api.wait_processed(created.json()["id"])
    assert_matches(processed, "/patient_attachments/{id}")
    assert_matches(api.get("/patient_attachments").json(), "/patient_attachments")
    listed = api.get(f"/patients/{patient['id']}/patient_attachments").json()
    assert_matches(listed, "/patients/{patient_id}/patient_attachments")


def test_validation_error_body(api: Client) -> None:
    response = api.post("/patients", json={"first_name": "Only"})
    assert response.status_code == 422
    assert_matches(response.json(), "/patients", "post", "422")


def test_the_subset_is_self_contained() -> None:
    """Every operation the sandbox implements is in the subset, and every reference in it resolves."""
    from tests.data.extract_openapi import OPERATIONS, _refs

    document = json.loads(OPENAPI.read_text())
    assert set(document["paths"]) == set(OPERATIONS)
    refs = _refs(document)
    assert len(refs) > 10
    for ref in refs:
        assert registry().resolver(BASE).lookup(f"{BASE}{ref}").contents, ref


FULL_PATIENT = {
    "first_name": "Ada",
    "last_name": "Everything",
    "title": "Dr",
    "preferred_first_name": "Addy",
    "address_1": "1 Main St",
    "address_2": "Unit 2",
    "address_3": "",
    "city": "Melbourne",
    "state": "VIC",
    "post_code": "3000",
    "country": "Australia",
    "country_code": "AU",
    "notes": "Prefers mornings",
    "appointment_notes": "Bring scans",
    "occupation": "Engineer",
    "emergency_contact": "Bob 0400 000 000",
    "medicare": "2123 45670 1",
    "medicare_reference_number": "1",
    "dva_card_number": "NX123456",
    "invoice_email": "accounts@example.com",
    "invoice_default_to": "Patient",
    "invoice_extra_information": "ABN 1",
    "referral_source": "Web",
    "reminder_type": "SMS & Email",
    "sex": "Female",
    "gender_identity": "Woman",
    "time_zone": "Australia/Melbourne",
    "accepted_email_marketing": False,
    "accepted_privacy_policy": True,
    "receives_cancellation_emails": True,
    "receives_confirmation_emails": False,
    "pronouns": {
        "accusative": "her",
        "nominative": "she",
        "predicative_possessive": "hers",
        "pronominal_possessive": "her",
        "reflexive": "herself",
    },
    "patient_phone_numbers": [{"number": "0400 000 001", "phone_type": "Mobile"}],
}


def test_reminder_type_is_always_one_of_the_schemas_four_strings(api: Client) -> None:
    patient_schema = json.loads(OPENAPI.read_text())["components"]["schemas"]["Patient"]
    four = [value for value in patient_schema["properties"]["reminder_type"]["enum"] if value is not None]
    assert four == ["None", "SMS", "Email", "SMS & Email"]  # nullable in the schema, never null from Cliniko
    plain = api.create_patient()
    given_null = api.post("/patients", json={"first_name": "A", "last_name": "B", "reminder_type": None})
    sms = api.post("/patients", json={"first_name": "A", "last_name": "B", "reminder_type": "SMS"})
    assert given_null.status_code == sms.status_code == 201
    # a patient created without one gets the account's default reminder type, "None" in the sandbox
    assert [plain["reminder_type"], given_null.json()["reminder_type"], sms.json()["reminder_type"]] == [
        "None",
        "None",
        "SMS",
    ]
    listed = api.get("/patients").json()["patients"]
    assert listed and all(patient["reminder_type"] in four for patient in listed)


def test_patient_fields_the_sandbox_does_not_model_are_kept_and_echoed(api: Client) -> None:
    request_schema = _pointer(
        "components", "requestBodies", "Patient", "content", "application/json", "schema"
    )
    _validate(FULL_PATIENT, request_schema)  # the body itself is what Cliniko's schema allows
    created = api.post("/patients", json={**FULL_PATIENT, "not_a_cliniko_field": 1})
    assert created.status_code == 201, created.text
    assert_matches(created.json(), "/patients", "post", "201")
    fetched = api.get(f"/patients/{created.json()['id']}").json()
    assert {name: fetched[name] for name in FULL_PATIENT} == FULL_PATIENT
    assert "not_a_cliniko_field" not in fetched
    plain = api.create_patient()
    assert (plain["address_1"], plain["pronouns"], plain["patient_phone_numbers"]) == (None, None, [])
    assert api.create_patient(title="t" * 255)["title"] == "t" * 255  # the longest allowed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("title", "t" * 256),
        ("address_1", 12),
        ("accepted_privacy_policy", "yes"),
        ("reminder_type", "Pigeon"),
        ("invoice_email", "not-an-email"),
        ("dva_card_number", "123"),
        ("pronouns", {"nominative": "they"}),
        ("patient_phone_numbers", [{"number": "1", "phone_type": "Pager"}]),
        ("patient_phone_numbers", "0400 000 000"),
        ("custom_fields", {"sections": "none"}),
    ],
)
def test_patient_fields_outside_the_schema_are_refused(api: Client, field: str, value: Any) -> None:
    response = api.post("/patients", json={"first_name": "Ada", "last_name": "Invalid", field: value})
    assert response.status_code == 422
    assert response.json()["errors"] == {field: "is invalid"}


def test_patient_fields_the_schema_admits_loosely_are_accepted(api: Client) -> None:
    """What the schema allows is not refused (a fuzzer's positive cases): keys it does not name
    inside pronouns or a phone number are dropped, a phone number needs no `number`, and
    `custom_fields` needs no `sections`."""
    body = {
        "first_name": "Ada",
        "last_name": "Loose",
        "pronouns": {**FULL_PATIENT["pronouns"], "vocative": "you"},
        "patient_phone_numbers": [{"number": "0400", "extension": "12"}, {"phone_type": "Home"}],
        "custom_fields": {},
    }
    request_schema = _pointer(
        "components", "requestBodies", "Patient", "content", "application/json", "schema"
    )
    _validate(body, request_schema, declared_keys_only=False)  # the schema admits the extra keys
    created = api.post("/patients", json=body)
    assert created.status_code == 201, created.text
    assert_matches(created.json(), "/patients", "post", "201")
    fetched = api.get(f"/patients/{created.json()['id']}").json()
    assert fetched["pronouns"] == FULL_PATIENT["pronouns"]
    assert fetched["patient_phone_numbers"] == [{"number": "0400"}, {"phone_type": "Home"}]
    assert fetched["custom_fields"] == {}
    missing = {name: FULL_PATIENT["pronouns"][name] for name in ("accusative", "nominative")}
    for field, value in (("pronouns", missing), ("custom_fields", {"sections": None})):
        response = api.post("/patients", json={**body, field: value})
        assert response.status_code == 422, field
        assert response.json()["errors"] == {field: "is invalid"}
