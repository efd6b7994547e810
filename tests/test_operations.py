"""
Integration tests of what an operator relies on, on the real C{twistd -n
tlsproxy} process: the connection limits, the drain on SIGTERM, and running
out of file descriptors.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from unittest import SkipTest, TestCase, mock

from tests import harness
from tests.harness import (
    HELLO,
    HOST,
    TIMEOUT,
    SendThenClose,
    TwistdProxy,
    client_context,
    client_hello,
    file_sha256,
    pattern_bytes,
    pattern_sha256,
    read_http_head,
    start_http_backend,
    start_proxy,
    start_raw_backend,
    temp_dir,
    tls_connect,
    wait_until,
)
from tests.test_twistd import (
    ABORTS,
    BIG,
    MIB,
    certificates,
    fd_baseline,
    http_proxy,
    http_request,
    still_serves,
    tls_args,
    url,
    verified,
    wait_for_end,
)

OTHER_HOST = "127.0.0.2"
"""A second loopback source address, for a second client."""

QUICK = 3.0
"""Seconds allowed for what should happen at once (a refusal, a request)."""


# --- clients ------------------------------------------------------------------


def connect_from(port: int, source: str, timeout: float = TIMEOUT) -> socket.socket:
    """
    Open a TCP connection from C{source} to 127.0.0.1:C{port}.
    """
    return socket.create_connection(
        (HOST, port), timeout=timeout, source_address=(source, 0)
    )


def tls_from(port: int, source: str, timeout: float = TIMEOUT) -> ssl.SSLSocket:
    """
    Connect from C{source} to 127.0.0.1:C{port} and complete a TLS handshake.

    A missing close_notify is reported as L{ssl.SSLEOFError}, never as a
    clean end of file.
    """
    sock = connect_from(port, source, timeout)
    try:
        return client_context().wrap_socket(
            sock, server_hostname="localhost", suppress_ragged_eofs=False
        )
    except BaseException:
        sock.close()
        raise


def fetch(sock: socket.socket, path: str = "/") -> bytes:
    """
    Send a keep-alive GET for C{path} on C{sock}; return the body of the 200
    response, failing on any other status or a short body.
    """
    sock.sendall(http_request(path, connection="keep-alive"))
    status, headers, body = read_http_head(sock)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise AssertionError(f"connection ended after {len(body)} body bytes")
        body += chunk
    if status != 200:
        raise AssertionError(f"status {status}")
    return body


def open_client(
    case: TestCase, proxy: TwistdProxy, source: str = HOST
) -> ssl.SSLSocket:
    """
    Open a TLS connection from C{source} that relays C{GET /}, and stays open
    (keep-alive) until C{case} ends.
    """
    sock = tls_from(proxy.port, source)
    case.addCleanup(sock.close)
    case.assertEqual(sock.getsockname()[0], source)
    case.assertEqual(fetch(sock), HELLO)
    return sock


def assert_closed_at_once(case: TestCase, port: int, source: str = HOST) -> None:
    """
    Check that a connection from C{source} is accepted and then reset or
    closed without a byte in answer to its ClientHello, and that a TLS
    handshake from there fails.

    That is two refusals.  (The reset can arrive before C{connect} or
    C{send} returns, which then report it; the kernel refusing would be a
    different error.)
    """
    try:
        with connect_from(port, source, QUICK) as sock:
            sock.sendall(client_hello())
            first = sock.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        first = b""
    case.assertEqual(first, b"")
    with case.assertRaises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        tls_from(port, source, QUICK).close()


def refuses(port: int) -> bool:
    """
    Return whether the kernel refuses a TCP connection to 127.0.0.1:C{port}
    (nothing listens there); a connection that is made is closed at once.
    """
    try:
        socket.create_connection((HOST, port), timeout=QUICK).close()
    except ConnectionRefusedError:
        return True
    return False


def relaying_client(port: int) -> ssl.SSLSocket | None:
    """
    Return a new TLS connection that relayed C{GET /}, or C{None} if the
    connection, its handshake or the request failed within L{QUICK} seconds.
    """
    try:
        sock = tls_from(port, HOST, QUICK)
    except OSError:  # ssl.SSLError and timeouts included
        return None
    try:
        if fetch(sock) == HELLO:
            return sock
    except (OSError, AssertionError):
        pass
    sock.close()
    return None


# --- tests --------------------------------------------------------------------


class ConnectionLimitTests(TestCase):
    """
    Connections past a limit are closed at once; the others are served.
    """

    def test_max_connections(self) -> None:
        """
        Past --max-connections live connections a new one is closed before
        any TLS byte while the live ones keep relaying, and once one of them
        closes a new one is served.
        """
        proxy, backend, _ = http_proxy(self, "--max-connections", "2")
        live = [open_client(self, proxy) for _ in range(2)]
        assert_closed_at_once(self, proxy.port)
        assert_closed_at_once(self, proxy.port, OTHER_HOST)
        for sock in live:
            self.assertEqual(fetch(sock), HELLO)
        live[0].close()
        proxy.wait_for_closes(1)
        open_client(self, proxy)
        assert_closed_at_once(self, proxy.port)
        self.assertEqual(len(backend.peers()), 3)

    def test_refusals_logged_after_ten_seconds(self) -> None:
        """
        Refusals are counted and logged in one line about 10 s after the
        first one.
        """
        proxy, _, _ = http_proxy(self, "--max-connections", "1")
        open_client(self, proxy)
        first = time.monotonic()
        assert_closed_at_once(self, proxy.port)
        assert_closed_at_once(self, proxy.port)
        line = "refused 4 connection(s) over the limits in 10.0 s"
        wait_until(lambda: line in proxy.log_text(), repr(line), timeout=15)
        self.assertGreater(time.monotonic() - first, 9.5)
        self.assertEqual(proxy.log_text().count("refused "), 1)


class DrainTests(TestCase):
    """
    On SIGTERM the proxy stops accepting, lets live connections finish for
    --drain-timeout seconds, aborts the rest, and exits 0.
    """

    def test_transfer_in_flight_completes(self) -> None:
        """
        A download in flight when SIGTERM arrives completes intact while new
        connections are refused, and the proxy then exits 0 without waiting
        out the drain timeout.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        proxy, _, certs = http_proxy(self)
        target = temp_dir(self) / "download"
        # 64 MiB at 32 MiB/s: about 2 s in flight.
        download = subprocess.Popen(
            [
                curl,
                "-sS",
                "--fail",
                "--max-time",
                str(TIMEOUT),
                "--limit-rate",
                "32M",
                "-H",
                "Connection: close",
                *verified(proxy, certs),
                "-o",
                str(target),
                url(proxy, f"/bytes/{BIG}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(download.wait, TIMEOUT)
        self.addCleanup(download.kill)
        wait_until(
            lambda: target.exists() and target.stat().st_size >= MIB,
            "the download to start",
        )
        signalled = time.monotonic()
        proxy.terminate()
        wait_until(lambda: refuses(proxy.port), "the proxy to stop accepting")
        self.assertIsNone(download.poll(), "the download ended before the drain")
        self.assertTrue(proxy.running())
        _, errors = download.communicate(timeout=TIMEOUT + 5)
        self.assertEqual(download.returncode, 0, errors)
        self.assertEqual(proxy.wait_for_exit(), 0)
        self.assertLess(time.monotonic() - signalled, 8)
        self.assertEqual(target.stat().st_size, BIG)
        self.assertEqual(file_sha256(target), pattern_sha256(BIG))
        closes = proxy.close_lines()
        self.assertTrue(any("backend closed" in line for line in closes), closes)
        self.assertFalse(any("drain timeout" in line for line in closes), closes)

    def test_idle_connection_aborted(self) -> None:
        """
        With --drain-timeout 1 a connection still open a second after SIGTERM
        is aborted without close_notify and logged as drain timeout, and the
        proxy exits 0.
        """
        proxy, _, _ = http_proxy(self, "--drain-timeout", "1")
        sock = open_client(self, proxy)
        sock.settimeout(5)
        signalled = time.monotonic()
        proxy.terminate()
        wait_until(lambda: refuses(proxy.port), "the proxy to stop accepting")
        with self.assertRaises(ABORTS):
            while sock.recv(1 << 16):
                pass
        aborted = time.monotonic() - signalled
        self.assertEqual(proxy.wait_for_exit(), 0)
        stopped = time.monotonic() - signalled
        self.assertGreater(aborted, 0.9)
        self.assertLess(aborted, 3)
        self.assertLess(stopped, 5)
        drained = [line for line in proxy.close_lines() if "drain timeout" in line]
        self.assertEqual(len(drained), 1, proxy.close_lines())
        self.assertIn("closed: drain timeout", drained[0])


class DescriptorExhaustionTests(TestCase):
    """
    Running out of file descriptors refuses new connections only, for a
    while.
    """

    def test_out_of_descriptors(self) -> None:
        """
        At its file descriptor limit the proxy stays up, refuses new
        connections (whether the client's or the backend's socket is the one
        too many), relays on the live ones, and serves new connections again
        once some live ones close.
        """
        proxy, _, _ = http_proxy(self)
        # First a connection, so that whatever it opens for good is open.
        with contextlib.closing(open_client(self, proxy)):
            pass
        proxy.wait_for_closes(1)
        baseline = proxy.fd_count()
        # Room for 8 connections (2 descriptors each: client and backend)
        # and one more client.
        room = 8
        limit = baseline + 2 * room + 1
        _, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (limit, hard))

        live: list[ssl.SSLSocket] = []
        while (client := relaying_client(proxy.port)) is not None:
            self.addCleanup(client.close)
            live.append(client)
            self.assertLessEqual(len(live), room, "no limit reached")
        self.assertEqual(len(live), room)
        # One descriptor was left: the client got it, the backend did not.
        proxy.wait_for_log(r"closed: backend connect failed")
        # A client stalled in its handshake takes the last one.
        stalled = socket.create_connection((HOST, proxy.port), timeout=QUICK)
        self.addCleanup(stalled.close)
        wait_until(lambda: proxy.fd_count() >= limit, "the last descriptor in use")
        self.assertIsNone(relaying_client(proxy.port))

        self.assertTrue(proxy.running())
        for sock in live:
            self.assertEqual(fetch(sock, "/bytes/100000"), pattern_bytes(100000))
        for sock in live[:3]:
            sock.close()
        later: list[ssl.SSLSocket] = []

        def served() -> bool:
            client = relaying_client(proxy.port)
            if client is not None:
                self.addCleanup(client.close)
                later.append(client)
            return client is not None

        wait_until(served, "a new connection to be served")
        for sock in live[3:]:
            self.assertEqual(fetch(sock), HELLO)
        stalled.close()
        for sock in live + later:
            sock.close()
        proxy.wait_for_fd_count(baseline)
        self.assertTrue(proxy.running())
        self.assertNotIn("Traceback", proxy.log_text() + proxy.output_text())


class MoreFaultTests(TestCase):
    """
    Faults not covered in test_twistd: each ends its own connection, and the
    proxy then serves normally with its descriptors back to the baseline.
    """

    def test_backend_closes_early(self) -> None:
        """
        A backend that accepts and closes at once gives the client a clean
        end with no bytes (close_notify), and the log says backend closed.
        """
        backend = start_raw_backend(self, SendThenClose(0))
        certs = certificates(self)
        proxy = start_proxy(
            self, "--connect", f"tcp:{HOST}:{backend.port}", *tls_args(certs)
        )
        with tls_connect(proxy.port, client_context(certs.ca)) as sock:
            sock.sendall(b"hello?")
            self.assertEqual(sock.recv(100), b"")
        proxy.wait_for_log(r"closed: backend closed")

    def test_oversized_client_hello(self) -> None:
        """
        A handshake record claiming 64 KiB (more than TLS allows) ends that
        connection with a TLS error.
        """
        proxy, _, certs = http_proxy(self)
        baseline = fd_baseline(proxy, certs)
        record = b"\x16\x03\x01\xff\xff" + b"\x01\x00\xff\xfb" + b"\x00" * 65531
        with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
            with contextlib.suppress(ConnectionError):
                sock.sendall(record)
            wait_for_end(sock)
        proxy.wait_for_log(r"closed: TLS error")
        still_serves(proxy, certs, baseline)

    def test_proxy_header_unexpected(self) -> None:
        """
        A PROXY header sent to a listener that expects none is not TLS: that
        connection ends with a TLS error, and the header names no one.
        """
        proxy, _, certs = http_proxy(self)
        baseline = fd_baseline(proxy, certs)
        with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
            sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4711 443\r\n")
            sock.sendall(client_hello())
            wait_for_end(sock)
        [match] = proxy.wait_for_log(r".* closed: TLS error.*")
        line = match.group(0)
        self.assertNotIn("203.0.113.9", line)
        still_serves(proxy, certs, baseline)

    def test_malformed_proxy_header(self) -> None:
        """
        Behind a front balancer, a malformed PROXY header ends that
        connection (reason: no valid PROXY header); a good one is served.
        """
        certs = certificates(self)
        backend = start_http_backend(self)
        proxy = TwistdProxy(
            temp_dir(self),
            [
                "--listen",
                f"haproxy:tcp:0:interface={HOST}",
                "--connect",
                f"tcp:{HOST}:{backend.port}",
                *tls_args(certs),
            ],
        )
        self.addCleanup(proxy.stop)
        for header in (b"PROXY TCP4 not-an-address\r\n", b"PROXY\r\n" + b"x" * 200):
            with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
                sock.sendall(header)
                wait_for_end(sock)
        proxy.wait_for_log(r"closed: no valid PROXY header", 2)
        with socket.create_connection((HOST, proxy.port), timeout=20) as raw:
            raw.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4711 443\r\n")
            with client_context(certs.ca).wrap_socket(
                raw, server_hostname="localhost"
            ) as sock:
                sock.sendall(http_request("/"))
                status, _, _ = read_http_head(sock)
        self.assertEqual(status, 200)
        line = proxy.wait_for_closes(3)[-1]
        self.assertIn("from 203.0.113.9:4711", line)

    def test_hostile_proxy_headers(self) -> None:
        """
        Headers whose fields are not addresses and ports (a line break and a
        forged log line, terminal escapes, ports out of range or not
        numbers, bytes that are not UTF-8, cut-short v2 addresses) each end
        their connection, logged as one line each, with no traceback.
        """
        backend = start_http_backend(self)
        proxy = TwistdProxy(
            temp_dir(self),
            [
                "--listen",
                f"haproxy:tcp:0:interface={HOST}",
                "--connect",
                f"tcp:{HOST}:{backend.port}",
                "--self-signed",
                "localhost",
            ],
        )
        self.addCleanup(proxy.stop)
        v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11"
        headers = [
            b"PROXY TCP4 1.2.3.4\nFORGED line 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 \x1b[31m1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999999 -7\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 443\r\n",
            b"PROXY TCP6 \xff\xfe::1 ::2 1 2\r\n",
            b"PROXY TCP6 fe80::1%\x1b[0m ::2 1 2\r\n",
            v2 + b"\x00\x04" + b"\x01\x02\x03\x04",
        ]
        for header in headers:
            with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
                sock.sendall(header)
                wait_for_end(sock)
        proxy.wait_for_log(r"closed: no valid PROXY header", len(headers))
        log = proxy.log_text()
        self.assertNotIn("\x1b", log)
        self.assertFalse(
            [line for line in log.splitlines() if line.startswith("FORGED")], log
        )


class ConfinedLogTests(TestCase):
    """twistd's own log file, written by a process confined with Landlock."""

    def test_sigusr1_rotates(self) -> None:
        """
        SIGUSR1 rotates twistd's log file (twistd.log to twistd.log.1, a new
        twistd.log): the log's directory is where the confined process may
        rename and make files, and the next connection's line is written.
        """
        proxy, _, _ = http_proxy(self)
        proxy.wait_for_log(r"Landlock ABI \d+: read .*, rotate logs in ")
        directory = proxy._log.parent
        os.kill(proxy.pid, signal.SIGUSR1)
        wait_until(lambda: (directory / "twistd.log.1").exists(), "twistd.log.1")
        sock = open_client(self, proxy)
        self.assertEqual(fetch(sock), HELLO)
        sock.close()
        wait_until(
            lambda: " closed: " in (directory / "twistd.log").read_text(),
            "the connection's line in the new twistd.log",
        )
        self.assertIn("Landlock ABI", (directory / "twistd.log.1").read_text())

    def test_no_landlock(self) -> None:
        """
        On a kernel without Landlock (simulated: the ABI is 0), the real
        twistd warns that it is not confined, and serves.
        """
        directory = temp_dir(self)
        wrapper = directory / "twistd-no-landlock"
        wrapper.write_text(
            f"#!{sys.executable}\n"
            "import sys\nimport tlsproxy.sandbox\n"
            "tlsproxy.sandbox.abi = lambda: 0\n"
            "from twisted.scripts.twistd import run\nsys.exit(run())\n"
        )
        wrapper.chmod(0o755)
        with mock.patch.object(harness, "_twistd", lambda: str(wrapper)):
            proxy, _, _ = http_proxy(self)
        proxy.wait_for_log(r"no Landlock \(Linux 5\.13\+ on x86_64, aarch64\)")
        self.assertNotIn("Landlock ABI", proxy.log_text())
        sock = open_client(self, proxy)
        self.assertEqual(fetch(sock), HELLO)
