"""The rate budget backends: the sliding window, and the machine budget's private state file under attack."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from cliniko_provider.utils.budget import (
    PROCESS_BUDGETS,
    SETTLE_TOLERANCE,
    SHARE_RETRY_AFTER,
    WINDOW,
    Budgets,
    MachineBudget,
    ProcessBudget,
    SlidingWindow,
    budget_for,
    key_id,
)
from cliniko_provider.utils.settings import ClinikoSettings
from tests.fake_http import FakeClock

NOW = 1_000.0


def machine(state_dir: Path, per_minute: float = 2, max_block: float = 65.0) -> MachineBudget:
    return MachineBudget("kid", per_minute, max_block, state_dir=state_dir, clock=FakeClock(NOW))


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_window_books_exactly_the_limit_then_waits_for_the_oldest_to_leave() -> None:
    window = SlidingWindow(per_minute=2, max_block=65)
    assert [window.reserve(NOW), window.reserve(NOW + 1)] == [0, 0]
    assert window.reserve(NOW + 2) == pytest.approx(WINDOW - 2)
    assert window.limit == 2 and SlidingWindow(0.5, 1).limit == 1


def test_settle_moves_a_slot_to_its_answer_and_keeps_the_window_in_order() -> None:
    window = SlidingWindow(per_minute=3, max_block=65)
    assert [window.reserve(NOW), window.reserve(NOW + 1), window.reserve(NOW + 2)] == [0, 0, 0]
    window.settle(NOW, NOW + 5)
    assert window.sent == [NOW + 1, NOW + 2, NOW + 5]
    assert window.reserve(NOW + 3) == pytest.approx(WINDOW - 2)  # the oldest is now the one sent at +1


def test_settle_never_moves_a_slot_earlier_nor_touches_other_slots() -> None:
    window = SlidingWindow(per_minute=3, max_block=65)
    window.reserve(NOW)
    window.reserve(NOW + 1)
    window.settle(NOW + 1, NOW + 0.5)  # an answer "before" its booking (a clock step): kept at the booking
    window.settle(NOW + 0.5, NOW + 9)  # nothing booked then
    assert window.sent == [NOW, NOW + 1]


@pytest.mark.parametrize(
    ("offset", "moved"),
    [
        (SETTLE_TOLERANCE / 2, True),
        (-SETTLE_TOLERANCE / 2, True),
        (SETTLE_TOLERANCE * 1.5, False),
        (-SETTLE_TOLERANCE * 1.5, False),
    ],
)
def test_settle_finds_its_slot_within_the_tolerance_only(offset: float, moved: bool) -> None:
    window = SlidingWindow(per_minute=3, max_block=65)
    window.reserve(NOW)
    window.settle(NOW + offset, NOW + 5)
    assert window.sent == ([NOW + 5] if moved else [NOW])


def test_settle_moves_a_booked_ahead_slot_in_a_full_window() -> None:
    window = SlidingWindow(per_minute=1, max_block=65)
    window.reserve(NOW)
    wait = window.reserve(NOW + 1)  # booked for NOW + WINDOW
    window.settle(NOW, NOW + 0.2)
    window.settle(NOW + 1 + wait, NOW + WINDOW + 3)
    assert window.sent == [NOW + 0.2, NOW + WINDOW + 3]


def test_window_hold_is_bounded_by_max_block_and_ignores_non_finite() -> None:
    window = SlidingWindow(per_minute=10, max_block=65)
    window.block_until(NOW + 86_400, NOW)
    assert window.blocked_until == NOW + 65
    window.block_until(float("inf"), NOW)
    window.block_until(float("nan"), NOW)
    assert window.blocked_until == NOW + 65
    assert window.reserve(NOW) == 65  # a wait exactly at its cap
    window.block_until(NOW + 10, NOW)
    assert window.blocked_until == NOW + 65  # never shortened


@pytest.mark.parametrize(
    "data",
    [
        [],
        None,
        "x",
        3,
        {},
        {"sent": [], "blocked_until": "soon"},
        {"sent": {}, "blocked_until": 0},
        {"sent": [], "blocked_until": True},
        {"sent": [], "blocked_until": float("nan")},
    ],
)
def test_window_refuses_damaged_state(data: object) -> None:
    window = SlidingWindow(per_minute=10, max_block=65)
    window.reserve(NOW)
    assert window.load(data, NOW) is False
    assert window.sent == [NOW]


def test_window_takes_only_sane_values() -> None:
    window = SlidingWindow(per_minute=10, max_block=65)
    sent = [NOW - WINDOW, NOW - WINDOW + 0.5, NOW, NOW + WINDOW + 65, NOW + WINDOW + 65.5, True, "1", 1e400]
    assert window.load({"sent": sent, "blocked_until": NOW + 86_400_000}, NOW)
    assert window.sent == [NOW - WINDOW + 0.5, NOW, NOW + WINDOW + 65]
    assert window.blocked_until == NOW + 65


def test_machine_budget_keeps_state_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    budget = machine(state)
    assert budget.reserve(NOW) == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(budget.path.stat().st_mode) == 0o600
    os.chmod(budget.path, 0o666)
    budget.reserve(NOW)
    assert stat.S_IMODE(budget.path.stat().st_mode) == 0o600  # a file of ours in our directory: tightened


def test_two_machine_budgets_share_one_window(tmp_path: Path) -> None:
    one, two = machine(tmp_path), machine(tmp_path)
    assert [one.reserve(NOW), two.reserve(NOW)] == [0, 0]
    assert one.reserve(NOW + 1) == pytest.approx(WINDOW - 1)
    assert two.sharing and one.sharing


def test_a_settled_slot_is_seen_by_the_other_processes(tmp_path: Path) -> None:
    one, two = machine(tmp_path, per_minute=1), machine(tmp_path, per_minute=1)
    assert one.reserve(NOW) == 0
    one.settle(NOW, NOW + 10)
    assert two.reserve(NOW + 20) == pytest.approx(WINDOW - 10)


def test_machine_budget_lock_makes_concurrent_bookings_count(tmp_path: Path) -> None:
    """Threads with budgets of their own on one file: every booking lands (the flock serialises them)."""
    budgets = [machine(tmp_path, per_minute=1000) for _ in range(8)]
    threads = [threading.Thread(target=lambda b=b: [b.reserve(NOW) for _ in range(25)]) for b in budgets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(json.loads(budgets[0].path.read_text())["sent"]) == 200


def test_planted_symlink_is_replaced_and_its_target_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = machine(tmp_path / "state")
    (tmp_path / "state").mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me")
    budget.path.symlink_to(target)
    assert budget.reserve(NOW) == 0
    assert target.read_text() == "keep me"
    assert not budget.path.is_symlink() and budget.sharing
    assert warnings(caplog) == [f"Cliniko rate budget: {budget.path} was a symlink; replacing it"]


@pytest.mark.parametrize("garbage", ["[]", "null", "{", '{"sent": "x"}', "\xff\xfe", "9" * 10_000])
def test_garbage_state_is_repaired_with_one_warning(
    tmp_path: Path, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget = machine(tmp_path)
    budget.reserve(NOW)
    budget.path.write_bytes(garbage.encode("latin-1"))
    assert budget.reserve(NOW + 1) == 0  # the process's own booking still counts (limit 2)
    assert json.loads(budget.path.read_text())["sent"] == [NOW, NOW + 1]
    assert budget.sharing
    assert len(warnings(caplog)) == 1


def test_deleted_state_dir_is_made_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    budget = machine(state)
    budget.reserve(NOW)
    budget.path.unlink()
    state.rmdir()
    budget.reserve(NOW)
    assert budget.sharing and budget.path.exists()


def test_unusable_state_dir_falls_back_warns_once_and_shares_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a file where the directory's parent should be: nothing can be made there
    budget = machine(blocker / "state")
    assert [budget.reserve(NOW), budget.reserve(NOW + 1), budget.reserve(NOW + 2)] == [
        0,
        0,
        pytest.approx(WINDOW - 2),
    ]
    assert not budget.sharing
    assert warnings(caplog) == [
        "Cliniko rate budget: cannot share the request budget with this machine's other processes through "
        f"{blocker / 'state'} ([Errno 20] Not a directory: '{blocker / 'state'}'); this process keeps its "
        "own budget and tries again in 60 s. Fix: make the directory a private one of this user (mode "
        "0700), or set CLINIKO_STATE_DIR to one."
    ]
    blocker.unlink()
    budget.reserve(NOW + SHARE_RETRY_AFTER - 0.5)
    assert not budget.sharing  # not retried before its time
    budget.reserve(NOW + SHARE_RETRY_AFTER)
    assert budget.sharing and budget.path.exists()
    # The process's own bookings carried over: all five, in flight (none settled) and in the window.
    assert len(json.loads(budget.path.read_text())["sent"]) == 5
    assert len(warnings(caplog)) == 1


def test_a_state_dir_still_unusable_at_the_retry_is_not_warned_about_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    budget = machine(blocker / "state", per_minute=100)
    budget.reserve(NOW)
    assert budget.sharing is False
    budget.reserve(NOW + SHARE_RETRY_AFTER)  # tried again, still a file in the way
    budget.reserve(NOW + 2 * SHARE_RETRY_AFTER)
    assert budget.sharing is False
    assert len(warnings(caplog)) == 1
    blocker.unlink()
    budget.reserve(NOW + 3 * SHARE_RETRY_AFTER)
    assert budget.sharing is True


def test_read_only_state_dir_is_not_shared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    budget = machine(state)
    assert budget.reserve(NOW) == 0
    assert not budget.sharing and len(warnings(caplog)) == 1


def test_state_dir_of_another_user_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory squatted by another OS user (seen as a different owner id) is never written into."""
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)
    budget = machine(tmp_path / "state")
    (tmp_path / "state").mkdir(mode=0o700)
    assert budget.reserve(NOW) == 0
    assert not budget.sharing and list((tmp_path / "state").iterdir()) == []
    assert "belongs to user id" in warnings(caplog)[0]
    monkeypatch.setattr(os, "geteuid", lambda: real_uid)
    budget.reserve(NOW + SHARE_RETRY_AFTER)
    assert budget.sharing


