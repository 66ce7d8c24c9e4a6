"""The total deadline of a task's call, against raw loopback sockets: status line and headers included.

``requests`` bounds each socket read only; the hook's ``DeadlineWatch`` is armed before the request is
sent, so a server that trickles its status line and headers, or accepts and never answers, is cut off at
the connection's ``timeout`` like a body that trickles.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import urllib3.connection
from airflow.providers.common.compat.sdk import AirflowFailException
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cliniko_provider.exceptions import ClinikoConnectionError, S3UploadError
from cliniko_provider.hooks.cliniko import ClinikoHook, DeadlineWatch
from cliniko_provider.utils.budget import PROCESS_BUDGETS
from cliniko_provider.utils.retry import Deadline, DeadlineExceeded
from tests.conftest import connection_json

KEY = "DeAdLiNeSeCrEt-au1"
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"id": "1"}'
USER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{"id": 7}'
S3_BODY = b"<PostResponse><Key>k/a.txt</Key></PostResponse>"
S3_OK = b"HTTP/1.1 201 Created\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s" % (
    len(S3_BODY),
    S3_BODY,
)
DEADLINE_MESSAGE = (
    r"after 1 attempt\(s\): no complete answer within the 1 s deadline \(the connection's "
    r"'timeout' extra, which bounds connect, answer and body together\).*the task's retries may succeed"
)
# A call the 1 s deadline cuts off ends before this (the overshoot is tens of milliseconds on a quiet
# machine; the bound leaves room for a loaded one).
BOUND = 2.0

Reply = Callable[[socket.socket], None]


def trickled(answer: bytes, every: float = 0.5) -> Reply:
    """Send ``answer`` one byte every ``every`` seconds (the status line and headers first)."""

    def send(client: socket.socket) -> None:
        for byte in answer:
            client.sendall(bytes([byte]))
            time.sleep(every)

    return send


def paced(answer: bytes, over: float = 0.8) -> Reply:
    """Send ``answer`` in three parts, the last ``over`` s after the first (few sleeps: little drift)."""

    def send(client: socket.socket) -> None:
        third = len(answer) // 3
        for part in (answer[:third], answer[third : 2 * third]):
            client.sendall(part)
            time.sleep(over / 2)
        client.sendall(answer[2 * third :])

    return send


def at_once(answer: bytes) -> Reply:
    return lambda client: client.sendall(answer)


def silent(client: socket.socket) -> None:
    """Accept, read the request, and never answer (until the client goes away)."""
    while client.recv(1024):
        pass


class RawServer:
    """A loopback server that reads each request (headers and Content-Length body) and runs its reply.

    Connections are kept alive; each request records the client's port (which connection it came on).
    The last reply repeats. ``GET .../user`` (who the key is) is answered at once and not recorded.
    """

    def __init__(self, *replies: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.replies = list(replies)
        self.scheme = "https" if tls else "http"
        self.ports: list[int] = []
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                client: socket.socket = self.request
                buffered = b""
                try:
                    if tls is not None:
                        client = tls.wrap_socket(client, server_side=True)
                    while True:
                        while b"\r\n\r\n" not in buffered:
                            data = client.recv(65536)
                            if not data:
                                return
                            buffered += data
                        head, _, buffered = buffered.partition(b"\r\n\r\n")
                        length = next(
                            (
                                int(line.split(b":", 1)[1])
                                for line in head.split(b"\r\n")
                                if line.lower().startswith(b"content-length:")
                            ),
                            0,
                        )
                        while len(buffered) < length:
                            data = client.recv(65536)
                            if not data:
                                return
                            buffered += data
                        buffered = buffered[length:]
                        if head.split(b" ", 2)[1].endswith(b"/user"):  # who the key is: not under test
                            client.sendall(USER)
                            continue
                        server.ports.append(self.client_address[1])
                        reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                        reply(client)
                except OSError:  # the client shut the connection: what the deadline does
                    return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., RawServer]]:
    made: list[RawServer] = []

    def make(*replies: Reply, tls: ssl.SSLContext | None = None) -> RawServer:
        made.append(RawServer(*replies, tls=tls))
        return made[-1]

    yield make
    for item in made:
        item.close()


def hook_for(monkeypatch: pytest.MonkeyPatch, server: RawServer, **extra: object) -> ClinikoHook:
    monkeypatch.setenv("AIRFLOW_CONN_CLINIKO_DEFAULT", connection_json(KEY, f"{server.url}/v1", **extra))
    PROCESS_BUDGETS.clear()
    hook = ClinikoHook(sleep=lambda _: None)
    hook.settings  # noqa: B018 - the connection is read before the clock starts
    return hook


def cut_off(call: Callable[[], object], error: type[Exception], message: str) -> float:
    """Run a call that the 1 s deadline must end; return how long it took."""
    started = time.monotonic()
    with pytest.raises(error, match=message) as caught:
        call()
    elapsed = time.monotonic() - started
    assert not isinstance(caught.value, AirflowFailException)  # retryable: the task's retries may help
    print(f"overshoot {elapsed - 1.0:.3f} s")  # make the figures visible with -s
    return elapsed


@pytest.mark.parametrize("stall", ["trickled headers", "silent"])
def test_an_api_call_whose_headers_never_come_whole_ends_at_the_deadline(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, stall: str
) -> None:
    server = servers(trickled(OK) if stall == "trickled headers" else silent)
    hook = hook_for(monkeypatch, server, timeout=1, max_attempts=1)
    elapsed = cut_off(lambda: hook.get_patient(1), ClinikoConnectionError, DEADLINE_MESSAGE)
    assert 1.0 <= elapsed < BOUND, f"a 1 s deadline took {elapsed:.2f} s"


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server's TLS context for 127.0.0.1 with a self-signed certificate, which ``requests`` trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_path))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def test_an_https_call_whose_headers_trickle_ends_at_the_deadline_and_reconnects(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, tls: ssl.SSLContext
) -> None:
    server = servers(trickled(OK), at_once(OK), tls=tls)
    hook = hook_for(monkeypatch, server, timeout=1, max_attempts=1)
    elapsed = cut_off(lambda: hook.get_patient(1), ClinikoConnectionError, DEADLINE_MESSAGE)
    assert 1.0 <= elapsed < BOUND, f"a 1 s deadline took {elapsed:.2f} s"
    assert hook.get_patient(1) == {"id": "1"}
    assert server.ports[0] != server.ports[1]


def test_a_call_through_an_http_proxy_whose_headers_trickle_ends_at_the_deadline(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, cliniko = servers(trickled(OK)), servers(at_once(OK))
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    hook = hook_for(monkeypatch, cliniko, timeout=1, max_attempts=1)
    elapsed = cut_off(lambda: hook.get_patient(1), ClinikoConnectionError, DEADLINE_MESSAGE)
    assert 1.0 <= elapsed < BOUND, f"a 1 s deadline took {elapsed:.2f} s"
    assert len(proxy.ports) == 1 and cliniko.ports == []  # it did go through the proxy


def test_a_content_download_whose_headers_trickle_ends_at_the_deadline(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = hook_for(monkeypatch, servers(trickled(OK)), timeout=1, max_attempts=1)
    elapsed = cut_off(lambda: hook.attachment_sha256(1), ClinikoConnectionError, DEADLINE_MESSAGE)
    assert 1.0 <= elapsed < BOUND, f"a 1 s deadline took {elapsed:.2f} s"


@pytest.mark.parametrize("stall", ["trickled headers", "silent"])
def test_s3s_answer_whose_headers_never_come_whole_ends_at_the_deadline_after_the_file(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stall: str
) -> None:
    s3 = servers(trickled(S3_OK) if stall == "trickled headers" else silent)
    hook = hook_for(monkeypatch, s3, timeout=1, max_attempts=1)
    source = tmp_path / "a.txt"
    source.write_bytes(b"abc")
    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    message = r"\(0 Timeout\): S3's answer: no complete answer within the 1 s"
    elapsed = cut_off(
        lambda: hook.upload_file(presign, lambda: source.open("rb"), 3, "a.txt"), S3UploadError, message
    )
    assert 1.0 <= elapsed < BOUND, f"a 1 s deadline took {elapsed:.2f} s"


def test_s3_hanging_up_after_the_file_is_a_broken_connection_not_the_deadline(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3 = servers(lambda client: client.shutdown(socket.SHUT_RDWR))  # reads the file, then hangs up
    hook = hook_for(monkeypatch, s3, timeout=1, max_attempts=1)
    source = tmp_path / "a.txt"
    source.write_bytes(b"abc")
    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    with pytest.raises(S3UploadError, match=r"\(0 ConnectionError\): ") as caught:
        hook.upload_file(presign, lambda: source.open("rb"), 3, "a.txt")
    assert "deadline" not in str(caught.value)


def test_an_upload_whose_writes_stall_ends_after_one_write_timeout(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hook = hook_for(monkeypatch, servers(silent), timeout=1, max_attempts=1)
    source = tmp_path / "big.bin"
    with source.open("wb") as sparse:
        sparse.truncate(64 * 1024 * 1024)  # far more than the loopback's socket buffers take
    with socket.create_server(("127.0.0.1", 0)) as s3:  # the kernel accepts; nobody ever reads
        presign = {"url": f"http://127.0.0.1:{s3.getsockname()[1]}/", "fields": {"key": "k/${filename}"}}
        started = time.monotonic()
        with pytest.raises(S3UploadError, match=r"\(0 ConnectionError\): .*timed out"):
            hook.upload_file(presign, lambda: source.open("rb"), 64 * 1024 * 1024, "big.bin")
        elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"a write stalled for {elapsed:.2f} s"


def test_a_slow_file_upload_is_not_cut_off_and_s3s_answer_then_has_the_whole_timeout(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = servers(paced(S3_OK))  # S3's answer: whole in 0.8 s, once the file is in
    hook = hook_for(monkeypatch, s3, timeout=1, max_attempts=1)

    class Slow(io.BytesIO):
        """A file read a byte each half second: 2 s in all, longer than the deadline (not running yet)."""

        def read(self, size: int | None = -1) -> bytes:
            time.sleep(0.5)
            return super().read(1)

    presign = {"url": f"{s3.url}/", "fields": {"key": "k/${filename}"}}
    started = time.monotonic()
    stored = hook.upload_file(presign, lambda: Slow(b"abc"), 3, "a.txt")
    assert stored.key == "k/a.txt"
    assert time.monotonic() - started > 2.0


def test_headers_that_come_whole_just_before_the_deadline_are_an_answer(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(OK) // 3 * 2 < OK.index(b"\r\n\r\n")  # the headers end in the last part, at 0.8 s
    hook = hook_for(monkeypatch, servers(paced(OK)), timeout=1, max_attempts=1)
    started = time.monotonic()
    assert hook.get_patient(1) == {"id": "1"}
    assert time.monotonic() - started > 0.8


def test_a_connection_shut_by_the_deadline_is_never_reused(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers(at_once(OK), trickled(OK), at_once(OK))
    hook = hook_for(monkeypatch, server, timeout=1, max_attempts=1)
    assert hook.get_patient(1) == {"id": "1"}
    with pytest.raises(ClinikoConnectionError, match=DEADLINE_MESSAGE):
        hook.get_patient(1)
    assert hook.get_patient(1) == {"id": "1"}
    first, shut, fresh = server.ports
    assert first == shut, "a healthy connection is kept alive and reused"
    assert fresh != shut, "the connection the deadline shut was used again"


def test_a_watch_shuts_a_connection_registered_after_it_fired(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers(at_once(OK))
    session = hook_for(monkeypatch, server).session
    watch = DeadlineWatch(Deadline(0.01))

    def late_call() -> None:
        with watch:
            time.sleep(0.1)
            assert watch.fired
            session.get(f"{server.url}/v1/x", timeout=5)  # connects after the deadline: shut at once

    with pytest.raises(DeadlineExceeded, match=r"within the 0\.01 s deadline") as caught:
        late_call()
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    assert session.get(f"{server.url}/v1/x", timeout=5).json() == {"id": "1"}  # left: watches nothing


def test_a_watch_without_a_deadline_never_fires_until_armed(
    servers: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers(trickled(OK, every=0.02))
    session = hook_for(monkeypatch, server).session
    watch = DeadlineWatch()

    def armed_late() -> None:
        with watch, session.get(f"{server.url}/v1/x", timeout=5, stream=True) as response:
            assert watch.fired is False  # ~1.4 s of headers, a byte every 20 ms, and no deadline yet
            watch.arm(Deadline(0.05))
            response.content  # noqa: B018 - the body trickles past the armed deadline

    with pytest.raises(DeadlineExceeded) as caught:
        armed_late()
    assert watch.fired
    assert isinstance(caught.value.__cause__, requests.RequestException)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_watch_fires_cleanly_with_no_connection_and_with_a_socket_already_closed() -> None:
    def fire(watch: DeadlineWatch) -> None:
        with watch:
            time.sleep(0.1)

    with pytest.raises(DeadlineExceeded):
        fire(DeadlineWatch(Deadline(0.01)))  # nothing registered yet: nothing to shut
    closed = socket.socket()
    closed.close()
    watch = DeadlineWatch(Deadline(0.01))
    watch.watch(urllib3.connection.HTTPConnection("127.0.0.1", 9), closed)  # its shutdown raises OSError
    with pytest.raises(DeadlineExceeded):
        fire(watch)


def test_a_connection_error_names_urllib3s_connection_not_the_watching_wrapper() -> None:
    from cliniko_provider.hooks.cliniko import _WatchedHTTPConnection, _WatchedHTTPSConnection

    assert str(_WatchedHTTPConnection("127.0.0.1", 8765)) == "HTTPConnection(host='127.0.0.1', port=8765)"
    assert str(_WatchedHTTPSConnection("api.example", 443)) == "HTTPSConnection(host='api.example', port=443)"
