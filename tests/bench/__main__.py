"""``make bench``: every benchmark in turn (a section may be chosen: ``python -m tests.bench upload``)."""

from __future__ import annotations

import importlib
import sys
import time

SECTIONS = ("sandbox", "upload", "triggers", "economy")


def main(argv: list[str]) -> int:
    chosen = argv or list(SECTIONS)
    for name in chosen:
        try:
            module = importlib.import_module(f"tests.bench.bench_{name}")
        except ModuleNotFoundError:
            print(f"== {name}: not available")
            continue
        print(f"\n== {name} ==", flush=True)
        started = time.monotonic()
        module.main()
        print(f"== {name} done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
