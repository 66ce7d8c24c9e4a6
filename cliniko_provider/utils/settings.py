"""Turn an Airflow connection into the settings every Cliniko call uses (sync and async alike)."""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import SplitResult, urlsplit, urlunsplit

from cliniko_provider.exceptions import ClinikoAnswerError, ClinikoConfigError

# Where a Cliniko user creates an API key, and a User-Agent of the shape Cliniko asks for (the form's too).
from cliniko_provider.get_provider_info import API_KEY_LOCATION as API_KEY_LOCATION
from cliniko_provider.get_provider_info import USER_AGENT_EXAMPLE as USER_AGENT_EXAMPLE
from cliniko_provider.utils.validation import conn_id_extra, number_extra

KNOWN_SHARDS = frozenset({"au1", "au2", "au3", "au4", "ca1", "uk1", "uk2", "uk3", "eu1", "us1"})
SHARD_PATTERN = re.compile(r"^[a-z]{2}\d{1,2}$")
DEFAULT_SHARD = "au1"
# Cliniko asks for "<App or vendor name> (<contact email>)".
USER_AGENT_PATTERN = re.compile(r"^.*\S.*\(\s*[^\s@()]+@[^\s@()]+\.[^\s@()]+\s*\)\s*$")

log = logging.getLogger(__name__)
# Upper bounds of the numeric extras: past them a setting is a mistake (or would overflow a wait).
MAX_ATTEMPTS = 20
MAX_RATE_LIMIT_WAIT = 3600.0
MAX_TIMEOUT = 3600.0
MAX_REQUESTS_PER_MINUTE = 1_000_000.0


def _describe_char(char: str) -> str:
    return f"the character U+{ord(char):04X} ({unicodedata.name(char, 'a control character')})"


class ConnectionLike(Protocol):
    """The parts of an Airflow ``Connection`` that the settings read."""

    conn_id: str
    host: str | None
    password: str | None

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


def shard_from_api_key(api_key: str) -> str:
    """Return the shard an API key belongs to: the suffix after its last ``-`` (``au1`` when none).

    :param api_key: the Cliniko API key.
    """
    if "-" not in api_key:
        return DEFAULT_SHARD
    suffix = api_key.rsplit("-", 1)[1]
    if not SHARD_PATTERN.match(suffix):
        raise ClinikoConfigError(
            "The Cliniko API key's shard suffix is malformed: a key ends with '-' and a shard such as "
            f"'-au1' or '-uk2'. Copy the whole key from Cliniko ({API_KEY_LOCATION})."
        )
    if suffix not in KNOWN_SHARDS:
        _warn_unknown_shard(suffix)
    return suffix


@functools.cache  # once per shard and process: every task would otherwise repeat it
def _warn_unknown_shard(shard: str) -> None:
    log.warning(
        "The Cliniko API key names the shard %r, which is not one this provider knows (%s); using "
        "https://api.%s.cliniko.com/v1. If requests fail with a connection error, check the key.",
        shard,
        ", ".join(sorted(KNOWN_SHARDS)),
        shard,
    )


