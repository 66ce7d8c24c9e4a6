"""Sphinx configuration: the API reference of airflow-provider-cliniko (``make docs``).

The reference pages are generated from the user-facing modules at build time, and the build fails
(``-W``) on a public object without a docstring or a parameter without a ``:param:`` line, so a new
class or argument cannot land undocumented.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pkgutil
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Importing the operators imports Airflow, which reads AIRFLOW_HOME: keep the build's away from the user's.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="cliniko-docs-airflow-"))

from sphinx.application import Sphinx  # noqa: E402
from sphinx.util import logging  # noqa: E402

import cliniko_provider  # noqa: E402

project = "airflow-provider-cliniko"
author = "airflow-provider-cliniko contributors"
release = cliniko_provider.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
html_theme = "furo"
exclude_patterns = ["_build"]
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
# Built with -n (nitpicky): a reference to one of our public names that does not resolve fails the build.
# Airflow's and Python's names are documented by them; our internal helpers (cliniko_provider.utils, private
# bases, type variables) are not part of the reference, so references to them are not checked.
nitpick_ignore_regex = [
    (r"py:.*", r"(?!cliniko_provider\.).*"),
    (r"py:.*", r"cliniko_provider\.utils\..*"),
    (r"py:.*", r"cliniko_provider\..*\.(_\w+|T)"),
]


# The packages a user imports from; each of their modules gets a page section.
USER_FACING = (
    "hooks",
    "protocol",
    "operators",
    "sensors",
    "triggers",
    "decorators",
    "assets",
    "exceptions",
    "cli",
    "nightly",
)
PARAM = re.compile(r":param\s+(?:[^:]*\s)?(\*{0,2}\w+):")
log = logging.getLogger(__name__)


def user_facing_modules() -> list[str]:
    """Return the dotted names of the modules the reference documents, in a stable order."""
    names = []
    for info in pkgutil.iter_modules(cliniko_provider.__path__):
        if info.name not in USER_FACING:
            continue
        full = f"cliniko_provider.{info.name}"
        if not info.ispkg:
            names.append(full)
            continue
        package = __import__(full, fromlist=["_"])
        names += [
            f"{full}.{sub.name}"
            for sub in pkgutil.iter_modules(package.__path__)
            if not sub.name.startswith("_")
        ]
    return sorted(names)


def write_api_page(app: Sphinx) -> None:
    """Write ``api.rst`` with one ``automodule`` per user-facing module."""
    lines = ["API reference", "=============", ""]
    lines += [f"Generated from the docstrings of the user-facing modules ({', '.join(USER_FACING)}).", ""]
    for module in user_facing_modules():
        lines += [module, "-" * len(module), "", f".. automodule:: {module}", ""]
    page = Path(app.srcdir) / "api.rst"
    text = "\n".join(lines)
    if not page.exists() or page.read_text() != text:
        page.write_text(text)


def documented_parameters(lines: list[str]) -> set[str]:
    """Return the names that ``:param:`` lines describe."""
    return {match.lstrip("*") for match in PARAM.findall("\n".join(lines))}


def required_parameters(what: str, obj: Any) -> list[str]:
    """The parameters a docstring must describe: every named one but ``self``/``cls``/``context``."""
    target = obj.__init__ if what in ("class", "exception") else obj
    if what in ("class", "exception") and ("__init__" not in vars(obj) or dataclasses.is_dataclass(obj)):
        return []
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    skipped = {"self", "cls", "context", "args", "kwargs"}
    return [name for name in signature.parameters if name not in skipped]


def docstring_problem(what: str, name: str, obj: Any, lines: list[str]) -> str | None:
    """Return what is missing from a public object's docstring, or None when nothing is.

    :param what: autodoc's kind of object (``module``, ``class``, ``method``...).
    :param name: its dotted name.
    :param obj: the object.
    :param lines: its docstring's lines as autodoc read them.
    """
    if what not in ("module", "class", "exception", "function", "method"):
        return None
    if what != "module" and not name.startswith(f"{getattr(obj, '__module__', None)}."):
        return None  # an imported name: autodoc asks about it, then leaves it out
    if not any(line.strip() for line in lines):
        return f"{what} {name} has no docstring"
    if what == "method" and name.rsplit(".", 1)[-1].startswith("_"):
        return None
    missing = [p for p in required_parameters(what, obj) if p not in documented_parameters(lines)]
    if missing:
        return f"{what} {name} does not describe parameter(s) {', '.join(missing)}"
    return None


def check_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Warn (an error under ``-W``) about an undocumented public object or parameter."""
    problem = docstring_problem(what, name, obj, lines)
    if problem:
        log.warning(problem)


def setup(app: Sphinx) -> None:
    """Generate the reference page and check every docstring as autodoc reads it."""
    app.connect("builder-inited", write_api_page)
    app.connect("autodoc-process-docstring", check_docstring)
