"""Connection settings: shards, base URLs, User-Agent and the connection's extra fields."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from cliniko_provider.exceptions import ClinikoAnswerError, ClinikoConfigError, ClinikoInputError
from cliniko_provider.utils.settings import (
    KNOWN_SHARDS,
    ClinikoSettings,
    _warn_unknown_shard,
    normalise_base_url,
    shard_from_api_key,
)
from cliniko_provider.utils.validation import validate_id

UA = "Acme Reports (ops@acme.example)"


@dataclass
class Conn:
    password: str | None
    host: str | None = None
    extra_dejson: dict[str, Any] = field(default_factory=lambda: {"user_agent": UA})
    conn_id: str = "cliniko_default"


@pytest.mark.parametrize("shard", sorted(KNOWN_SHARDS))
def test_every_known_shard_gives_its_base_url(shard: str) -> None:
    settings = ClinikoSettings.from_connection(Conn(password=f"MS0xLWFiY2RlZmc-{shard}"))
    assert settings.base_url == f"https://api.{shard}.cliniko.com/v1"


def test_key_without_suffix_is_au1() -> None:
    assert shard_from_api_key("MS0xLWFiY2RlZmdoaWprbG1ub3A") == "au1"


@pytest.mark.parametrize("key", ["abc-AU1", "abc-au", "abc-a1", "abc-", "abc-au123", "abc-1au"])
def test_malformed_suffix_is_a_clear_error(key: str) -> None:
    with pytest.raises(ClinikoConfigError, match="shard suffix is malformed") as error:
        shard_from_api_key(key)
    assert key not in str(error.value)


def test_a_well_formed_unknown_shard_is_used_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Cliniko opens shards: any suffix of its shape (two letters, one or two digits) is accepted."""
    _warn_unknown_shard.cache_clear()  # an earlier run in this process (mutmut runs the suite twice) warned
    for _ in range(3):
        settings = ClinikoSettings.from_connection(Conn(password="secretkey-zz9"))
        assert settings.base_url == "https://api.zz9.cliniko.com/v1"
    assert ClinikoSettings.from_connection(Conn(password="secretkey-ab12")).base_url == (
        "https://api.ab12.cliniko.com/v1"
    )
    warnings = [r.getMessage() for r in caplog.records if "not one this provider knows" in r.getMessage()]
    assert len(warnings) == 2  # once per shard, however many connections use it
    assert "'zz9'" in warnings[0] and "https://api.zz9.cliniko.com/v1" in warnings[0]
    assert "secretkey" not in caplog.text


def test_known_shards_give_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    ClinikoSettings.from_connection(Conn(password="secretkey-uk3"))
    assert "not one this provider knows" not in caplog.text


@pytest.mark.parametrize("password", [None, "", "   "])
def test_missing_key_names_the_password_field(password: str | None) -> None:
    with pytest.raises(ClinikoConfigError, match="no API key: put it in the Password field"):
        ClinikoSettings.from_connection(Conn(password=password))


@pytest.mark.parametrize("extra", [{}, {"user_agent": ""}, {"user_agent": "  "}])
def test_missing_user_agent_names_the_field(extra: dict[str, Any]) -> None:
    with pytest.raises(ClinikoConfigError, match=r"no User-Agent.*'user_agent'"):
        ClinikoSettings.from_connection(Conn(password="k-au1", extra_dejson=extra))


@pytest.mark.parametrize("agent", ["python-requests/2.3", "Acme Reports", "Acme (not-an-email)", "(a@b.cd)"])
def test_user_agent_without_name_and_email_is_refused(agent: str) -> None:
    with pytest.raises(ClinikoConfigError, match="app name and a contact email"):
        ClinikoSettings.from_connection(Conn(password="k-au1", extra_dejson={"user_agent": agent}))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("http://127.0.0.1:8765/v1", "http://127.0.0.1:8765/v1"),
        ("http://localhost:8765", "http://localhost:8765/v1"),
        ("http://[::1]:8765/v1/", "http://[::1]:8765/v1"),
        ("http://127.9.9.9/v1", "http://127.9.9.9/v1"),
        ("https://proxy.example.com/cliniko/v1", "https://proxy.example.com/cliniko/v1"),
    ],
)
def test_host_override(host: str, expected: str) -> None:
    assert normalise_base_url(host) == expected
    settings = ClinikoSettings.from_connection(Conn(password="k-uk1", host=host))
    assert settings.base_url == expected


@pytest.mark.parametrize(
    "host", ["http://api.au1.cliniko.com/v1", "http://10.0.0.5:8765", "http://example.com"]
)
def test_plain_http_to_a_remote_host_is_refused(host: str) -> None:
    with pytest.raises(ClinikoConfigError, match=r"Plain http:// is refused.*Use https://"):
        normalise_base_url(host)


