"""Running the app on uvicorn: the ready line, clean shutdown on signals, cuttable connections."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from cliniko_provider.sandbox.app import create_app
from cliniko_provider.sandbox.config import SandboxSettings
from cliniko_provider.sandbox.core import Sandbox

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as BaseProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools
    from uvicorn.protocols.http.h11_impl import H11Protocol as BaseProtocol  # type: ignore[assignment]

READY_PREFIX = "Cliniko sandbox ready: "


def tracking_protocol(transports: dict[tuple[str, int], asyncio.Transport]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, also keeping each connection's transport by client address."""

    class TrackingProtocol(BaseProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # Headers and body go out in two writes: without this, Nagle's algorithm and the
                # client's delayed ACK hold each response back by about 40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)
            if self.client:
                transports[self.client] = transport

        def connection_lost(self, exc: Exception | None) -> None:
            if self.client:
                transports.pop(self.client, None)
            super().connection_lost(exc)

    return TrackingProtocol


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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        create_app(sandbox),
        log_level=log_level,
        access_log=False,
        http=tracking_protocol(sandbox.transports),
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _request_exit, server)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        bound_port: Any = sock.getsockname()[1]
        print(f"{READY_PREFIX}{public_url(host, int(bound_port))}", flush=True)
    await serving
    sock.close()


def _request_exit(server: uvicorn.Server) -> None:
    if server.should_exit:
        server.force_exit = True
    server.should_exit = True
    print("Cliniko sandbox stopping", file=sys.stderr, flush=True)
