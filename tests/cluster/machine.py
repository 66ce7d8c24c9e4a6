"""One "machine" of the cluster tests: calls Cliniko through ClinikoHook a given number of times.

Run as ``python -m tests.cluster.machine REQUESTS OUT GO`` in a process with its own HOME, TMPDIR and
AIRFLOW_HOME (so its machine budget is its own); the connection comes from the environment. Once set up
it writes ``OUT.ready`` and waits for the file GO, so that every machine starts calling at once (and
none is slowed by another still importing Airflow); then writes the finish time of each call (UNIX
seconds), one a line, to OUT. REQUESTS 0 means: as many as fit in ``$BENCH_SECONDS`` seconds. A call is
``GET /patients?per_page=1`` (the hook's own ``GET /user``, once, learns whose budget the key draws on).
With ``$MACHINE_LEARN_USER`` set, the key's user is learned before ``OUT.ready``. With
``$MACHINE_LONGEST_WAIT`` set, a pacing wait longer than that many seconds ends the machine: it
writes the wait to ``OUT.wait`` (how a test sees the budget hold it back without waiting a minute).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def spawn(
    directory: Path, requests: int, go: Path, env: dict[str, str], seconds: float = 0
) -> subprocess.Popen[bytes]:
    """Start one machine in ``directory`` (its home, temp dir, Airflow home, log and ``finished.txt``).

    :param directory: the machine's own directory (made here).
    :param requests: calls to make (0: as many as fit in ``seconds``).
    :param go: the file whose appearance starts every machine at once.
    :param env: connections (``AIRFLOW_CONN_*``); nothing else of this process's environment is passed.
    :param seconds: how long to call, when ``requests`` is 0.
    """
    parts = {name: directory / name for name in ("home", "tmp", "airflow")}
    for path in parts.values():
        path.mkdir(parents=True)
    machine_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(parts["home"]),
        "TMPDIR": str(parts["tmp"]),
        "AIRFLOW_HOME": str(parts["airflow"]),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "BENCH_SECONDS": str(seconds),
        **env,
    }
    log = (directory / "machine.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.cluster.machine",
            str(requests),
            str(directory / "finished.txt"),
            str(go),
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=machine_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_until_ready(directories: list[Path], machines: list[subprocess.Popen[bytes]], go: Path) -> None:
    """Wait until every machine is set up, then start them all by making ``go``."""
    deadline = time.monotonic() + 180
    while not all((directory / "finished.ready").exists() for directory in directories):
        if any(machine.poll() is not None for machine in machines):
            raise RuntimeError("a machine exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError("the machines did not get ready within 180 s")
        time.sleep(0.2)
    go.touch()


def finish_times(directories: list[Path]) -> list[float]:
    """Every call's finish time of the given machines, sorted."""
    return sorted(float(line) for path in directories for line in (path / "finished.txt").read_text().split())


def main() -> None:
    from cliniko_provider.hooks.cliniko import ClinikoHook

    count, out, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    longest = float(os.environ.get("MACHINE_LONGEST_WAIT") or "inf")
    finished: list[float] = []

    def sleep(seconds: float) -> None:
        if seconds > longest:
            out.with_suffix(".wait").write_text(repr(seconds))
            raise HeldBack
        time.sleep(seconds)

    hook = ClinikoHook(sleep=sleep)
    hook.get_conn()  # settings and session made before the start
    if os.environ.get("MACHINE_LEARN_USER"):  # the key's GET /user before the start, not raced by calls
        from cliniko_provider.utils.budget import user_budget

        user_budget(hook.settings, hook._look_up_user)
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.05)
    until = time.time() + float(os.environ.get("BENCH_SECONDS", "0"))
    try:
        while len(finished) < count or (count == 0 and time.time() < until):
            hook.get_json("/patients", {"per_page": 1})
            finished.append(time.time())
    except HeldBack:
        pass
    out.write_text("".join(f"{moment!r}\n" for moment in finished))


class HeldBack(Exception):
    """The budget asked for a wait longer than ``$MACHINE_LONGEST_WAIT``."""


if __name__ == "__main__":
    main()
