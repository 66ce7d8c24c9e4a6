"""The `/v1` API: authentication, User-Agent, patients, filters, pagination, account isolation."""

from __future__ import annotations

import base64
import http.client
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from cliniko_provider.sandbox.process import SandboxProcess
from tests.sandbox.helpers import KEY_AU, USER_AGENT, Client


def raw_get(sandbox: SandboxProcess, path: str, auth: tuple[str, str] | None, agent: str | None) -> Response:
    """A GET through http.client, which sends no User-Agent of its own (requests and urllib3 do)."""
    url = urlsplit(f"{sandbox.base_url}{path}")
    headers = {"User-Agent": agent} if agent is not None else {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    connection = http.client.HTTPConnection(url.netloc, timeout=10)
    try:
        connection.request("GET", url.path, headers=headers)
        reply = connection.getresponse()
        return Response(reply.status, reply.read().decode(), {k.lower(): v for k, v in reply.getheaders()})
    finally:
        connection.close()


@dataclass
class Response:
    status_code: int
    text: str
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.text)


@pytest.mark.parametrize(
    "auth",
    [None, ("wrong-key-au1", ""), (KEY_AU, "secret"), ("", "")],
    ids=["no-auth", "unknown-key", "non-empty-password", "empty-user"],
)
def test_bad_credentials_are_refused_with_rails_plain_text(sandbox: SandboxProcess, auth: Any) -> None:
    response = raw_get(sandbox, "/user", auth, USER_AGENT)
    assert response.status_code == 401
    assert response.text.startswith("HTTP Basic: Access denied")
    assert response.headers["www-authenticate"].startswith("Basic")


def test_key_is_accepted_without_its_shard_suffix(sandbox: SandboxProcess) -> None:
    with_suffix = raw_get(sandbox, "/user", (KEY_AU, ""), USER_AGENT)
    without = raw_get(sandbox, "/user", (KEY_AU.removesuffix("-au1"), ""), USER_AGENT)
    assert with_suffix.status_code == without.status_code == 200
    assert with_suffix.json()["id"] == without.json()["id"]


@pytest.mark.parametrize("agent", [None, "", "   "], ids=["missing", "empty", "blank"])
def test_user_agent_is_required(sandbox: SandboxProcess, agent: str | None) -> None:
    response = raw_get(sandbox, "/user", (KEY_AU, ""), agent)
    assert response.status_code == 400
    assert response.text == "Requires a user agent"


def test_library_default_agents_are_accepted(sandbox: SandboxProcess) -> None:
    assert raw_get(sandbox, "/user", (KEY_AU, ""), requests.utils.default_user_agent()).status_code == 200


def test_user_is_the_keys_own(api: Client, api_uk: Client) -> None:
    mine, theirs = api.get("/user").json(), api_uk.get("/user").json()
    assert mine["id"] != theirs["id"]
    assert mine["links"]["self"] == f"{api.sandbox.base_url}/users/{mine['id']}"
    assert api.get(mine["links"]["self"]).json() == mine
    assert api.get(theirs["links"]["self"]).status_code == 404


def test_create_patient_returns_the_record_and_location(api: Client) -> None:
    body = {
        "first_name": "Grace",
        "last_name": "Hopper",
        "email": "grace@example.com",
        "date_of_birth": "1906-12-09",
        "old_reference_id": "EXT-1",
    }
    response = api.post("/patients", json=body)
    assert response.status_code == 201
    patient = response.json()
    assert {key: patient[key] for key in body} == body
    assert isinstance(patient["id"], str) and int(patient["id"]) > 2**53
    assert (
        response.headers["Location"]
        == patient["links"]["self"]
        == f"{api.sandbox.base_url}/patients/{patient['id']}"
    )
    assert api.get(f"/patients/{patient['id']}").json() == patient


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"first_name": "can't be blank", "last_name": "can't be blank"}),
        ({"first_name": "A", "last_name": "  "}, {"last_name": "can't be blank"}),
        ({"first_name": "A", "last_name": "B", "email": "not-an-email"}, {"email": "is invalid"}),
        (
            {"first_name": "A", "last_name": "B", "date_of_birth": "1990-13-01"},
            {"date_of_birth": "is invalid"},
        ),
        (
            {"first_name": "A" * 256, "last_name": "B"},
            {"first_name": "is too long (maximum is 255 characters)"},
        ),
        ({"first_name": "A", "last_name": "B", "old_reference_id": 5}, {"old_reference_id": "is invalid"}),
    ],
)
def test_invalid_patients_are_refused_with_422(
    api: Client, body: dict[str, Any], errors: dict[str, str]
) -> None:
    response = api.post("/patients", json=body)
    assert response.status_code == 422
    assert response.json() == {"message": "Validation Failed", "errors": errors}


