"""Print mutmut's score per module (killed / all mutants that some test covers), after ``mutmut run``.

Usage: ``python -m tests.mutation_score`` (``make mutation`` runs it); ``--classes`` also gives a line per
class (e.g. the batch operator, whose module holds the single-file operator too).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

CAUGHT = {"killed", "timeout", "segfault", "suspicious"}


def main(argv: list[str] | None = None) -> int:
    """Read ``mutmut results --all true`` and print a line per module (and class, asked); return 0.

    :param argv: the arguments (default ``sys.argv[1:]``): ``--classes`` for a line per class too.
    """
    by_class = "--classes" in (sys.argv[1:] if argv is None else argv)
    mutmut = Path(sys.executable).with_name("mutmut")
    listing = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" not in name:
            continue
        module, _, function = name.partition(".x")
        counts[module][status.strip()] += 1
        if by_class and function.startswith("ǁ"):
            counts[f"{module}.{function.split('ǁ')[1]}"][status.strip()] += 1
    print(f"{'module':60} {'caught':>7} {'survived':>8} {'no test':>7} {'score':>6}")
    for module, count in sorted(counts.items()):
        caught = sum(count[status] for status in CAUGHT)
        survived = count["survived"]
        tested = caught + survived
        score = f"{100 * caught / tested:.0f}%" if tested else "-"
        print(f"{module:60} {caught:7} {survived:8} {count['no tests']:7} {score:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