def base_url_for_shard(shard: str) -> str:
    """Return the API base URL of a shard.

    :param shard: a shard name such as ``au1``.
    """
    return f"https://api.{shard}.cliniko.com/v1"


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether a URL's host is this machine (``localhost``, ``127.0.0.1``, ``::1``...): the sandbox's.

    :param url: an absolute URL.
    """
    return _is_loopback(urlsplit(url).hostname or "")


def normalise_base_url(host: str) -> str:
    """Validate a base URL override and add ``/v1`` when it has no path.

    :param host: the connection's host field, e.g. ``http://127.0.0.1:8765/v1``.
    """
    url = host.strip()
    example = "give a base URL such as http://127.0.0.1:8765/v1 (the sandbox), or leave it empty for Cliniko"
    problem = ""
    if "\\" in url:
        problem = "holds a backslash, which clients read differently"
    elif "://" not in url:
        problem = "has no scheme (http:// or https://)"
    parts = urlsplit(url)
    if not problem and (parts.scheme not in ("http", "https") or not parts.hostname):
        problem = "is not an http(s) URL"
    elif not problem and "@" in parts.netloc:
        problem = "holds a user name or password before '@'; the API key goes in the Password field"
    if not problem:
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            problem = "has a port that is not a number from 0 to 65535"
    if problem:
        raise ClinikoConfigError(f"The Cliniko connection's host {host!r} {problem}: {example}.")
    assert parts.hostname is not None  # checked above
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ClinikoConfigError(
            f"Plain http:// is refused for the non-loopback host {parts.hostname!r}: Cliniko requires TLS. "
            "Use https://, or leave the host empty to reach Cliniko directly."
        )
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, _port(parts)  # urlsplit lower-cases the scheme


@dataclass(frozen=True)
class ClinikoSettings:
    """Everything needed to call Cliniko, read once from the connection.

    :param conn_id: the Airflow connection id (for messages).
    :param api_key: the API key (never shown in ``repr``).
    :param base_url: API base URL ending in ``/v1`` (no trailing slash).
    :param user_agent: the ``User-Agent`` Cliniko requires.
    :param max_attempts: attempts per request on 5xx and connection errors (a 429 is not an attempt).
    :param max_rate_limit_wait: longest single wait for a 429 to clear, in seconds.
    :param timeout: each attempt's total deadline in seconds (connect, answer and body).
    :param requests_per_minute: the key's request budget (every process sharing the budget together).
    :param redis_conn_id: an Airflow Redis connection that shares the budget across machines, or None
        for a budget shared by the processes of one machine.
    """

    conn_id: str
    api_key: str = field(repr=False)
    base_url: str
    user_agent: str
    max_attempts: int = 5
    max_rate_limit_wait: float = 65.0
    timeout: float = 60.0
    requests_per_minute: float = 200.0
    redis_conn_id: str | None = None

    @classmethod
    def from_connection(cls, conn: ConnectionLike) -> ClinikoSettings:
        """Validate a connection and build the settings from it.

        :param conn: an Airflow connection of type ``cliniko``.
        """
        api_key = (conn.password or "").strip()
        if not api_key:
            raise ClinikoConfigError(
                f"The Cliniko connection {conn.conn_id!r} has no API key: put it in the Password field "
                f"(Cliniko: {API_KEY_LOCATION})."
            )
        extra = conn.extra_dejson
        if isinstance(extra, str):  # some secrets backends hand extra over as a JSON string
            extra = json.loads(extra)
        shard = shard_from_api_key(api_key)
        base_url = normalise_base_url(conn.host) if conn.host else base_url_for_shard(shard)
        user_agent = str(extra.get("user_agent") or "").strip()
        if not user_agent:
            raise ClinikoConfigError(
                f"The Cliniko connection {conn.conn_id!r} has no User-Agent: Cliniko requires one. Set the "
                f"extra field 'user_agent' to your app name and a contact email, e.g. {USER_AGENT_EXAMPLE!r}."
            )
        bad = next((char for char in user_agent if not " " <= char <= "~"), None)
        if bad is not None:
            raise ClinikoConfigError(
                f"The Cliniko connection {conn.conn_id!r} has a User-Agent holding {_describe_char(bad)}; "
                "HTTP headers take printable ASCII only. Spell it in plain ASCII, e.g. "
                f"{USER_AGENT_EXAMPLE!r}."
            )
        if not USER_AGENT_PATTERN.match(user_agent):
            raise ClinikoConfigError(
                f"The Cliniko connection {conn.conn_id!r} has the User-Agent {user_agent!r}, but Cliniko "
                f"asks for an app name and a contact email, e.g. {USER_AGENT_EXAMPLE!r}."
            )
        return cls(
            conn_id=conn.conn_id,
            api_key=api_key,
            base_url=base_url,
            user_agent=user_agent,
            max_attempts=int(number_extra(extra, "max_attempts", 5, 1, MAX_ATTEMPTS, whole=True)),
            max_rate_limit_wait=number_extra(extra, "max_rate_limit_wait", 65.0, 0, MAX_RATE_LIMIT_WAIT),
            timeout=number_extra(extra, "timeout", 60.0, 1, MAX_TIMEOUT),
            requests_per_minute=number_extra(extra, "requests_per_minute", 200.0, 1, MAX_REQUESTS_PER_MINUTE),
            redis_conn_id=conn_id_extra(extra, "redis_conn_id"),
        )

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value: Basic auth, key as user name, empty password."""
        return "Basic " + base64.b64encode(f"{self.api_key}:".encode()).decode()

    @property
    def secrets(self) -> tuple[str, str]:
        """What must never show in a log, an exception or XCom: the API key and its Basic credentials."""
        return self.api_key, self.authorization.split(" ", 1)[1]

    @property
    def headers(self) -> dict[str, str]:
        """Headers sent with every API request."""
        return {
            "Authorization": self.authorization,
            "User-Agent": self.user_agent,
            "Accept": "application/json",
        }

    def url(self, path_or_url: str) -> str:
        """Return an absolute URL on the base URL: a path joined to it, or an absolute URL it allows.

        An absolute URL (a ``links.next`` from an answer) is followed only when its scheme, host and
        port are the base URL's: the API key is never sent anywhere else.

        :param path_or_url: ``/patients/1`` or a full URL (e.g. a ``links.next``).
        """
        if "://" not in path_or_url:
            return self.base_url + "/" + path_or_url.lstrip("/")
        if _origin(path_or_url) != _origin(self.base_url) or "\\" in path_or_url:
            parts = urlsplit(path_or_url)
            raise ClinikoAnswerError(
                f"Cliniko's answer pointed at {parts.scheme}://{parts.hostname or '?'}:{_port(parts)}, which "
                f"is not the connection's base URL {self.base_url}; not following it, so the API key is not "
                "sent there. Check the connection's host."
            )
        return path_or_url

    def describe(self, method: str, url: str) -> str:
        """Return ``"METHOD /path"`` for messages: the URL without host or query (no secrets there)."""
        path = urlsplit(url).path
        base_path = urlsplit(self.base_url).path
        if path.startswith(base_path):
            path = path[len(base_path) :] or "/"
        return f"{method} {path}"
