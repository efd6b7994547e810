"""
Helpers for the integration tests that drive a real ``twistd -n tlsproxy``.

Everything listens and connects on 127.0.0.1 only, and every wait is bounded
by L{TIMEOUT} seconds.  Backends run in threads of the test process; the
proxy runs as a child process.  Each ``start_*`` function registers the
matching stop with C{addCleanup}, so a test never leaks a process, a thread
or a socket, whatever way it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import SkipTest, TestCase

import attrs
import trustme

HOST = "127.0.0.1"
TIMEOUT = 20.0
"""The upper bound, in seconds, of every wait in these tests."""

_POLL_INTERVAL = 0.05

# A prime length, so the repeating stream never lines up with buffer sizes.
_PATTERN = random.Random(20240601).randbytes(65521)


# --- the deterministic byte stream -----------------------------------------


def pattern_chunks(size: int) -> Iterator[bytes]:
    """
    Yield the first C{size} bytes of the deterministic test stream, in chunks.
    """
    full, rest = divmod(size, len(_PATTERN))
    for _ in range(full):
        yield _PATTERN
    if rest:
        yield _PATTERN[:rest]


def pattern_bytes(size: int) -> bytes:
    """
    Return the first C{size} bytes of the deterministic test stream.
    """
    return b"".join(pattern_chunks(size))


def sha256_of(chunks: Iterable[bytes]) -> str:
    """
    Return the hex SHA-256 of the concatenation of C{chunks}.
    """
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def pattern_sha256(size: int) -> str:
    """
    Return the hex SHA-256 of the first C{size} bytes of the test stream.
    """
    return sha256_of(pattern_chunks(size))


def file_sha256(path: Path) -> str:
    """
    Return the hex SHA-256 of the file at C{path}.
    """
    with path.open("rb") as f:
        return sha256_of(iter(lambda: f.read(1 << 20), b""))


def write_pattern_file(path: Path, size: int) -> None:
    """
    Write the first C{size} bytes of the test stream to C{path}.
    """
    with path.open("wb") as f:
        for chunk in pattern_chunks(size):
            f.write(chunk)


# --- temporary directories and certificates --------------------------------


def temp_dir(case: TestCase) -> Path:
    """
    Return a new, empty directory (under the current one, which trial makes
    C{_trial_temp}) that is removed when C{case} ends.
    """
    name = case.id().rsplit(".", 1)[-1]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=Path.cwd()))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


@attrs.frozen
class Certificates:
    """
    PEM files made by trustme: a root CA, an intermediate and a leaf.

    @ivar ca: the root CA certificate, for clients that verify.
    @ivar cert: the leaf certificate (for C{localhost} and C{127.0.0.1})
        followed by the intermediate CA certificate.
    @ivar key: the leaf's private key.
    @ivar other_key: a valid private key that does not belong to C{cert}.
    """

    ca: Path
    cert: Path
    key: Path
    other_key: Path


def make_certificates(directory: Path) -> Certificates:
    """
    Write a fresh CA, a leaf with its chain and two keys into C{directory}.
    """
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("localhost", "127.0.0.1")
    stranger = root.issue_cert("localhost")
    files = Certificates(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        other_key=directory / "other-key.pem",
    )
    root.cert_pem.write_to_path(str(files.ca))
    with files.cert.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(files.key))
    stranger.private_key_pem.write_to_path(str(files.other_key))
    for key in (files.key, files.other_key):
        key.chmod(0o600)  # (readable by others: a warning at each start)
    return files


# --- polling ----------------------------------------------------------------


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT
) -> None:
    """
    Return once C{predicate()} is true; fail the test after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(_POLL_INTERVAL)


# --- the HTTP backend -------------------------------------------------------


