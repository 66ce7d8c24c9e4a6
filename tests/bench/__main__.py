"""``make bench``: every benchmark in turn, or the sections named (``python -m tests.bench triggers``)."""

from __future__ import annotations

import importlib
import sys
import time

SECTIONS = ("sandbox", "upload", "streams", "triggers", "economy", "cluster")


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in SECTIONS]
    if unknown:
        print(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    for name in argv or SECTIONS:
        module = importlib.import_module(f"tests.bench.bench_{name}")
        print(f"\n== {name} ==", flush=True)
        started = time.monotonic()
        # Each bench reads its own options from sys.argv: give it none, as `python -m` of it would.
        sys.argv = [module.__name__]
        module.main()
        print(f"== {name} done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