def test_state_file_of_another_user_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    budget = machine(tmp_path)
    budget.reserve(NOW)
    inode = budget.path.stat().st_ino
    real_fstat = os.fstat

    def foreign_once(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        if result.st_ino != inode:
            return result
        fields = list(result)
        fields[stat.ST_UID] = os.geteuid() + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", foreign_once)
    budget.path.write_text(json.dumps({"sent": [NOW, NOW], "blocked_until": NOW + 60}))
    assert budget.reserve(NOW) == 0  # the foreign file's contents were not taken
    assert budget.sharing and "not a regular file of this user" in caplog.text


def test_default_state_dir_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLINIKO_STATE_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    budget = MachineBudget("kid", 2, 65)
    assert budget.state_dir == tmp_path / f"cliniko-{os.geteuid()}" / "rate"
    monkeypatch.setenv("CLINIKO_STATE_DIR", str(tmp_path / "mine"))
    assert budget.path == tmp_path / "mine" / "rate" / "cliniko-rate-kid.json"


async def test_async_path_runs_file_work_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = machine(tmp_path)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    real_open = budget._open

    def spy() -> int:
        seen.append(threading.get_ident())
        return real_open()

    monkeypatch.setattr(budget, "_open", spy)
    assert await budget.areserve(NOW) == 0
    await budget.ablock_until(NOW + 5)
    await budget.asettle(NOW, NOW + 1)
    assert len(seen) == 3 and loop_thread not in seen
    assert json.loads(budget.path.read_text())["sent"] == [NOW + 1]
    assert await budget.areserve(NOW) == pytest.approx(budget._clock() + 5 - NOW)


async def test_process_budget_async_twins() -> None:
    budget = ProcessBudget(per_minute=1, max_block=10, clock=FakeClock(NOW))
    assert await budget.areserve(NOW) == 0
    await budget.ablock_until(NOW + 100)
    assert await budget.areserve(NOW) == pytest.approx(WINDOW)
    assert asyncio.get_running_loop()
    await budget.asettle(NOW + WINDOW, NOW + WINDOW + 30)
    assert await budget.areserve(NOW + WINDOW + 30) == pytest.approx(WINDOW)
    assert await budget.areserve(NOW) == pytest.approx(WINDOW + 10)  # never more than a window and the hold


def test_budget_for_gives_one_budget_per_key_and_limits() -> None:
    def settings(key: str, rpm: float = 200.0) -> ClinikoSettings:
        return ClinikoSettings("c", key, "https://x/v1", "UA (a@b.c)", requests_per_minute=rpm)

    one = budget_for(settings("a-au1"))
    assert budget_for(settings("a-au1")) is one
    assert budget_for(settings("b-au1")) is not one
    assert budget_for(settings("a-au1", 100.0)) is not one
    assert isinstance(one, MachineBudget) and one.kid == key_id("a-au1") and "a-au1" not in str(one.path)
    PROCESS_BUDGETS.clear()
    assert budget_for(settings("a-au1")) is not one
    own = Budgets()
    assert budget_for(settings("a-au1"), own) is budget_for(settings("a-au1"), own)


def test_key_id_is_a_short_hash_of_the_key() -> None:
    import hashlib

    assert key_id("secret-au1") == hashlib.sha256(b"secret-au1").hexdigest()[:16]
    assert len(key_id("x")) == 16 and key_id("a") != key_id("b")


def test_state_dir_really_owned_by_another_user(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As root, hand the directory to ``nobody`` for real: it is not used, and sharing resumes once fixed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    budget = machine(state)
    assert budget.reserve(NOW) == 0 and not budget.sharing
    assert list(state.iterdir()) == [] and "belongs to user id 65534" in warnings(caplog)[0]
    os.chown(state, 0, 0)
    budget.reserve(NOW + SHARE_RETRY_AFTER)
    assert budget.sharing and len(warnings(caplog)) == 1