class _HttpServer(http.server.ThreadingHTTPServer):
    """
    A threaded HTTP server that remembers its connections so it can end them.
    """

    daemon_threads = True

    def __init__(self, listening: socket.socket) -> None:
        super().__init__(listening.getsockname(), _HttpHandler, False)
        self.socket.close()
        self.socket = listening
        self.server_activate()
        self.peers: list[tuple[str, int]] = []
        self.most_open = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.peers.append(client_address)
            self._open.add(request)
            self.most_open = max(self.most_open, len(self._open))
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """
        Stay quiet: clients that go away mid-response are part of the tests.
        """

    def end_all(self) -> None:
        """
        Stop serving, end every open connection and wait for their threads.
        """
        self.shutdown()
        with self._lock:
            for request in self._open:
                _shutdown_quietly(request)
        wait_until(lambda: not self._open, "HTTP backend connections to end")
        self.server_close()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    """
    C{GET /} says hello, C{GET /bytes/N} sends N bytes of the test stream and
    C{POST} answers the hex SHA-256 of the request body.
    """

    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def do_GET(self) -> None:
        sized = re.fullmatch(r"/bytes/(\d+)", self.path)
        if sized:
            size = int(sized.group(1))
            self._head(200, size)
            for chunk in pattern_chunks(size):
                self.wfile.write(chunk)
        elif self.path == "/":
            self._reply(HELLO)
        else:
            self._reply(b"not found\n", status=404)

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            digest.update(chunk)
            remaining -= len(chunk)
        self._reply(digest.hexdigest().encode("ascii"))

    def _head(self, status: int, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            # Say so, or curl may reuse the connection it asked to close.
            self.send_header("Connection", "close")
        self.end_headers()

    def _reply(self, body: bytes, status: int = 200) -> None:
        self._head(status, len(body))
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """
        Stay quiet.
        """


HELLO = b"hello from the HTTP backend\n"
"""The body of C{GET /} on L{HttpBackend}."""


class HttpBackend:
    """
    An HTTP/1.1 backend on 127.0.0.1 served by threads.

    @ivar port: the port it listens on.
    """

    def __init__(self, listening: socket.socket | None = None) -> None:
        """
        Serve on C{listening} (bound, not yet listening) or on a new port.
        """
        self._server = _HttpServer(listening or bound_socket())
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"http-backend-{self.port}",
        )
        self._thread.start()

    def peers(self) -> list[tuple[str, int]]:
        """
        Return the peer address of every connection accepted so far, in order.
        """
        with self._server._lock:
            return list(self._server.peers)

    def most_concurrent(self) -> int:
        """
        Return the largest number of connections that were open at once.
        """
        with self._server._lock:
            return self._server.most_open

    def stop(self) -> None:
        """
        Stop listening, end every connection, and join the serving thread.
        """
        self._server.end_all()
        self._thread.join(TIMEOUT)


def start_http_backend(
    case: TestCase, listening: socket.socket | None = None
) -> HttpBackend:
    """
    Start an L{HttpBackend} that C{case} stops when it ends.
    """
    backend = HttpBackend(listening)
    case.addCleanup(backend.stop)
    return backend


# --- the raw TCP backend ----------------------------------------------------


@attrs.frozen
class SendThenClose:
    """
    Send C{size} bytes of the test stream, then close (FIN).
    """

    size: int


@attrs.frozen
class SendThenReset:
    """
    Send C{size} bytes, wait for the kernel to pass them on, then reset (RST).
    """

    size: int


@attrs.frozen
class Sink:
    """
    Read until end of file, recording the byte count and the SHA-256.
    """


@attrs.frozen
class Stall:
    """
    Accept, then neither read nor write until the backend stops.
    """


@attrs.frozen
class HttpReply:
    """
    Read one request head, answer C{body} with C{Connection: close}, close.
    """

    body: bytes = b"hello from the raw backend\n"


Mode = SendThenClose | SendThenReset | Sink | Stall | HttpReply


@attrs.define
class BackendConnection:
    """
    What L{RawBackend} saw on one accepted connection.

    The fields other than C{peer} are final once C{finished} is set.

    @ivar peer: the address of the proxy's end of the connection.
    @ivar received: how many bytes arrived.
    @ivar sha256: the hex SHA-256 of the bytes that arrived.
    @ivar eof: whether an orderly end of file (FIN) arrived.
    """

    peer: tuple[str, int]
    received: int = 0
    sha256: str = ""
    eof: bool = False
    finished: threading.Event = attrs.field(factory=threading.Event)