def test_non_http_scheme_is_refused() -> None:
    with pytest.raises(ClinikoConfigError, match="not an http"):
        normalise_base_url("ftp://example.com")


def test_extra_numbers_are_read_and_checked() -> None:
    conn = Conn(password="k-au1", extra_dejson={"user_agent": UA, "max_attempts": "3", "timeout": 5})
    settings = ClinikoSettings.from_connection(conn)
    assert (settings.max_attempts, settings.timeout) == (3, 5.0)
    with pytest.raises(ClinikoConfigError, match="'max_attempts' must be a number"):
        ClinikoSettings.from_connection(
            Conn(password="k-au1", extra_dejson={"user_agent": UA, "max_attempts": "x"})
        )
    with pytest.raises(ClinikoConfigError, match="'max_attempts' must be from 1 to 20, got 0"):
        ClinikoSettings.from_connection(
            Conn(password="k-au1", extra_dejson={"user_agent": UA, "max_attempts": 0})
        )


def settings_with(**extra: object) -> ClinikoSettings:
    return ClinikoSettings.from_connection(Conn(password="k-au1", extra_dejson={"user_agent": UA, **extra}))


@pytest.mark.parametrize(
    ("name", "low", "high", "attribute"),
    [
        ("max_attempts", 1, 20, "max_attempts"),
        ("max_rate_limit_wait", 0, 3600, "max_rate_limit_wait"),
        ("timeout", 1, 3600, "timeout"),
        ("requests_per_minute", 1, 1_000_000, "requests_per_minute"),
    ],
)
def test_numeric_extras_take_exactly_their_range(name: str, low: float, high: float, attribute: str) -> None:
    assert getattr(settings_with(**{name: low}), attribute) == low
    assert getattr(settings_with(**{name: str(high)}), attribute) == high
    below = low - 1 if name == "max_attempts" else low - 0.001
    above = high + 1 if name == "max_attempts" else high + 0.001
    for value in (below, above):
        expected = f"'{name}' must be from {low} to {high}, got {value!r}:"
        with pytest.raises(ClinikoConfigError, match=re.escape(expected)):
            settings_with(**{name: value})


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("nan", "a finite number"),
        ("inf", "a finite number"),
        ("-Infinity", "a finite number"),
        (float("nan"), "a finite number"),
        ("1e999", "a finite number"),
        (True, "a number"),
        ([], "a number"),
        ("ten", "a number"),
    ],
)
def test_numeric_extras_must_be_finite_numbers(value: object, kind: str) -> None:
    with pytest.raises(ClinikoConfigError, match=f"'timeout' must be {kind}, got"):
        settings_with(timeout=value)


def test_a_count_must_be_whole() -> None:
    assert settings_with(max_attempts="3.0").max_attempts == 3
    with pytest.raises(ClinikoConfigError, match=r"'max_attempts' must be a whole number, got 2\.5"):
        settings_with(max_attempts=2.5)


@pytest.mark.parametrize(
    ("user_agent", "named"),
    [
        ("Acmé Reports (ops@acme.example)", "U+00E9 (LATIN SMALL LETTER E WITH ACUTE)"),
        ("Acme\tReports (ops@acme.example)", "U+0009 (a control character)"),
        ("Acme Reports (ops@acme.example)\x7f", "U+007F (a control character)"),
        ("Acme \u2028Reports (ops@acme.example)", "U+2028 (LINE SEPARATOR)"),
    ],
)
def test_user_agent_must_be_printable_ascii(user_agent: str, named: str) -> None:
    with pytest.raises(ClinikoConfigError, match=re.escape(f"User-Agent holding the character {named};")):
        settings_with(user_agent=user_agent)


def test_user_agent_edges_of_printable_ascii_pass() -> None:
    agent = "~ Acme Reports (ops@acme.example)"
    assert settings_with(user_agent=agent).user_agent == agent


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("http://evil.example\\@127.0.0.1/v1", "backslash"),
        ("http://127.0.0.1\\evil/v1", "backslash"),
        ("http://user:pw@127.0.0.1:8765/v1", "user name or password"),
        ("http://evil.example@127.0.0.1/v1", "user name or password"),
        ("proxy.example.com", "has no scheme"),
        ("127.0.0.1:8765/v1", "has no scheme"),
        ("http://127.0.0.1:99999/v1", "port"),
        ("http://127.0.0.1:x/v1", "port"),
    ],
)
def test_host_setting_refuses_ambiguous_urls(host: str, problem: str) -> None:
    with pytest.raises(ClinikoConfigError, match=problem):
        normalise_base_url(host)