def test_non_json_body_is_a_400(api: Client) -> None:
    assert (
        api.post("/patients", data=b"first_name=A", headers={"Content-Type": "text/plain"}).status_code == 400
    )


@pytest.mark.parametrize(
    "extra",
    [
        b', "custom_fields": {"sections": [{"token": "t", "fields": [{"v": NaN}]}]}',
        b', "custom_fields": {"sections": [{"token": "t", "fields": [{"v": -Infinity}]}]}',
        b', "custom_fields": {"sections": [{"token": "t", "fields": [{"v": 1e999}]}]}',
        b', "title": "Dr\\ud800"',  # a lone surrogate: not a character
        b', "notes": ' + b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["nan", "infinity", "float-overflow", "lone-surrogate", "deep-nesting"],
)
def test_bodies_python_parses_but_json_does_not_allow_are_a_400_and_store_nothing(
    api: Client, extra: bytes
) -> None:
    """Not a 500 (once after storing the patient): what cannot be stored or answered is refused."""
    surname = f"Strict-{uuid.uuid4().hex[:8]}"
    body = b'{"first_name": "Ada", "last_name": "' + surname.encode() + b'"' + extra + b"}"
    response = api.post("/patients", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json() == {"message": "The request body must be a JSON object"}
    assert api.get("/patients", params={"q[]": f"last_name:={surname}"}).json()["total_entries"] == 0
    emoji = "Dr \U0001f600"  # a surrogate pair in the JSON: a real character, fine
    escaped = api.post("/patients", json={"first_name": "Ada", "last_name": surname, "title": emoji})
    assert escaped.status_code == 201 and escaped.json()["title"] == emoji


@pytest.mark.parametrize(
    "path", ["/patients/999", "/patients/abc", "/patients/-1", "/patients/99999999999999999999"]
)
def test_unknown_or_malformed_ids_are_404_json(api: Client, path: str) -> None:
    response = api.get(path)
    assert response.status_code == 404
    assert response.json() == {"message": "Not found"}


def test_unknown_api_path_is_404(api: Client) -> None:
    assert api.get("/no_such_resource").status_code == 404


def test_accounts_see_only_their_own_records(api: Client, api_uk: Client) -> None:
    patient = api.create_patient()
    assert api_uk.get(f"/patients/{patient['id']}").status_code == 404
    assert api_uk.get(f"/patients/{patient['id']}/attachment_presigned_post").status_code == 404
    listed = api_uk.get("/patients", params={"q[]": f"id:={patient['id']}"}).json()
    assert listed["total_entries"] == 0


def test_presign_bucket_follows_the_key_shard(api: Client, api_uk: Client) -> None:
    assert api.presign(api.create_patient()["id"])["url"].endswith("/s3/cliniko-sandbox-au1/")
    assert api_uk.presign(api_uk.create_patient()["id"])["url"].endswith("/s3/cliniko-sandbox-uk1/")


@pytest.fixture
def family(api: Client) -> tuple[str, list[dict[str, Any]]]:
    """Five patients sharing a unique last name, one of them archived."""
    surname = f"Family{uuid.uuid4().hex[:8]}"
    people = [
        api.create_patient(
            first_name="Alice", last_name=surname, email="alice@example.com", old_reference_id="R-1"
        ),
        api.create_patient(first_name="Bob", last_name=surname),
        api.create_patient(first_name="Carol", last_name=surname, old_reference_id="R-3"),
        api.create_patient(first_name="alicia", last_name=surname),
        api.create_patient(first_name="Dave", last_name=surname),
    ]
    assert api.post(f"/patients/{people[4]['id']}/archive").status_code == 204
    return surname, people


def names(api: Client, *filters: str) -> list[str]:
    response = api.get("/patients", params={"q[]": list(filters), "per_page": 100})
    assert response.status_code == 200, response.text
    return [p["first_name"] for p in response.json()["patients"]]


def test_string_filters(api: Client, family: tuple[str, list[dict[str, Any]]]) -> None:
    surname, _ = family
    last = f"last_name:={surname}"
    assert names(api, last) == ["Alice", "Bob", "Carol", "alicia"]
    assert names(api, last, "first_name:=Alice") == ["Alice"]
    assert names(api, last, "first_name:!=Alice") == ["Bob", "Carol", "alicia"]
    assert names(api, last, "first_name:~ALI") == ["Alice", "alicia"]
    assert names(api, last, "first_name:~~a%e") == ["Alice"]
    assert names(api, last, "email:~example") == ["Alice"]
    assert names(api, f"last_name:~~{surname[:-3]}%") == ["Alice", "Bob", "Carol", "alicia"]


def test_null_and_id_filters(api: Client, family: tuple[str, list[dict[str, Any]]]) -> None:
    surname, people = family
    last = f"last_name:={surname}"
    assert names(api, last, "old_reference_id:?") == ["Alice", "Carol"]
    assert names(api, last, "old_reference_id:!?") == ["Bob", "alicia"]
    assert names(api, last, "old_reference_id:=R-3") == ["Carol"]
    assert names(api, f"id:={people[0]['id']},{people[2]['id']}") == ["Alice", "Carol"]
    assert names(api, last, f"id:>{people[1]['id']}") == ["Carol", "alicia"]
    assert names(api, last, f"id:<={people[1]['id']}") == ["Alice", "Bob"]
    assert names(api, last, f"id:!={people[1]['id']}") == ["Alice", "Carol", "alicia"]


def test_date_time_filters(api: Client, family: tuple[str, list[dict[str, Any]]]) -> None:
    surname, people = family
    last = f"last_name:={surname}"
    created = people[0]["created_at"]
    assert names(api, last, f"created_at:>={created}") == ["Alice", "Bob", "Carol", "alicia"]
    assert names(api, last, "created_at:<2000-01-01T00:00:00Z") == []
    assert (
        names(api, last, f"created_at:>{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(time.time() + 5))}")
        == []
    )


def test_archived_records_only_with_an_archived_at_filter(
    api: Client, family: tuple[str, list[dict[str, Any]]]
) -> None:
    surname, people = family
    last = f"last_name:={surname}"
    assert "Dave" not in names(api, last)
    assert names(api, last, "archived_at:*") == ["Alice", "Bob", "Carol", "alicia", "Dave"]
    assert names(api, last, "archived_at:?") == ["Dave"]
    archived = api.get(f"/patients/{people[4]['id']}").json()
    assert archived["archived_at"] is not None


@pytest.mark.parametrize(
    "bad_filter",
    [
        "nope:=1",
        "first_name",
        "first_name:>A",
        "id:~1",
        "id:=abc",
        "created_at:=2024-01-01T00:00:00Z",
        "created_at:>yesterday",
        "first_name:*",
        "id:=" + ",".join(["1"] * 101),
    ],
)
def test_invalid_filters_are_refused(api: Client, bad_filter: str) -> None:
    response = api.get("/patients", params={"q[]": bad_filter})
    assert response.status_code == 422
    assert "q" in response.json()["errors"]


def test_sorting(api: Client, family: tuple[str, list[dict[str, Any]]]) -> None:
    surname, _ = family
    response = api.get("/patients", params={"q[]": f"last_name:={surname}", "sort": "first_name:desc"})
    assert [p["first_name"] for p in response.json()["patients"]] == ["alicia", "Carol", "Bob", "Alice"]
    assert api.get("/patients", params={"sort": "nope"}).status_code == 422


def test_sorting_by_several_fields(api: Client, family: tuple[str, list[dict[str, Any]]]) -> None:
    surname, _ = family
    twin = api.create_patient(first_name="Bob", last_name=surname, old_reference_id="R-0")

    def order(sort: str, **params: str) -> list[tuple[str, str | None]]:
        response = api.get("/patients", params={"q[]": f"last_name:={surname}", "sort": sort, **params})
        assert response.status_code == 200, response.text
        return [(p["first_name"], p["old_reference_id"]) for p in response.json()["patients"]]

    by_name = [("Alice", "R-1"), ("Bob", "R-0"), ("Bob", None), ("Carol", "R-3"), ("alicia", None)]
    assert order("first_name,old_reference_id") == by_name
    assert order("first_name, old_reference_id:desc") == [by_name[0], by_name[2], by_name[1], *by_name[3:]]
    assert order("first_name:desc,old_reference_id") == [
        *by_name[:0:-1][:2],
        by_name[1],
        by_name[2],
        by_name[0],
    ]
    # Nulls last when ascending, then by id; `order` is the direction of fields that name none.
    nulls_last = [("Bob", "R-0"), ("Alice", "R-1"), ("Carol", "R-3"), ("Bob", None), ("alicia", None)]
    assert order("old_reference_id,id") == nulls_last
    assert order("old_reference_id", order="desc") == nulls_last[::-1]
    for bad in ("first_name,nope", "first_name:sideways", "first_name,", ","):
        assert api.get("/patients", params={"sort": bad}).status_code == 422, bad
    assert twin["old_reference_id"] == "R-0"


def test_pagination_links_and_totals(api: Client, family: tuple[str, list[dict[str, Any]]]) -> None:
    surname, _ = family
    params = {"q[]": f"last_name:={surname}", "per_page": "3"}
    first = api.get("/patients", params=params).json()
    assert first["total_entries"] == 4
    assert [p["first_name"] for p in first["patients"]] == ["Alice", "Bob", "Carol"]
    assert "previous" not in first["links"]
    assert first["links"]["self"].startswith(api.sandbox.base_url)
    second = api.get(first["links"]["next"]).json()
    assert [p["first_name"] for p in second["patients"]] == ["alicia"]
    assert "next" not in second["links"]
    assert api.get(second["links"]["previous"]).json()["patients"] == first["patients"]
    beyond = api.get("/patients", params={**params, "page": "9"}).json()
    assert beyond["patients"] == [] and beyond["total_entries"] == 4


def test_per_page_defaults_to_50_and_takes_1_to_100(api: Client) -> None:
    while api.get("/patients").json()["total_entries"] < 101:
        api.create_patient()
    assert len(api.get("/patients").json()["patients"]) == 50
    assert len(api.get("/patients", params={"per_page": 100}).json()["patients"]) == 100
    assert len(api.get("/patients", params={"per_page": 1}).json()["patients"]) == 1
    # Outside Cliniko's schema (1 to 100): refused, not served as another page size.
    for bad in ("101", "0", "500"):
        response = api.get("/patients", params={"per_page": bad})
        assert response.status_code == 422, bad
        assert response.json()["errors"]["q"] == f"Invalid per_page '{bad}': from 1 to 100"
    assert api.get("/patient_attachments", params={"per_page": 101}).status_code == 422
    assert api.get("/patients", params={"page": "x"}).status_code == 422
    first = api.get("/patients", params={"page": "1", "per_page": 1}).json()["patients"]
    assert api.get("/patients", params={"page": "0", "per_page": 1}).json()["patients"] == first


def test_order_takes_asc_or_desc_and_an_invalid_one_is_named(api: Client) -> None:
    for good in ("asc", "DESC", ""):
        assert api.get("/patients", params={"order": good}).status_code == 200, good
    response = api.get("/patients", params={"order": "sideways", "sort": "first_name:desc"})
    assert response.status_code == 422
    assert response.json()["errors"]["q"] == "Invalid order 'sideways': use asc or desc"


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/patients", "GET, HEAD, OPTIONS, POST"),
        ("/patients/1", "GET, HEAD, OPTIONS"),
        ("/patients/1/archive", "OPTIONS, POST"),
        ("/patient_attachments/1", "DELETE, GET, HEAD, OPTIONS"),
        ("/patients/1/attachment_presigned_post", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_and_unsupported_methods_name_what_the_path_allows(
    api: Client, path: str, allow: str
) -> None:
    options = api.session.options(api.url(path), timeout=10)
    assert (options.status_code, options.headers["Allow"]) == (204, allow)
    allowed = set(allow.split(", "))
    for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - allowed):
        refused = api.session.request(method, api.url(path), timeout=10)
        assert (refused.status_code, refused.headers["Allow"]) == (405, allow), method


def test_head_answers_like_get_without_a_body(api: Client, patient: dict[str, Any]) -> None:
    head = api.session.head(api.url(f"/patients/{patient['id']}"), timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert api.session.head(api.url("/patients/1"), timeout=10).status_code == 404


def test_unknown_paths_are_404_for_any_method(api: Client) -> None:
    for method in ("GET", "POST", "PUT", "OPTIONS"):
        assert api.session.request(method, api.url("/appointments"), timeout=10).status_code == 404, method