class RawBackend:
    """
    A TCP backend on 127.0.0.1 that treats each new connection per L{Mode}.

    @ivar port: the port it listens on.
    @ivar mode: how the next accepted connection is treated; may be changed
        between connections.
    """

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._listening = bound_socket()
        self._listening.listen(64)
        self._listening.settimeout(_POLL_INTERVAL)
        self.port: int = self._listening.getsockname()[1]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[BackendConnection] = []
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accepting = self._spawn(self._accept_loop)

    def connections(self, count: int = 0) -> list[BackendConnection]:
        """
        Return the connections accepted so far, first waiting for C{count}.
        """
        wait_until(
            lambda: len(self._connections) >= count,
            f"{count} backend connection(s)",
        )
        with self._lock:
            return list(self._connections)

    def finished_connection(self, index: int = 0) -> BackendConnection:
        """
        Wait until connection number C{index} is over, and return it.
        """
        connection = self.connections(index + 1)[index]
        if not connection.finished.wait(TIMEOUT):
            raise AssertionError(f"backend connection {index} did not finish")
        return connection

    def stop(self) -> None:
        """
        Stop accepting, end every connection, and join every thread.
        """
        self._stopping.set()
        self._accepting.join(TIMEOUT)
        with self._lock:
            for conn in self._open:
                _shutdown_quietly(conn)
            threads = list(self._threads)
        for thread in threads:
            thread.join(TIMEOUT)
        self._listening.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(
            target=target, args=args, name=f"raw-backend-{self.port}"
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listening.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            record = BackendConnection(peer=peer)
            mode = self.mode
            with self._lock:
                self._connections.append(record)
                self._open.add(conn)
            self._spawn(self._serve, conn, record, mode)

    def _serve(
        self, conn: socket.socket, record: BackendConnection, mode: Mode
    ) -> None:
        try:
            self._apply(conn, record, mode)
        except (OSError, AssertionError):
            pass
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()
            record.finished.set()

    def _apply(
        self, conn: socket.socket, record: BackendConnection, mode: Mode
    ) -> None:
        match mode:
            case SendThenClose(size=size):
                _send_pattern(conn, size)
                conn.shutdown(socket.SHUT_WR)
                _drain(conn, record)
            case SendThenReset(size=size):
                _send_pattern(conn, size)
                wait_until(lambda: _unsent_bytes(conn) == 0, "the send queue")
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            case Sink():
                _drain(conn, record)
            case Stall():
                self._stopping.wait(TIMEOUT * 3)
            case HttpReply(body=body):
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                conn.shutdown(socket.SHUT_WR)
                _drain(conn, record)


def start_raw_backend(case: TestCase, mode: Mode) -> RawBackend:
    """
    Start a L{RawBackend} that C{case} stops when it ends.
    """
    backend = RawBackend(mode)
    case.addCleanup(backend.stop)
    return backend


def _send_pattern(conn: socket.socket, size: int) -> None:
    for chunk in pattern_chunks(size):
        conn.sendall(chunk)


def _drain(conn: socket.socket, record: BackendConnection) -> None:
    """
    Read until end of file, recording what arrived in C{record}.
    """
    digest = hashlib.sha256()
    try:
        while chunk := conn.recv(1 << 16):
            digest.update(chunk)
            record.received += len(chunk)
        record.eof = True
    finally:
        record.sha256 = digest.hexdigest()


def _unsent_bytes(conn: socket.socket) -> int:
    """
    Return how many bytes the kernel still holds in C{conn}'s send queue.
    """
    out = fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", out)[0])


def _shutdown_quietly(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


# --- sockets and TLS clients ------------------------------------------------


def bound_socket() -> socket.socket:
    """
    Return a TCP socket bound to a free port on 127.0.0.1, not listening.

    Connections to its port are refused until someone calls C{listen}.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    return sock


def port_of(sock: socket.socket) -> int:
    """
    Return the local port of C{sock}.
    """
    return int(sock.getsockname()[1])


def client_context(cafile: Path | None = None) -> ssl.SSLContext:
    """
    Return a client context that verifies against C{cafile}, or not at all.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(cafile))
    return context


def tls_connect(port: int, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """
    Connect to 127.0.0.1:C{port} and complete a TLS handshake for localhost.

    A missing close_notify is reported as L{ssl.SSLEOFError}, never as a
    clean end of file.
    """
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
    try:
        return (context or client_context()).wrap_socket(
            sock, server_hostname="localhost", suppress_ragged_eofs=False
        )
    except BaseException:
        sock.close()
        raise


def read_to_end(sock: socket.socket, prefix: bytes = b"") -> tuple[int, str]:
    """
    Read until a clean end of file; return the byte count and hex SHA-256 of
    C{prefix} (bytes already read) followed by what arrived.

    Errors (including a TLS end without close_notify) propagate.
    """
    count = len(prefix)
    digest = hashlib.sha256(prefix)
    while chunk := sock.recv(1 << 16):
        count += len(chunk)
        digest.update(chunk)
    return count, digest.hexdigest()


def read_http_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """
    Read an HTTP response head; return status, headers and the body start.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection ended inside the head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, rest


def client_hello() -> bytes:
    """
    Return the bytes of a real TLS ClientHello for localhost.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- curl and openssl -------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} is not installed")
    return path


def run_curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{curl} (silent, failing on HTTP errors, time-bounded) with C{args}.
    """
    command = [_tool("curl"), "-sS", "--fail", "--max-time", str(TIMEOUT), *args]
    return subprocess.run(
        command, capture_output=True, timeout=TIMEOUT + 5, check=False
    )


def curl_ok(*args: str) -> bytes:
    """
    Run C{curl} with C{args}; return its output, failing the test on error.
    """
    result = run_curl(*args)
    if result.returncode != 0:
        raise AssertionError(
            f"curl {' '.join(args[:12])} ... exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace')}"
        )
    return result.stdout


def run_s_client(
    port: int, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{openssl s_client} against 127.0.0.1:C{port} (SNI localhost).
    """
    command = [
        _tool("openssl"),
        "s_client",
        "-connect",
        f"{HOST}:{port}",
        "-servername",
        "localhost",
        *args,
    ]
    return subprocess.run(
        command, input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )


# --- the proxy process ------------------------------------------------------


def _twistd() -> str:
    return str(Path(sys.executable).with_name("twistd"))


def _twistd_command(directory: Path, args: Sequence[str]) -> list[str]:
    return [
        _twistd(),
        "-n",
        "--logfile",
        str(directory / "twistd.log"),
        "--pidfile",
        str(directory / "twistd.pid"),
        "tlsproxy",
        *args,
    ]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class TwistdProxy:
    """
    A running C{twistd -n tlsproxy} child process.

    @ivar port: the port it listens on (127.0.0.1).
    @ivar pid: its process id.
    """

    def __init__(self, directory: Path, args: Sequence[str]) -> None:
        """
        Start the process with tlsproxy options C{args}; wait until it listens.
        """
        self._log = directory / "twistd.log"
        self._output = directory / "twistd.out"
        with self._output.open("wb") as output:
            self._process = subprocess.Popen(
                _twistd_command(directory, args),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.pid: int = self._process.pid
        try:
            self.port: int = int(self.wait_for_log(r"starting on (\d+)")[0].group(1))
        except BaseException:
            self.stop(check=False)
            raise
        self.started_rss = self.rss_bytes()

    def log_text(self) -> str:
        """
        Return the log so far, rotated parts included, oldest first.
        """
        rotated = sorted(
            self._log.parent.glob(self._log.name + ".*"),
            key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
            reverse=True,
        )
        return "".join(_read_text(p) for p in [*rotated, self._log])

    def output_text(self) -> str:
        """
        Return what the process wrote to stdout and stderr so far.
        """
        return _read_text(self._output)

    def close_lines(self) -> list[str]:
        """
        Return the per-connection lines logged so far (one per closed
        connection).
        """
        return [line for line in self.log_text().splitlines() if "closed:" in line]

    def wait_for_log(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """
        Wait until the log has C{count} matches of C{pattern}; return them all.
        """
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def enough() -> bool:
            found[:] = list(regex.finditer(self.log_text()))
            if len(found) < count and self._process.poll() is not None:
                raise AssertionError(
                    f"twistd exited {self._process.returncode} before logging "
                    f"{pattern!r}; output:\n{self.output_text()}"
                )
            return len(found) >= count

        try:
            wait_until(enough, f"{count} log line(s) matching {pattern!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nlog:\n{self.log_text()}") from None
        return found

    def wait_for_closes(self, count: int) -> list[str]:
        """
        Wait until C{count} connections have been logged as closed.
        """
        self.wait_for_log(r"closed:", count)
        return self.close_lines()

    def fd_count(self) -> int:
        """
        Return how many file descriptors the process has open.
        """
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_for_fd_count(self, most: int) -> None:
        """
        Wait until the process has at most C{most} open file descriptors.
        """
        wait_until(
            lambda: self.fd_count() <= most,
            f"the proxy's fd count to fall to {most} (now {self.fd_count()})",
        )

    def rss_bytes(self) -> int:
        """
        Return the process's resident set size in bytes.
        """
        status = Path(f"/proc/{self.pid}/status").read_text()
        kib = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if kib is None:
            raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")
        return int(kib.group(1)) * 1024

    def running(self) -> bool:
        """
        Return whether the process has not exited yet.
        """
        return self._process.poll() is None

    def terminate(self) -> None:
        """
        Send SIGTERM, without waiting for the exit.
        """
        self._process.send_signal(signal.SIGTERM)

    def wait_for_exit(self, timeout: float = TIMEOUT) -> int:
        """
        Wait at most C{timeout} seconds for the process to exit; return its
        exit status (negative: the signal that killed it).
        """
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"twistd still running after {timeout}s; log:\n{self.log_text()}"
            ) from None

    def stop(self, check: bool = True) -> None:
        """
        Send SIGTERM and wait for the exit; with C{check}, fail unless it
        shut down cleanly and nothing logged or printed a traceback.
        """
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(TIMEOUT)
            if check:
                raise AssertionError("twistd ignored SIGTERM") from None
        if not check:
            return
        text = self.log_text() + self.output_text()
        # twistd re-raises the signal that stopped it, once it has shut down.
        clean = self._process.returncode in (0, -signal.SIGTERM)
        if not clean or "Traceback" in text:
            raise AssertionError(
                f"twistd exited {self._process.returncode}; log and output:\n{text}"
            )


def start_proxy(case: TestCase, *args: str) -> TwistdProxy:
    """
    Start C{twistd -n tlsproxy ARGS} listening on an ephemeral 127.0.0.1 port;
    C{case} stops it (and checks its exit) when it ends.
    """
    proxy = TwistdProxy(temp_dir(case), ["--listen", f"tcp:0:interface={HOST}", *args])
    case.addCleanup(proxy.stop)
    return proxy


@attrs.frozen
class StartupFailure:
    """
    How a C{twistd tlsproxy} run that should not start ended.

    @ivar exit_code: the exit status.
    @ivar output: stdout and stderr, interleaved.
    @ivar log: the twistd log file (empty if it never got written).
    """

    exit_code: int
    output: str
    log: str

    @property
    def last_line(self) -> str:
        """
        The last non-empty line of the output.
        """
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_startup_error(case: TestCase, args: Sequence[str]) -> StartupFailure:
    """
    Run C{twistd -n tlsproxy ARGS} and return how it ended; fail the test if
    it is still running after L{TIMEOUT} seconds.
    """
    directory = temp_dir(case)
    try:
        result = subprocess.run(
            _twistd_command(directory, args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"twistd tlsproxy {args} did not exit") from None
    return StartupFailure(
        exit_code=result.returncode,
        output=result.stdout.decode("utf-8", errors="replace"),
        log=_read_text(directory / "twistd.log"),
    )