def test_headers_and_repr_keep_the_key_out_of_sight() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="SeCrEtKeY-au2"))
    user, _, password = base64.b64decode(settings.headers["Authorization"].removeprefix("Basic ")).partition(
        b":"
    )
    assert (user, password) == (b"SeCrEtKeY-au2", b"")
    assert settings.headers["User-Agent"] == UA
    assert settings.headers["Accept"] == "application/json"
    assert "SeCrEtKeY" not in repr(settings)


def test_url_and_describe() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1", host="http://127.0.0.1:1/v1"))
    assert settings.url("/patients/1") == "http://127.0.0.1:1/v1/patients/1"
    assert settings.url("http://127.0.0.1:1/v1/patients?page=2") == "http://127.0.0.1:1/v1/patients?page=2"
    assert settings.url("HTTP://127.0.0.1:1/v1/x") == "HTTP://127.0.0.1:1/v1/x"


@pytest.mark.parametrize(
    "url",
    [
        "http://other/v1/patients?page=2",
        "http://127.0.0.1:2/v1/patients",
        "http://127.0.0.1/v1/patients",
        "https://127.0.0.1:1/v1/patients",
        "http://localhost:1/v1/patients",
        "http://127.0.0.1:1@evil.example/v1",
        "http://127.0.0.1:1\\@evil.example/v1",
        "ftp://127.0.0.1:1/v1",
    ],
)
def test_an_absolute_url_off_the_base_url_is_refused(url: str) -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1", host="http://127.0.0.1:1/v1"))
    with pytest.raises(
        ClinikoAnswerError, match=re.escape("not the connection's base URL http://127.0.0.1:1/v1")
    ):
        settings.url(url)


def test_the_refusal_names_where_the_link_pointed() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1", host="http://127.0.0.1:1/v1"))
    with pytest.raises(ClinikoAnswerError, match=re.escape("pointed at http://other:80, which is not")):
        settings.url("http://other/v1/x")
    with pytest.raises(ClinikoAnswerError, match=re.escape("pointed at https://127.0.0.1:443, which")):
        settings.url("https://127.0.0.1/v1/x")
    with pytest.raises(ClinikoAnswerError, match=re.escape("pointed at http://127.0.0.1:None, which")):
        settings.url("http://127.0.0.1:99999/v1/x")
    with pytest.raises(ClinikoAnswerError):
        settings.url("http://127.0.0.1:1/v1\\@x")


def test_default_ports_are_the_same_origin() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1"))
    assert settings.url("https://api.au1.cliniko.com:443/v1/x") == "https://api.au1.cliniko.com:443/v1/x"
    with pytest.raises(ClinikoAnswerError):
        settings.url("http://api.au1.cliniko.com/v1/x")
    assert settings.describe("GET", "http://127.0.0.1:1/v1/patients/1?q[]=x") == "GET /patients/1"


@pytest.mark.parametrize(
    ("value", "expected"), [(12, "12"), ("0012", "12"), (" 7 ", "7"), ("1234567890123", "1234567890123")]
)
def test_validate_id_accepts_numbers(value: object, expected: str) -> None:
    assert validate_id("patient_id", value) == expected


@pytest.mark.parametrize("value", [None, "", "abc", "12a", -3, 0, "1.5", True, "١٢"])
def test_validate_id_refuses_the_rest(value: object) -> None:
    with pytest.raises(ClinikoInputError, match="patient_id must be a Cliniko numeric id"):
        validate_id("patient_id", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("redis_default", "redis_default"), (" cluster.redis-1 ", "cluster.redis-1")],
)
def test_redis_conn_id_is_read(value: object, expected: str | None) -> None:
    extra = {"user_agent": UA} if value is None else {"user_agent": UA, "redis_conn_id": value}
    settings = ClinikoSettings.from_connection(Conn(password="key-au1", extra_dejson=extra))
    assert settings.redis_conn_id == expected
    assert settings.requests_per_minute == 200.0


