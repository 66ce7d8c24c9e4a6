"""Run the sandbox as a subprocess, for tests, demos and benchmarks.

with SandboxProcess("--processing-delay", "0.2", data_dir=tmp_path) as sandbox:
    requests.get(f"{sandbox.base_url}/user", auth=(sandbox.api_key, ""), headers=...)
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

READY_PREFIX = "Cliniko sandbox ready: "
DEFAULT_API_KEY = "sandbox-api-key-au1"


class SandboxProcess:
    """`python -m cliniko_provider.sandbox` in a subprocess, started and stopped on demand.

    `port=0` picks a free port on the first start; `restart()` reuses that port and the
    data dir, so state carries over as it would for a user restarting the sandbox.
    """

    def __init__(
        self,
        *cli_args: str,
        data_dir: Path | str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        startup_timeout: float = 20.0,
    ) -> None:
        self.cli_args = list(cli_args)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.base_url = ""
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def api_key(self) -> str:
        """The first `--api-key` given, or the sandbox's default key."""
        keys = [
            value
            for flag, value in zip(self.cli_args, self.cli_args[1:], strict=False)
            if flag == "--api-key"
        ]
        return keys[0] if keys else DEFAULT_API_KEY

    @property
    def root_url(self) -> str:
        """The server root (for `/_sandbox/...`), without `/v1`."""
        return self.base_url.removesuffix("/v1")

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the sandbox is not running")
        return self._process.pid

    def start(self) -> SandboxProcess:
        args = [
            sys.executable,
            "-m",
            "cliniko_provider.sandbox",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.data_dir is not None:
            args += ["--data-dir", str(self.data_dir)]
        self._lines = queue.Queue()
        self._process = subprocess.Popen(
            [*args, *self.cli_args],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._pump, args=(self._process.stdout, self._lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"sandbox not ready after {self.startup_timeout}s") from None
            if line is None:
                raise RuntimeError(f"sandbox exited with {self._process.wait()} before it was ready")
            if line.startswith(READY_PREFIX):
                self.base_url = line.removeprefix(READY_PREFIX).strip()
                self.port = int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])
                return self

    @staticmethod
    def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
        if stream is not None:
            for line in stream:
                lines.put(line)
        lines.put(None)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; returns the exit code (0 on a clean stop)."""
        if self._process is None:
            return 0
        process, self._process = self._process, None
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as after a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> SandboxProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
