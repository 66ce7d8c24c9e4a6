"""Checks of what users pass in: ids, file names, descriptions and the connection's numeric extras.

Every check returns the value to use or raises an error naming the problem and the fix.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from cliniko_provider.exceptions import ClinikoConfigError, ClinikoInputError

DESCRIPTION_LIMIT = 255


def validate_id(name: str, value: object) -> str:
    """Return a Cliniko id as the string Cliniko uses, or raise a clear error.

    :param name: the argument's name, for the message (e.g. ``patient_id``).
    :param value: an int or a string of digits.
    """
    text = str(value).strip()  # None gives "None": refused below like any other non-number
    if isinstance(value, bool) or not text.isdigit() or not text.isascii() or int(text) <= 0:
        raise ClinikoInputError(
            f"{name} must be a Cliniko numeric id such as '1234567890', got {value!r}. "
            "Look the record up first (e.g. ClinikoHook.find_patients) and pass its 'id'."
        )
    return str(int(text))


def check_upload_filename(filename: str) -> str:
    """Return the name Cliniko will show for the file, or raise if it could not arrive intact and legible.

    Refused: an empty name, ``.`` and ``..``, ``/`` or ``\\`` (S3 keeps only what follows them), names
    over 255 UTF-8 bytes, and control or invisible formatting characters (line breaks, NUL, U+0085,
    U+2028, bidirectional overrides such as U+202E, zero-width characters): a clinician would read such
    a name other than it is. Spaces at either end are kept.

    :param filename: the file name.
    """
    problem = ""
    if not filename.strip():
        problem = "is empty"
    elif filename in (".", ".."):
        problem = "is a path step, not a file name"
    elif any(char in filename for char in "/\\"):
        problem = "contains '/' or '\\', after which S3 would cut the name"
    elif hidden := next((char for char in filename if unicodedata.category(char) in HIDDEN_CATEGORIES), ""):
        name = unicodedata.name(hidden, "a control character")
        problem = (
            f"holds U+{ord(hidden):04X} ({name}), an invisible control or formatting character that would "
            "show the name other than it is"
        )
    elif (size := len(filename.encode())) > 255:
        problem = f"is {size} bytes long in UTF-8 (at most 255)"
    if problem:
        raise ClinikoInputError(
            f"filename {filename!r} {problem}. Pass a plain file name such as 'report.pdf' as filename= "
            "(or rename the file)."
        )
    return filename


# Cc: C0/C1 controls (NUL, tab, line breaks, U+0085); Cf: formatting (bidi overrides, zero-width, BOM);
# Zl/Zp: U+2028/U+2029; Co/Cs/Cn: private-use, surrogates, unassigned.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def check_description(description: str) -> str:
    """Return the description if Cliniko will take it (at most 255 characters), else raise.

    :param description: the attachment description.
    """
    if len(description) > DESCRIPTION_LIMIT:
        raise ClinikoInputError(
            f"description is {len(description)} characters long; Cliniko takes at most "
            f"{DESCRIPTION_LIMIT}. Shorten it."
        )
    return description


def number_extra(
    extra: dict[str, Any], name: str, default: float, minimum: float, maximum: float, *, whole: bool = False
) -> float:
    """Return a numeric extra field of the connection (finite, within bounds), or its default when unset.

    :param extra: the connection's extra fields.
    :param name: the field's name.
    :param default: the value when unset.
    :param minimum: the smallest value accepted.
    :param maximum: the largest value accepted.
    :param whole: True when only whole numbers make sense (a count).
    """
    value = extra.get(name)
    if value in (None, ""):
        return default
    fix = f"set it to a number such as {default:g}, or remove it to use that default"
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):
        number = None
    kind = "a number"
    if number is not None and not math.isfinite(number):
        kind = "a finite number"
    elif number is not None and whole and not number.is_integer():
        kind = "a whole number"
    elif number is not None:
        kind = ""
    if number is None or kind:
        raise ClinikoConfigError(
            f"The Cliniko connection's extra field {name!r} must be {kind}, got {value!r}: {fix}."
        )
    if not minimum <= number <= maximum:
        raise ClinikoConfigError(
            f"The Cliniko connection's extra field {name!r} must be from {_plain(minimum)} to "
            f"{_plain(maximum)}, got {_plain(number)}: {fix}."
        )
    return number


CONN_ID_PATTERN = re.compile(r"^[\w.-]{1,250}$", re.ASCII)


def conn_id_extra(extra: dict[str, Any], name: str) -> str | None:
    """Return an Airflow connection id from the connection's extras (None when empty), or raise.

    :param extra: the connection's extra fields.
    :param name: the field's name, e.g. ``redis_conn_id``.
    """
    value = extra.get(name)
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not CONN_ID_PATTERN.match(value.strip()):
        raise ClinikoConfigError(
            f"The Cliniko connection's extra field {name!r} must be the id of an Airflow connection "
            f"(letters, digits, '_', '-', '.'), got {value!r}: set it to e.g. 'redis_default', or leave "
            "it empty."
        )
    return value.strip()


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def one_line(text: str) -> str:
    """Fold white space (line breaks included) into single spaces."""
    return " ".join(text.split())