@pytest.mark.parametrize("value", ["redis default", "redis://127.0.0.1:6379", "ré", 6379, ["r"], "x" * 251])
def test_malformed_redis_conn_id_names_the_field_and_the_fix(value: object) -> None:
    extra = {"user_agent": UA, "redis_conn_id": value}
    with pytest.raises(ClinikoConfigError, match=r"'redis_conn_id' must be the id of an Airflow connection"):
        ClinikoSettings.from_connection(Conn(password="key-au1", extra_dejson=extra))


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("http://127.0.0.1\\x/v1", "holds a backslash, which clients read differently"),
        ("127.0.0.1:8765/v1", "has no scheme (http:// or https://)"),
        ("ftp://127.0.0.1/v1", "is not an http(s) URL"),
        ("http:///v1", "is not an http(s) URL"),
        (
            "http://u@127.0.0.1/v1",
            "holds a user name or password before '@'; the API key goes in the Password field",
        ),
        ("http://127.0.0.1:65536/v1", "has a port that is not a number from 0 to 65535"),
    ],
)
def test_a_refused_host_is_named_with_the_problem_and_an_example(host: str, problem: str) -> None:
    with pytest.raises(ClinikoConfigError) as error:
        normalise_base_url(host)
    assert str(error.value) == (
        f"The Cliniko connection's host {host!r} {problem}: give a base URL such as "
        "http://127.0.0.1:8765/v1 (the sandbox), or leave it empty for Cliniko."
    )


def test_a_key_with_dashes_takes_the_shard_after_the_last_one() -> None:
    assert shard_from_api_key("MS0x-LWFi-Y2Rl-uk2") == "uk2"
    assert (
        ClinikoSettings.from_connection(Conn(password="a-b-ca1")).base_url == "https://api.ca1.cliniko.com/v1"
    )


def test_a_malformed_shard_suffix_says_how_a_key_ends_and_where_to_copy_it() -> None:
    with pytest.raises(ClinikoConfigError) as error:
        shard_from_api_key("abc-AU1")
    assert str(error.value) == (
        "The Cliniko API key's shard suffix is malformed: a key ends with '-' and a shard such as '-au1' or "
        "'-uk2'. Copy the whole key from Cliniko (My Info > Manage API keys)."
    )


def test_plain_http_refusal_names_the_host_and_the_fix() -> None:
    with pytest.raises(ClinikoConfigError) as error:
        normalise_base_url("http://cliniko.example.com/v1")
    assert str(error.value) == (
        "Plain http:// is refused for the non-loopback host 'cliniko.example.com': Cliniko requires TLS. "
        "Use https://, or leave the host empty to reach Cliniko directly."
    )


def test_a_host_path_keeps_its_own_characters_and_loses_only_trailing_slashes() -> None:
    assert (
        normalise_base_url("https://proxy.example.com/cliniko-X//") == "https://proxy.example.com/cliniko-X"
    )
    assert normalise_base_url("http://127.0.0.1:65535/") == "http://127.0.0.1:65535/v1"


def test_the_defaults_of_the_numeric_extras() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1"))
    assert settings.conn_id == "cliniko_default"
    assert (settings.max_attempts, settings.max_rate_limit_wait, settings.timeout) == (5, 65.0, 60.0)
    assert (settings.requests_per_minute, settings.redis_conn_id) == (200.0, None)


def test_extra_handed_over_as_a_json_string_is_read() -> None:
    """Some secrets backends give ``extra_dejson`` as the JSON text itself."""
    extra: Any = '{"user_agent": "Acme Reports (ops@acme.example)", "max_attempts": 8}'
    settings = ClinikoSettings.from_connection(Conn(password="k-au1", extra_dejson=extra))
    assert (settings.user_agent, settings.max_attempts) == (UA, 8)


def test_a_non_ascii_user_agent_is_refused_naming_the_character_and_the_fix() -> None:
    with pytest.raises(ClinikoConfigError) as error:
        settings_with(user_agent="Acmé Reports (ops@acme.example)")
    assert str(error.value) == (
        "The Cliniko connection 'cliniko_default' has a User-Agent holding the character U+00E9 (LATIN SMALL "
        "LETTER E WITH ACUTE); HTTP headers take printable ASCII only. Spell it in plain ASCII, e.g. "
        "'Acme Reports (ops@acme.example)'."
    )


def test_paths_are_joined_as_given_and_the_base_path_alone_is_described_as_root() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1", host="http://127.0.0.1:1/v1"))
    assert settings.url("X/1") == "http://127.0.0.1:1/v1/X/1"
    assert settings.url("//patients") == "http://127.0.0.1:1/v1/patients"
    assert settings.describe("GET", "http://127.0.0.1:1/v1") == "GET /"
    assert settings.describe("GET", "http://127.0.0.1:1/v1/") == "GET /"


def test_a_refused_link_says_where_it_pointed_and_why_the_key_stays_home() -> None:
    settings = ClinikoSettings.from_connection(Conn(password="k-au1", host="http://127.0.0.1:1/v1"))
    with pytest.raises(ClinikoAnswerError) as error:
        settings.url("http:///v1/patients")
    assert str(error.value) == (
        "Cliniko's answer pointed at http://?:80, which is not the connection's base URL "
        "http://127.0.0.1:1/v1; not following it, so the API key is not sent there. "
        "Check the connection's host."
    )
