"""A sandbox left running holds up: half-sent requests time out, descriptors never run out, logs stay short.

Real sockets on loopback against a real sandbox process, bounded in count (a few hundred) and time.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.sandbox.helpers import USER_AGENT

KEY = "sandbox-api-key-au1"
READY = "Cliniko sandbox ready: "


@contextlib.contextmanager
def sandbox_process(tmp_path: Path, *args: str, max_files: int | None = None) -> Iterator[tuple[str, Path]]:
    """A sandbox with short timeouts (and optionally few descriptors); yields its root URL and stderr file."""
    stderr_path = tmp_path / "stderr.log"

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    command = [
        sys.executable,
        "-m",
        "cliniko_provider.sandbox",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
    ]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [*command, "--header-timeout", "1", "--idle-timeout", "1", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            preexec_fn=limit_files,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith(READY), line
            yield line.removeprefix(READY).strip().removesuffix("/v1"), stderr_path
        finally:
            process.terminate()
            process.wait(10)


def get_user(root: str) -> int:
    response = requests.get(f"{root}/v1/user", auth=(KEY, ""), headers={"User-Agent": USER_AGENT}, timeout=5)
    return response.status_code


def open_half_sent(root: str, count: int, payload: bytes) -> list[socket.socket]:
    host, port = root.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        if payload:
            sock.sendall(payload)
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_sent_requests_time_out_and_do_not_stop_the_sandbox(tmp_path: Path) -> None:
    with sandbox_process(tmp_path) as (root, stderr_path):
        silent = open_half_sent(root, 100, b"")
        half_headers = open_half_sent(root, 100, b"GET /v1/user HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag")
        half_body = open_half_sent(
            root,
            100,
            b"POST /v1/patients HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"first_',
        )
        assert get_user(root) == 200  # served while 300 connections hang
        started = time.monotonic()
        for sock in [*silent, *half_headers, *half_body]:
            assert closed_by_server(sock, within=5), "a half-sent request was kept open"
            sock.close()
        assert time.monotonic() - started < 8
        # A request that keeps sending, slowly but within the idle timeout, is not cut.
        host, port = root.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=5)
        slow.sendall(b"GET /v1/user HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)
        slow.sendall(f"User-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n".encode())
        assert slow.recv(100).startswith(b"HTTP/1.1 401")
        slow.close()
        assert get_user(root) == 200
    assert len(stderr_path.read_text().splitlines()) <= 5


def test_running_out_of_descriptors_neither_stops_it_nor_floods_the_log(tmp_path: Path) -> None:
    with sandbox_process(tmp_path, max_files=128) as (root, stderr_path):
        # Far more connections than descriptors: the cap closes the excess at once.
        flood = []
        for _ in range(3):
            flood += open_half_sent(root, 150, b"GET /v1/user HTTP/1.1\r\n")
        refused = sum(closed_by_server(sock, within=0.05) for sock in flood)
        assert refused >= 150
        time.sleep(2.5)  # the half-sent ones time out
        assert get_user(root) == 200
        for sock in flood:
            sock.close()
        assert get_user(root) == 200
    log = stderr_path.read_text().splitlines()
    assert len(log) <= 10, log
