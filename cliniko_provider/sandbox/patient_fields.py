"""Patient fields the sandbox keeps without modelling them: checked as Cliniko's schema says, then echoed.

Cliniko's `POST /patients` takes many more fields than the sandbox uses (address, notes,
pronouns, phone numbers, custom fields...). Each one below is checked against the official
OpenAPI description's type, length, pattern or enum, stored as given, and returned in every
patient answer (null or `[]` when not given), as Cliniko does. A field the schema does not
name is ignored, as Rails ignores unpermitted parameters, and so is a key the schema does not
name inside pronouns or a phone number (the schema admits them, so they are not refused);
the modelled fields (names, email, date of birth, old reference id) are handled by the API itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]


def text(max_length: int | None = None, pattern: str | None = None) -> Check:
    compiled = re.compile(pattern, re.IGNORECASE) if pattern else None

    def check(value: Any) -> bool:
        return isinstance(value, str) and (
            (max_length is None or len(value) <= max_length)
            and (compiled is None or compiled.fullmatch(value) is not None)
        )

    return check


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def one_of(*choices: str) -> Check:
    return lambda value: value in choices


PRONOUNS = ("accusative", "nominative", "predicative_possessive", "pronominal_possessive", "reflexive")
PHONE_NUMBER_KEYS = ("number", "phone_type")


def pronouns(value: Any) -> bool:
    return isinstance(value, dict) and all(text(50)(value.get(name)) for name in PRONOUNS)


def phone_numbers(value: Any) -> bool:
    kinds = one_of("Fax", "Home", "Mobile", "Other", "Work")
    return isinstance(value, list) and all(
        isinstance(item, dict)
        and ("number" not in item or text(255)(item["number"]))
        and ("phone_type" not in item or kinds(item["phone_type"]))
        for item in value
    )


def custom_fields(value: Any) -> bool:
    """An object whose `sections`, if given, each name a `token` and a list of `fields`."""
    sections = value.get("sections", []) if isinstance(value, dict) else None
    return isinstance(sections, list) and all(
        isinstance(section, dict)
        and text(255)(section.get("token"))
        and isinstance(section.get("fields"), list)
        and all(isinstance(item, dict) for item in section["fields"])
        for section in sections
    )


EMAIL = r"[A-Z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Z0-9.-]+\.[A-Z]{2,63}"
REMINDER_TYPES = ("None", "SMS", "Email", "SMS & Email")
DEFAULT_REMINDER_TYPE = "None"
"""A patient's `reminder_type` when the create gave none: Cliniko answers the account's default reminder
type (`settings.reminders.default_reminder_type`, never null), which is "None" in the sandbox."""
DVA_CARD = r"[NVQSWT]([A-Z ][0-9]{1,6}|[A-Z]{2}[0-9]{1,5}|[A-Z]{3}[0-9]{1,4})[A-Z]?"

# Each field of the create body that the patient answer echoes under the same name, with its
# check; every one of them may also be null in the body.
EXTRA_FIELDS: dict[str, Check] = {
    **{
        name: text(255)
        for name in (
            "address_1",
            "address_2",
            "address_3",
            "city",
            "emergency_contact",
            "medicare",
            "medicare_reference_number",
            "occupation",
            "preferred_first_name",
            "referral_source",
            "title",
        )
    },
    **{
        name: text(10_000)
        for name in (
            "appointment_notes",
            "country",
            "country_code",
            "gender_identity",
            "invoice_default_to",
            "invoice_extra_information",
            "notes",
            "post_code",
            "sex",
            "state",
            "time_zone",
        )
    },
    "invoice_email": text(255, EMAIL),
    "dva_card_number": text(255, DVA_CARD),
    "accepted_email_marketing": boolean,
    "accepted_privacy_policy": boolean,
    "receives_cancellation_emails": boolean,
    "receives_confirmation_emails": boolean,
    "reminder_type": one_of(*REMINDER_TYPES),
    "pronouns": pronouns,
    "patient_phone_numbers": phone_numbers,
    "custom_fields": custom_fields,
}


def extra_fields(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The extra fields given in a create body, and Rails-style errors for those that fail their check.

    :param body: the JSON object of `POST /patients`.
    """
    given = {name: body[name] for name in EXTRA_FIELDS if name in body and body[name] is not None}
    errors = {name: "is invalid" for name, value in given.items() if not EXTRA_FIELDS[name](value)}
    if errors:
        return given, errors
    if "pronouns" in given:
        given["pronouns"] = {name: given["pronouns"][name] for name in PRONOUNS}
    if "patient_phone_numbers" in given:
        given["patient_phone_numbers"] = [
            {key: item[key] for key in PHONE_NUMBER_KEYS if key in item}
            for item in given["patient_phone_numbers"]
        ]
    return given, errors


ANSWERED_WHEN_NOT_GIVEN: dict[str, Any] = {
    "patient_phone_numbers": [],
    "reminder_type": DEFAULT_REMINDER_TYPE,
}


def render_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """Every extra field for a patient answer: as stored, else its default (:data:`ANSWERED_WHEN_NOT_GIVEN`)
    or null.
    """
    return {name: extra.get(name, ANSWERED_WHEN_NOT_GIVEN.get(name)) for name in EXTRA_FIELDS}
