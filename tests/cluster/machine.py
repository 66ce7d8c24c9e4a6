"""One "machine" of the cluster tests: calls Cliniko through ClinikoHook a given number of times.

Run as ``python -m tests.cluster.machine REQUESTS OUT GO`` in a process with its own HOME, TMPDIR and
AIRFLOW_HOME (so its machine budget is its own); the connection comes from the environment. Once set up
it writes ``OUT.ready`` and waits for the file GO, so that every machine starts calling at once (and
none is slowed by another still importing Airflow); then writes the finish time of each call (UNIX
seconds), one a line, to OUT. REQUESTS 0 means: as many as fit in ``$BENCH_SECONDS`` seconds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    from cliniko_provider.hooks.cliniko import ClinikoHook

    count, out, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    hook = ClinikoHook()
    hook.get_conn()  # settings and session made before the start
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.05)
    finished: list[float] = []
    until = time.time() + float(os.environ.get("BENCH_SECONDS", "0"))
    while len(finished) < count or (count == 0 and time.time() < until):
        hook.get_json("/user")
        finished.append(time.time())
    out.write_text("".join(f"{moment!r}\n" for moment in finished))


if __name__ == "__main__":
    main()
