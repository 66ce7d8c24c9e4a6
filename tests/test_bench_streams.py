"""bench_streams' bookkeeping: sides alternate per round, each side's CPU is its own, the spread shows."""

from __future__ import annotations

import os

import pytest

from tests.bench import bench_streams


def test_sides_alternate_and_each_round_is_recorded(capsys: pytest.CaptureFixture[str]) -> None:
    order: list[str] = []
    measured = bench_streams.measure(
        3, 2, os.getpid(), lambda number: order.append(f"ours {number}"), lambda: order.append("curl")
    )
    assert order == ["ours 0", "ours 1", "curl", "curl", "ours 0", "ours 1", "ours 0", "ours 1", "curl"]
    assert {name: len(values) for name, values in measured.items()} == {
        f"{what} {who}": 3 for what in ("wall", "client", "sandbox") for who in ("ours", "curl")
    }
    assert all(value >= 0 for values in measured.values() for value in values)
    assert capsys.readouterr().err.count("ours/curl") == 3


def test_report_gives_the_median_and_spread_of_the_per_round_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    measured = {
        "wall ours": [2.0, 4.0, 1.0],
        "wall curl": [1.0, 2.0, 1.0],
        "client ours": [2.5, 2.5, 2.5],
        "client curl": [0.5, 0.5, 0.5],
        "sandbox ours": [3.5, 3.5, 3.5],
        "sandbox curl": [3.4, 3.4, 3.4],
    }
    bench_streams.report(measured, 8, 128, 0.5)
    out = capsys.readouterr().out
    assert "median of 3 rounds (load average 0.5 before" in out
    assert "median 0.50, min 0.50, max 1.00" in out
    assert "ours: client 2.50 s, sandbox 3.50 s" in out
    assert "curl: client 0.50 s, sandbox 3.40 s" in out


def test_process_cpu_reads_another_process_and_gives_0_for_none() -> None:
    assert bench_streams.process_cpu(os.getpid()) > 0
    assert bench_streams.process_cpu(2**22 + 1) == 0.0
