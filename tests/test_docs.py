"""The API reference's docstring check (docs/conf.py): what makes ``make docs`` fail."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sphinx")
CONF = Path(__file__).resolve().parents[1] / "docs" / "conf.py"


@pytest.fixture(scope="module")
def conf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cliniko_docs_conf", CONF)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented(patient_id: str, *, wait: bool = False) -> None:
    """Do something.

    :param patient_id: the patient.
    :param wait: whether to wait.
    """


def half_documented(patient_id: str, wait: bool = False) -> None:
    """Do something.

    :param str patient_id: the patient.
    """


def undocumented(patient_id: str) -> None:
    pass


class Operator:
    """An operator.

    :param patient_id: the patient.
    """

    def __init__(self, patient_id: str, timeout: float, **kwargs: object) -> None:
        self.patient_id = patient_id

    def _private(self, anything: int) -> None:
        """Private helpers need not describe their parameters."""


@dataclasses.dataclass
class Record:
    """A record: its fields are its documentation."""

    attachment_id: str


NAME = f"{__name__}."


def lines(obj: object) -> list[str]:
    return (obj.__doc__ or "").splitlines()


def test_fully_documented_objects_pass(conf: ModuleType) -> None:
    assert conf.docstring_problem("function", NAME + "documented", documented, lines(documented)) is None
    assert conf.docstring_problem("class", NAME + "Record", Record, lines(Record)) is None
    assert conf.docstring_problem("method", NAME + "Operator._private", Operator._private, ["x"]) is None


def test_a_missing_docstring_is_named(conf: ModuleType) -> None:
    problem = conf.docstring_problem("function", NAME + "undocumented", undocumented, [])
    assert problem == f"function {NAME}undocumented has no docstring"
    assert conf.docstring_problem("module", "m", None, ["", "  "]) == "module m has no docstring"


def test_each_undescribed_parameter_is_named(conf: ModuleType) -> None:
    problem = conf.docstring_problem(
        "function", NAME + "half_documented", half_documented, lines(half_documented)
    )
    assert problem == f"function {NAME}half_documented does not describe parameter(s) wait"
    problem = conf.docstring_problem("class", NAME + "Operator", Operator, lines(Operator))
    assert problem == f"class {NAME}Operator does not describe parameter(s) timeout"


def test_imported_names_and_other_kinds_are_not_checked(conf: ModuleType) -> None:
    assert conf.docstring_problem("function", "cliniko_provider.x.undocumented", undocumented, []) is None
    assert conf.docstring_problem("attribute", NAME + "NAME", NAME, []) is None


def test_every_user_facing_module_is_in_the_reference(conf: ModuleType) -> None:
    modules = conf.user_facing_modules()
    for expected in (
        "cliniko_provider.hooks.cliniko",
        "cliniko_provider.operators.cliniko",
        "cliniko_provider.sensors.cliniko",
        "cliniko_provider.triggers.cliniko",
        "cliniko_provider.exceptions",
    ):
        assert expected in modules
    assert not [m for m in modules if ".sandbox" in m or ".utils" in m]
