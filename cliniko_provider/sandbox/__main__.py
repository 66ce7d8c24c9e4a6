"""`python -m cliniko_provider.sandbox`."""

from __future__ import annotations

import sys

from cliniko_provider.sandbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
