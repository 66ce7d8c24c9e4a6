"""`python -m tests.bench [section ...]`: sections chosen by name, each bench parsing only its own options."""

from __future__ import annotations

import argparse
import sys
import types

import pytest

from tests.bench import __main__ as bench


def test_a_section_name_does_not_reach_the_bench_parser(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[int] = []

    def main() -> None:
        parser = argparse.ArgumentParser()
        parser.add_argument("--count", type=int, default=1000)
        seen.append(parser.parse_args().count)

    fake = types.ModuleType("tests.bench.bench_triggers")
    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setattr(bench.importlib, "import_module", lambda name: fake)
    monkeypatch.setattr(sys, "argv", ["python -m tests.bench", "triggers"])
    assert bench.main(sys.argv[1:]) == 0
    assert seen == [1000]
    assert "== triggers done" in capsys.readouterr().out


def test_an_unknown_section_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["trigers"]) == 2
    out = capsys.readouterr().out
    assert "unknown bench section(s) trigers" in out and "triggers" in out
