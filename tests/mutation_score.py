"""Print mutmut's score per module (killed / all mutants that some test covers), after ``mutmut run``.

Usage: ``python -m tests.mutation_score`` (``make mutation`` runs it).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

CAUGHT = {"killed", "timeout", "segfault", "suspicious"}


def main() -> int:
    """Read ``mutmut results --all true`` and print a line per module; return 0."""
    mutmut = Path(sys.executable).with_name("mutmut")
    listing = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" not in name:
            continue
        module = name.split(".x", 1)[0].split(".xǁ", 1)[0]
        counts[module][status.strip()] += 1
    print(f"{'module':42} {'caught':>7} {'survived':>8} {'no test':>7} {'score':>6}")
    for module, count in sorted(counts.items()):
        caught = sum(count[status] for status in CAUGHT)
        survived = count["survived"]
        tested = caught + survived
        score = f"{100 * caught / tested:.0f}%" if tested else "-"
        print(f"{module:42} {caught:7} {survived:8} {count['no tests']:7} {score:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
