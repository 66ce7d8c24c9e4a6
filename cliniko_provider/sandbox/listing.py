"""Cliniko list semantics: `q[]` filters, sorting and pagination.

Filters are `q[]=<field>:<operator><value>`, repeated and ANDed. Operators by kind:
strings `= != ~ ~~` (`~` contains, `~~` `%` wildcards, both case-insensitive), numbers
`= != > >= < <=` (`=` also takes a list `1,2,3` of up to 100), dates `= != > >= < <=`,
date-times `> >= < <=`, and `?` (is not null), `!?` (is null) for every field. A null value
matches no comparison, as in SQL. `archived_at:*` admits archived records, which are otherwise
left out of lists. An unknown field or operator, or a value of the wrong kind, is refused
(422) rather than ignored: a silently dropped filter would hand back the wrong records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Literal

from starlette.datastructures import URL

FieldKind = Literal["string", "int", "date", "datetime"]

MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 50
MAX_LIST_VALUES = 100

# Longest first, so that `>=` is not read as `>` followed by `=...`.
_OPERATORS = ("!?", ">=", "<=", "!=", "~~", "?", "=", "~", ">", "<", "*")
_ALLOWED: dict[FieldKind, frozenset[str]] = {
    "string": frozenset({"=", "!=", "~", "~~"}),
    "int": frozenset({"=", "!=", ">", ">=", "<", "<="}),
    "date": frozenset({"=", "!=", ">", ">=", "<", "<="}),
    "datetime": frozenset({">", ">=", "<", "<="}),
}
_VALUELESS = frozenset({"?", "!?", "*"})


class ListingError(ValueError):
    """A list request Cliniko would refuse; the message names the offending parameter."""


def parse_datetime(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _parse_value(kind: FieldKind, op: str, text: str) -> Any:
    if kind == "string":
        return text
    if kind == "int":
        parts = text.split(",") if op == "=" else [text]
        if len(parts) > MAX_LIST_VALUES or not all(re.fullmatch(r"-?\d+", part) for part in parts):
            raise ValueError(text)
        return [int(part) for part in parts]
    if kind == "date":
        return date.fromisoformat(text).isoformat()
    return parse_datetime(text)


@dataclass(frozen=True)
class Condition:
    field: str
    kind: FieldKind
    op: str
    value: Any

    def matches(self, record: object) -> bool:
        actual = getattr(record, self.field)
        if self.op == "*":
            return True
        if self.op in ("?", "!?"):
            return (actual is not None) == (self.op == "?")
        if actual is None:
            return False
        if self.kind == "string":
            return self._match_string(str(actual))
        if self.kind == "int" and self.op == "=":
            return bool(int(actual) in self.value)
        if self.kind == "int":
            return _compare(int(actual), self.op, self.value[0])
        if self.kind == "datetime":
            return _compare(parse_datetime(actual), self.op, self.value)
        return _compare(actual, self.op, self.value)

    def _match_string(self, actual: str) -> bool:
        if self.op == "=":
            return bool(actual == self.value)
        if self.op == "!=":
            return bool(actual != self.value)
        if self.op == "~":
            return str(self.value).casefold() in actual.casefold()
        pattern = ".*".join(re.escape(piece) for piece in str(self.value).split("%"))
        return re.fullmatch(pattern, actual, re.IGNORECASE | re.DOTALL) is not None


def _compare(actual: Any, op: str, expected: Any) -> bool:
    comparisons = {
        "=": actual == expected,
        "!=": actual != expected,
        ">": actual > expected,
        ">=": actual >= expected,
        "<": actual < expected,
        "<=": actual <= expected,
    }
    return bool(comparisons[op])


def parse_filter(raw: str, fields: Mapping[str, FieldKind]) -> Condition:
    name, colon, rest = raw.partition(":")
    kind = fields.get(name)
    if not colon or kind is None:
        raise ListingError(f"Invalid filter {raw!r}: unknown field {name!r}")
    op = next((candidate for candidate in _OPERATORS if rest.startswith(candidate)), "")
    text = rest[len(op) :]
    if op in _VALUELESS:
        if text or (op == "*" and name != "archived_at"):
            raise ListingError(f"Invalid filter {raw!r}")
        return Condition(name, kind, op, None)
    if op not in _ALLOWED[kind]:
        raise ListingError(f"Invalid filter {raw!r}: operator {op or rest[:2]!r} is not valid for {name}")
    try:
        return Condition(name, kind, op, _parse_value(kind, op, text))
    except ValueError:
        raise ListingError(f"Invalid filter {raw!r}: {text!r} is not a valid {kind}") from None


def filter_records(
    records: Iterable[Any], raw_filters: Sequence[str], fields: Mapping[str, FieldKind]
) -> list[Any]:
    conditions = [parse_filter(raw, fields) for raw in raw_filters]
    if not any(condition.field == "archived_at" for condition in conditions):
        conditions.append(Condition("archived_at", "datetime", "!?", None))
    return [record for record in records if all(c.matches(record) for c in conditions)]


def sort_records(
    records: list[Any], sort: str | None, order: str | None, fields: Mapping[str, FieldKind]
) -> list[Any]:
    """`sort=field`, `sort=field:desc` or `order=desc`; by id by default. Nulls sort last."""
    name, _, direction = (sort or "id").partition(":")
    direction = direction or order or "asc"
    if name not in fields or direction not in ("asc", "desc"):
        raise ListingError(f"Invalid sort {sort!r}")
    descending = direction == "desc"
    present = sorted(
        (r for r in records if getattr(r, name) is not None),
        key=lambda r: (getattr(r, name), r.id),
        reverse=descending,
    )
    absent = [r for r in records if getattr(r, name) is None]
    return absent + present if descending else present + absent


@dataclass(frozen=True)
class Page:
    items: list[Any]
    total_entries: int
    links: dict[str, str]


def _positive_int(text: str | None, default: int, name: str) -> int:
    if text is None or text == "":
        return default
    if not re.fullmatch(r"\d+", text):
        raise ListingError(f"Invalid {name} {text!r}")
    return max(int(text), 1)


def paginate(records: list[Any], url: URL, page_text: str | None, per_page_text: str | None) -> Page:
    page = _positive_int(page_text, 1, "page")
    per_page = min(_positive_int(per_page_text, DEFAULT_PER_PAGE, "per_page"), MAX_PER_PAGE)
    start = (page - 1) * per_page
    links = {"self": str(url)}
    if start + per_page < len(records):
        links["next"] = str(url.include_query_params(page=page + 1))
    if page > 1:
        links["previous"] = str(url.include_query_params(page=page - 1))
    return Page(records[start : start + per_page], len(records), links)
