"""Run one try of the upload operator in this process, and SIGKILL this process at a chosen step.

``python -m tests.faults.kill_worker '{"patient_id": ..., "file_path": ..., "try_number": 1,
"kill": "after-upload" | "after-create" | null}'`` prints the record as JSON when the try completes.
The kill is a real ``SIGKILL`` of the process (no ``finally``, no clean-up), as when a worker dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from cliniko_provider.hooks.cliniko import ClinikoHook
from tests.faults.conftest import run_upload, task_context

# The step after which the worker dies, and the hook method that ends with that step.
KILL_POINTS = {"after-upload": "upload_to_patient", "after-create": "create_attachment"}


def die_after(method: str) -> None:
    original = getattr(ClinikoHook, method)

    def step_then_die(self: ClinikoHook, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(ClinikoHook, method, step_then_die)


def main(argv: list[str]) -> None:
    args = json.loads(argv[1])
    if args.get("kill"):
        die_after(KILL_POINTS[args["kill"]])
    record = run_upload(
        ClinikoHook(),
        task_context(try_number=int(args["try_number"])),
        args["patient_id"],
        args["file_path"],
        description=args.get("description"),
    )
    print("RECORD " + json.dumps(record))


if __name__ == "__main__":
    main(sys.argv)
