"""Cliniko list semantics: `q[]` filters, sorting and pagination.

Filters are `q[]=<field>:<operator><value>`, repeated and ANDed. Operators by kind:
strings `= != ~ ~~` (`~` contains, `~~` `%` wildcards, both case-insensitive), numbers
`= != > >= < <=` (`=` also takes a list `1,2,3` of up to 100), dates `= != > >= < <=`,
date-times `> >= < <=`, and `?` (is not null), `!?` (is null) for every field. A null value
matches no comparison, as in SQL. `archived_at:*` admits archived records, which are otherwise
left out of lists. An unknown field or operator, or a value of the wrong kind, is refused
(422) rather than ignored: a silently dropped filter would hand back the wrong records.
Likewise `per_page` outside 1 to 100 and an `order` other than `asc`/`desc`.

A request becomes one SQL query (`build_query`), run by the store: equality and range filters
on indexed columns use the indexes; `~`/`~~` are SQL LIKE with every other wildcard escaped and
at most 255 characters, so however they are written they cost one linear pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

from starlette.datastructures import URL

from cliniko_provider.sandbox.store import Query

FieldKind = Literal["string", "int", "date", "datetime"]

MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 50
MAX_LIST_VALUES = 100
# Longest `~`/`~~` value: the fields hold at most 255 characters, and it bounds LIKE's work.
MAX_PATTERN = 255

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
    # Python 3.10's fromisoformat does not read a trailing 'Z'.
    moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _parse_value(kind: FieldKind, op: str, text: str) -> Any:
    if kind == "string":
        return text
    if kind == "int":
        parts = text.split(",") if op == "=" else [text]
        if len(parts) > MAX_LIST_VALUES or not all(re.fullmatch(r"-?\d{1,19}", part) for part in parts):
            raise ValueError(text)
        values = [int(part) for part in parts]
        if not all(-(2**63) <= value < 2**63 for value in values):
            raise ValueError(text)
        return values
    if kind == "date":
        return date.fromisoformat(text).isoformat()
    return _whole_second_bound(op, parse_datetime(text))


@dataclass(frozen=True)
class Condition:
    field: str
    kind: FieldKind
    op: str
    value: Any

    def sql(self) -> tuple[str, list[Any]]:
        """This condition as SQL over the column of the same name (names come from a whitelist)."""
        column = self.field
        if self.op == "*":
            return "1", []
        if self.op in ("?", "!?"):
            return f"{column} IS {'NOT ' if self.op == '?' else ''}NULL", []
        if self.op == "~":
            return f"casefold({column}) LIKE ? ESCAPE '\\'", [f"%{_like_literal(self.value.casefold())}%"]
        if self.op == "~~":
            pieces = self.value.casefold().split("%")
            return f"casefold({column}) LIKE ? ESCAPE '\\'", ["%".join(_like_literal(p) for p in pieces)]
        if self.kind == "int" and self.op == "=":
            return f"{column} IN ({', '.join('?' for _ in self.value)})", list(self.value)
        value = self.value[0] if self.kind == "int" else self.value
        # A null matches no comparison, as in SQL: `!=` leaves nulls out too.
        return f"{column} {'<>' if self.op == '!=' else self.op} ?", [value]


def _like_literal(text: str) -> str:
    """`text` matched literally by SQL LIKE with `ESCAPE '\\'`."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _whole_second_bound(op: str, moment: datetime) -> str:
    """The bound as stored text (`YYYY-MM-DDTHH:MM:SSZ`, whole seconds) giving the same answer.

    Stored times have whole seconds, so `> 10.5` is `> 10` and `>= 10.5` is `>= 11` (likewise
    `<= 10.5` is `<= 10`, `< 10.5` is `< 11`); then comparing the fixed-width text is exact.
    """
    moment = moment.astimezone(timezone.utc)
    whole = moment.replace(microsecond=0)
    if moment.microsecond and op in (">=", "<"):
        whole += timedelta(seconds=1)
    return (
        f"{whole.year:04d}-{whole.month:02d}-{whole.day:02d}"
        f"T{whole.hour:02d}:{whole.minute:02d}:{whole.second:02d}Z"
    )


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
    if op in ("~", "~~") and len(text) > MAX_PATTERN:
        raise ListingError(f"Invalid filter {raw!r}: a {op} value may have at most {MAX_PATTERN} characters")
    try:
        return Condition(name, kind, op, _parse_value(kind, op, text))
    except (ValueError, OverflowError):
        raise ListingError(f"Invalid filter {raw!r}: {text!r} is not a valid {kind}") from None


def build_query(
    raw_filters: Sequence[str], sort: str | None, order: str | None, fields: Mapping[str, FieldKind]
) -> Query:
    """The `q[]` filters (ANDed), `sort` and `order` of a list request as a :class:`Query`.

    :param raw_filters: the `q[]` values.
    :param sort: comma-separated `field` or `field:asc|desc`; by id by default.
    :param order: the direction of fields that name none (deprecated by Cliniko, still honoured).
    :param fields: the fields of the listed records and their kinds.
    """
    conditions = [parse_filter(raw, fields) for raw in raw_filters]
    if not any(condition.field == "archived_at" for condition in conditions):
        conditions.append(Condition("archived_at", "datetime", "!?", None))
    clauses, params = [], []
    for condition in conditions:
        clause, values = condition.sql()
        clauses.append(clause)
        params += values
    return Query(" AND ".join(clauses), params, _order_by(sort, order, fields))


def _order_by(sort: str | None, order: str | None, fields: Mapping[str, FieldKind]) -> str:
    """Nulls sort last (first when descending); ties go by id, in the first field's direction."""
    if order and order.lower() not in ("asc", "desc"):
        raise ListingError(f"Invalid order {order!r}: use asc or desc")
    terms: list[str] = []
    directions: list[str] = []
    for item in (sort or "id").split(","):
        name, _, direction = item.strip().partition(":")
        direction = (direction or order or "asc").lower()
        if name not in fields or direction not in ("asc", "desc"):
            raise ListingError(f"Invalid sort {sort!r}: use field or field:desc, comma-separated")
        directions.append(direction)
        terms += [f"({name} IS NULL) {direction}", f"{name} {direction}"]
    return ", ".join([*terms, f"id {directions[0]}"])


def _natural(text: str | None, default: int, name: str) -> int:
    if text is None or text == "":
        return default
    if not re.fullmatch(r"\d{1,18}", text):
        raise ListingError(f"Invalid {name} {text!r}")
    return int(text)


@dataclass(frozen=True)
class PageRequest:
    """`page` and `per_page` of a list request."""

    page: int
    per_page: int

    @classmethod
    def parse(cls, page_text: str | None, per_page_text: str | None) -> PageRequest:
        page = max(_natural(page_text, 1, "page"), 1)
        per_page = _natural(per_page_text, DEFAULT_PER_PAGE, "per_page")
        if not 1 <= per_page <= MAX_PER_PAGE:
            raise ListingError(f"Invalid per_page {per_page_text!r}: from 1 to {MAX_PER_PAGE}")
        return cls(page, per_page)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def links(self, url: URL, total_entries: int) -> dict[str, str]:
        links = {"self": str(url)}
        if self.offset + self.per_page < total_entries:
            links["next"] = str(url.include_query_params(page=self.page + 1))
        if self.page > 1:
            links["previous"] = str(url.include_query_params(page=self.page - 1))
        return links
