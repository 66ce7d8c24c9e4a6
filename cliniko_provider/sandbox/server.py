"""Running the app on uvicorn: the ready line, clean shutdown on signals, cuttable connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as BaseProtocol

from cliniko_provider.sandbox.app import create_app
from cliniko_provider.sandbox.config import SandboxSettings
from cliniko_provider.sandbox.core import Sandbox

READY_PREFIX = "Cliniko sandbox ready: "


class Connections:
    """Every open connection, with the timeouts and the cap that keep a left-running sandbox up.

    - Header timeout: a request's headers must be complete within `header_timeout` seconds of
      the connection opening (or of the previous answer): half-sent requests cannot pile up.
    - Idle timeout: a request body that stops arriving for `idle_timeout` seconds is cut
      (time the server itself holds reading back, for flow control, does not count).
    - A cap below the process's file-descriptor limit: a connection past it is closed at once,
      so the listening socket never runs out of descriptors.
    """

    def __init__(self, header_timeout: float, idle_timeout: float, limit: int) -> None:
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.limit = limit
        self.open: set[Any] = set()
        self.by_client: dict[tuple[str, int], asyncio.Transport] = {}
        self.refused = 0
        self.timed_out = 0

    def sweep(self) -> None:
        now = time.monotonic()
        for protocol in list(self.open):
            if protocol.expired(now, self.header_timeout, self.idle_timeout):
                self.timed_out += 1
                protocol.transport.abort()

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sweep()


def tracking_protocol(connections: Connections) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, registered with `connections` (timeouts, cap, lookup by client)."""

    class TrackingProtocol(BaseProtocol):
        waiting_since: float | None = None  # when it began waiting for a request's headers
        last_data = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(connections.open) >= connections.limit:
                connections.refused += 1
                transport.abort()
                return
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # Headers and body go out in two writes: without this, Nagle's algorithm and the
                # client's delayed ACK hold each response back by about 40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)
            self.waiting_since = self.last_data = time.monotonic()
            connections.open.add(self)
            if self.client:
                connections.by_client[self.client] = transport

        def data_received(self, data: bytes) -> None:
            self.last_data = time.monotonic()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.waiting_since = None
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self.waiting_since = time.monotonic()
            super().on_response_complete()

        def expired(self, now: float, header_timeout: float, idle_timeout: float) -> bool:
            if self.waiting_since is not None:
                return now - self.waiting_since > header_timeout
            cycle = self.cycle
            reading_body = cycle is not None and cycle.more_body and not cycle.response_complete
            held_back = self.flow is not None and self.flow.read_paused
            return reading_body and not held_back and now - self.last_data > idle_timeout

        def connection_lost(self, exc: Exception | None) -> None:
            if self in connections.open:
                connections.open.discard(self)
                if self.client:
                    connections.by_client.pop(self.client, None)
                super().connection_lost(exc)

    return TrackingProtocol


class OncePerMinute(logging.Filter):
    """Lets each kind of log message through once a minute, saying how many were held back.

    When file descriptors run out, asyncio logs a failed `accept()` every second, and a flood of
    malformed requests makes uvicorn log one line each: a sandbox left running must not fill the
    disk with them.
    """

    def __init__(self, period: float = 60.0) -> None:
        super().__init__()
        self.period = period
        self.last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        shown_at, held = self.last.get(str(record.msg), (-self.period, 0))
        if now - shown_at < self.period:
            self.last[str(record.msg)] = (shown_at, held + 1)
            return False
        self.last[str(record.msg)] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.period:.0f} s)"
            record.exc_info = None
        return True


def connection_limit(reserve: int = 64) -> int:
    """Raise the soft file-descriptor limit to the hard one; connections may use all but `reserve`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    limit = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(8, limit - reserve)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: ours stops it and the process exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def public_url(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}/v1" if ":" in shown else f"http://{shown}:{port}/v1"


async def serve(settings: SandboxSettings, host: str, port: int, log_level: str = "warning") -> None:
    sandbox = Sandbox(settings)
    connections = Connections(settings.header_timeout, settings.idle_timeout, connection_limit())
    sandbox.transports = connections.by_client
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        create_app(sandbox),
        log_level=log_level,
        access_log=False,
        http=tracking_protocol(connections),
        lifespan="on",
        timeout_graceful_shutdown=3,
        timeout_keep_alive=5,
    )
    server = _Server(config)
    once_a_minute = OncePerMinute()
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(once_a_minute)
    loop = asyncio.get_running_loop()
    sweeper = asyncio.create_task(connections.sweep_forever(min(1.0, settings.header_timeout / 2)))
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _request_exit, server)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if settings.seed_example_patients:
        print(
            f"Cliniko sandbox: the example patients are there ({sandbox.seeded} created now)",
            file=sys.stderr,
            flush=True,
        )
    if server.started:
        bound_port: Any = sock.getsockname()[1]
        print(f"{READY_PREFIX}{public_url(host, int(bound_port))}", flush=True)
    await serving
    sweeper.cancel()
    sock.close()


def _request_exit(server: uvicorn.Server) -> None:
    if server.should_exit:
        server.force_exit = True
    server.should_exit = True
    print("Cliniko sandbox stopping", file=sys.stderr, flush=True)
