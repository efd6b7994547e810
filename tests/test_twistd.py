"""
Integration tests: the real C{twistd -n tlsproxy} process, driven by curl,
C{openssl s_client} and Python's L{ssl} module on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import ssl
import struct
import subprocess
import time
from unittest import SkipTest, TestCase

from tests.harness import (
    HELLO,
    HOST,
    Certificates,
    HttpBackend,
    HttpReply,
    SendThenClose,
    SendThenReset,
    Sink,
    StartupFailure,
    TwistdProxy,
    bound_socket,
    client_hello,
    curl_ok,
    file_sha256,
    make_certificates,
    pattern_bytes,
    pattern_sha256,
    port_of,
    read_http_head,
    read_to_end,
    run_curl,
    run_s_client,
    run_startup_error,
    start_http_backend,
    start_proxy,
    start_raw_backend,
    temp_dir,
    tls_connect,
    write_pattern_file,
)

MIB = 1 << 20
BIG = 64 * MIB

ABORTS = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)
"""What a client sees when a TLS connection ends without close_notify."""


# --- shared set-ups ---------------------------------------------------------


def certificates(case: TestCase) -> Certificates:
    """
    Return fresh trustme certificate files for C{case}.
    """
    return make_certificates(temp_dir(case))


def tls_args(certs: Certificates) -> list[str]:
    """
    Return the options that serve C{certs}' leaf and chain.
    """
    return ["--cert", str(certs.cert), "--key", str(certs.key)]


def connect_to(port: int) -> list[str]:
    """
    Return the option that forwards to 127.0.0.1:C{port}.
    """
    return ["--connect", f"tcp:{HOST}:{port}"]


def http_proxy(
    case: TestCase, *extra: str
) -> tuple[TwistdProxy, HttpBackend, Certificates]:
    """
    Start an HTTP backend and a proxy serving trustme certificates before it.
    """
    certs = certificates(case)
    backend = start_http_backend(case)
    proxy = start_proxy(case, *connect_to(backend.port), *tls_args(certs), *extra)
    return proxy, backend, certs


def verified(proxy: TwistdProxy, certs: Certificates) -> list[str]:
    """
    Return curl options that verify the proxy as localhost against the CA.
    """
    return [
        "--cacert",
        str(certs.ca),
        "--resolve",
        f"localhost:{proxy.port}:{HOST}",
    ]


def url(proxy: TwistdProxy, path: str = "/") -> str:
    """
    Return the https URL of C{path} through C{proxy}, for host localhost.
    """
    return f"https://localhost:{proxy.port}{path}"


def get_hello(proxy: TwistdProxy, certs: Certificates) -> None:
    """
    Fetch C{/} through the proxy with a verifying curl and check the body.
    """
    body = curl_ok(*verified(proxy, certs), url(proxy))
    if body != HELLO:
        raise AssertionError(f"unexpected body {body!r}")


def fd_baseline(proxy: TwistdProxy, certs: Certificates) -> int:
    """
    Serve one request through the proxy, then return its fd count.
    """
    closes = len(proxy.close_lines())
    get_hello(proxy, certs)
    proxy.wait_for_closes(closes + 1)
    return proxy.fd_count()


def still_serves(proxy: TwistdProxy, certs: Certificates, baseline: int) -> None:
    """
    Check that a normal request succeeds, the fd count returns to baseline,
    and memory stays within 32 MiB of what the proxy had when it started.
    """
    get_hello(proxy, certs)
    proxy.wait_for_fd_count(baseline)
    grown = proxy.rss_bytes() - proxy.started_rss
    if grown > 32 * MIB:
        raise AssertionError(f"the proxy's RSS grew by {grown} bytes")


def wait_for_end(sock: socket.socket) -> None:
    """
    Read and discard until the peer ends the connection, cleanly or not.

    A socket timeout (the peer never ends it) propagates.
    """
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while sock.recv(65536):
            pass


def http_request(path: str, connection: str = "close") -> bytes:
    """
    Return an HTTP/1.1 GET request for C{path}.
    """
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n"
    ).encode("ascii")


# --- tests ------------------------------------------------------------------


class CurlTests(TestCase):
    """
    Plain curl, with ALPN on, fetches through the proxy.
    """

    def test_self_signed_with_alpn(self) -> None:
        """
        curl -k with ALPN on gets the backend's response from a --self-signed
        proxy.
        """
        backend = start_http_backend(self)
        proxy = start_proxy(
            self, *connect_to(backend.port), "--self-signed", "localhost"
        )
        result = run_curl("-v", "-k", f"https://{HOST}:{proxy.port}/")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, rb"ALPN.*offer")
        self.assertEqual(result.stdout, HELLO)

    def test_self_signed_fingerprint_logged(self) -> None:
        """
        The SHA-256 fingerprint logged for --self-signed is that of the
        certificate the proxy serves.
        """
        backend = start_http_backend(self)
        proxy = start_proxy(
            self, *connect_to(backend.port), "--self-signed", "localhost"
        )
        logged = proxy.wait_for_log(
            r"SHA-256 fingerprint ((?:[0-9A-Fa-f]{2}:){31}"
            r"[0-9A-Fa-f]{2})"
        )[0].group(1)
        with tls_connect(proxy.port) as sock:
            der = sock.getpeercert(binary_form=True)
        assert der is not None
        served = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        self.assertEqual(logged.upper(), served)

    def test_verified_chain_with_alpn(self) -> None:
        """
        curl with ALPN on verifies the --cert chain against the root CA and
        gets the backend's response.
        """
        proxy, _, certs = http_proxy(self)
        result = run_curl("-v", *verified(proxy, certs), url(proxy))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, rb"ALPN.*offer")
        self.assertEqual(result.stdout, HELLO)


class BulkTransferTests(TestCase):
    """
    Large and many transfers arrive intact.
    """

    def test_download_64_mib(self) -> None:
        """
        A 64 MiB download through the proxy has the backend's SHA-256.
        """
        proxy, _, certs = http_proxy(self)
        target = temp_dir(self) / "download"
        curl_ok(*verified(proxy, certs), "-o", str(target), url(proxy, f"/bytes/{BIG}"))
        self.assertEqual(target.stat().st_size, BIG)
        self.assertEqual(file_sha256(target), pattern_sha256(BIG))

    def test_upload_64_mib(self) -> None:
        """
        A 64 MiB upload through the proxy reaches the backend with its SHA-256.
        """
        proxy, _, certs = http_proxy(self)
        source = temp_dir(self) / "upload"
        write_pattern_file(source, BIG)
        answer = curl_ok(
            *verified(proxy, certs),
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{source}",
            url(proxy, "/upload"),
        )
        self.assertEqual(answer.decode("ascii"), pattern_sha256(BIG))

    def test_s_client_raw_stream(self) -> None:
        """
        openssl s_client -quiet receives exactly the 1 MiB a raw backend sends
        before closing.
        """
        certs = certificates(self)
        backend = start_raw_backend(self, SendThenClose(MIB))
        proxy = start_proxy(self, *connect_to(backend.port), *tls_args(certs))
        result = run_s_client(proxy.port, "-quiet")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stdout), MIB)
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(), pattern_sha256(MIB))

    def test_parallel_connections(self) -> None:
        """
        200 requests, 50 connections at a time, each on its own connection,
        all get their own correct response.
        """
        proxy, backend, certs = http_proxy(self)
        directory = temp_dir(self)
        sizes = [1000 + 517 * i for i in range(200)]
        transfers: list[str] = []
        for i, size in enumerate(sizes):
            transfers += [url(proxy, f"/bytes/{size}"), "-o", str(directory / str(i))]
        curl_ok(
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "50",
            "-H",
            "Connection: close",
            *verified(proxy, certs),
            *transfers,
        )
        for i, size in enumerate(sizes):
            self.assertEqual((directory / str(i)).read_bytes(), pattern_bytes(size))
        self.assertEqual(len(backend.peers()), 200)
        self.assertGreater(backend.most_concurrent(), 1)
        self.assertEqual(len(proxy.wait_for_closes(200)), 200)


class StreamEndTests(TestCase):
    """
    The end of a stream on one side reaches the other side in order.
    """

    def test_backend_close_sends_close_notify(self) -> None:
        """
        When the backend closes after its last bytes, the client gets every
        byte and then a TLS close_notify.
        """
        certs = certificates(self)
        backend = start_raw_backend(self, SendThenClose(4 * MIB))
        proxy = start_proxy(self, *connect_to(backend.port), *tls_args(certs))
        with tls_connect(proxy.port) as sock:
            # read_to_end raises SSLEOFError if close_notify is missing.
            count, digest = read_to_end(sock)
        self.assertEqual(count, 4 * MIB)
        self.assertEqual(digest, pattern_sha256(4 * MIB))
        self.assertIn("backend closed", proxy.wait_for_closes(1)[0])

    def test_client_close_reaches_backend_as_fin(self) -> None:
        """
        When the client closes after sending, the backend gets every byte and
        then an end of file.
        """
        certs = certificates(self)
        backend = start_raw_backend(self, Sink())
        proxy = start_proxy(self, *connect_to(backend.port), *tls_args(certs))
        with tls_connect(proxy.port) as sock:
            sock.sendall(pattern_bytes(8 * MIB))
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                sock.unwrap()
        seen = backend.finished_connection(0)
        self.assertTrue(seen.eof)
        self.assertEqual(seen.received, 8 * MIB)
        self.assertEqual(seen.sha256, pattern_sha256(8 * MIB))
        self.assertIn("client closed", proxy.wait_for_closes(1)[0])

    def test_close_line_names_addresses(self) -> None:
        """
        The close line names the client address, the local address the
        backend saw (from bindAddress), the backend address and the byte count.
        """
        certs = certificates(self)
        backend = start_raw_backend(self, SendThenClose(12345))
        proxy = start_proxy(
            self,
            "--connect",
            f"tcp:{HOST}:{backend.port}:bindAddress={HOST}",
            *tls_args(certs),
        )
        with tls_connect(proxy.port) as sock:
            client_port = port_of(sock)
            self.assertEqual(read_to_end(sock)[0], 12345)
        via = backend.finished_connection(0).peer
        line = proxy.wait_for_closes(1)[0]
        self.assertIn(f"from {HOST}:{client_port}", line)
        self.assertIn(f"via {via[0]}:{via[1]}", line)
        self.assertIn(f"to {HOST}:{backend.port}", line)
        self.assertIn("backend closed", line)
        self.assertRegex(line, r"\b12345\b")


class FlowControlTests(TestCase):
    """
    The proxy passes back-pressure on instead of buffering.
    """

    def test_slow_reader_is_not_buffered(self) -> None:
        """
        While a client reads nothing of a 64 MiB response for 2 s the proxy's
        RSS grows by less than 32 MiB, and afterwards every byte arrives.
        """
        proxy, _, certs = http_proxy(self)
        get_hello(proxy, certs)
        before = proxy.rss_bytes()
        peak = before
        with tls_connect(proxy.port) as sock:
            sock.sendall(http_request(f"/bytes/{BIG}"))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                peak = max(peak, proxy.rss_bytes())
                time.sleep(0.05)
            status, headers, start = read_http_head(sock)
            count, digest = read_to_end(sock, start)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], str(BIG))
        self.assertEqual(count, BIG)
        self.assertEqual(digest, pattern_sha256(BIG))
        self.assertLess(peak - before, 32 * MIB)


class StartupErrorTests(TestCase):
    """
    User errors at start-up end the process with one line naming the option.
    """

    def assert_names(self, failure: StartupFailure, *words: str) -> None:
        """
        Check the exit status, the absence of a traceback, and that the last
        line names each of C{words} (the option and the value).
        """
        self.assertNotEqual(failure.exit_code, 0, failure.output)
        self.assertNotIn("Traceback", failure.output)
        for word in words:
            self.assertIn(word, failure.last_line, failure.output)

    def run_with(self, *args: str) -> StartupFailure:
        """
        Run twistd tlsproxy listening on an ephemeral port with C{args}.
        """
        return run_startup_error(self, ["--listen", f"tcp:0:interface={HOST}", *args])

    def test_missing_connect(self) -> None:
        """
        Without --connect the process exits naming --connect.
        """
        failure = self.run_with("--self-signed", "localhost")
        self.assert_names(failure, "--connect")

    def test_missing_cert_file(self) -> None:
        """
        A --cert path that does not exist is named with the option.
        """
        missing = str(temp_dir(self) / "missing.pem")
        failure = self.run_with("--connect", f"tcp:{HOST}:1", "--cert", missing)
        self.assert_names(failure, "--cert", missing)

    def test_cert_directory_without_pem(self) -> None:
        """
        A --cert directory without a .pem file is named with the option.
        """
        directory = str(temp_dir(self))
        failure = self.run_with("--connect", f"tcp:{HOST}:1", "--cert", directory)
        self.assert_names(failure, "--cert", directory, "no readable .pem file")

    def test_key_count(self) -> None:
        """
        Two --cert and one --key: the keys are one per --cert, or none.
        """
        certs = certificates(self)
        cert, key = str(certs.cert), str(certs.key)
        failure = self.run_with(
            "--connect", f"tcp:{HOST}:1", "--cert", cert, "--cert", cert, "--key", key
        )
        self.assert_names(failure, "--key", "one per --cert")

    def test_cert_file_without_permission(self) -> None:
        """
        A --cert file without read permission is named with the option.
        """
        if os.geteuid() == 0:
            raise SkipTest("root reads files whatever their mode")
        certs = certificates(self)
        certs.cert.chmod(0)
        failure = self.run_with("--connect", f"tcp:{HOST}:1", "--cert", str(certs.cert))
        self.assert_names(failure, "--cert", str(certs.cert))

    def test_garbage_cert(self) -> None:
        """
        A --cert file whose PEM block is not a certificate is named with the
        option.
        """
        certs = certificates(self)
        garbage = certs.cert.with_name("garbage-cert.pem")
        garbage.write_text(
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
            "-----END CERTIFICATE-----\n"
        )
        failure = self.run_with(
            "--connect",
            f"tcp:{HOST}:1",
            "--cert",
            str(garbage),
            "--key",
            str(certs.key),
        )
        self.assert_names(failure, "--cert", str(garbage))

    def test_garbage_key(self) -> None:
        """
        A --key file whose PEM block is not a key is named with the option.
        """
        certs = certificates(self)
        garbage = certs.key.with_name("garbage-key.pem")
        garbage.write_text(
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
        )
        failure = self.run_with(
            "--connect",
            f"tcp:{HOST}:1",
            "--cert",
            str(certs.cert),
            "--key",
            str(garbage),
        )
        self.assert_names(failure, "--key", str(garbage))

    def test_key_not_matching_cert(self) -> None:
        """
        A --key that does not belong to the --cert is refused at start-up,
        naming the key or the certificate.
        """
        certs = certificates(self)
        failure = self.run_with(
            "--connect",
            f"tcp:{HOST}:1",
            "--cert",
            str(certs.cert),
            "--key",
            str(certs.other_key),
        )
        self.assertNotEqual(failure.exit_code, 0, failure.output)
        self.assertNotIn("Traceback", failure.output)
        line = failure.last_line
        self.assertTrue(
            ("--key" in line and str(certs.other_key) in line)
            or ("--cert" in line and str(certs.cert) in line),
            failure.output,
        )

    def test_unknown_listen_endpoint(self) -> None:
        """
        An unknown --listen endpoint type is named with the option.
        """
        failure = run_startup_error(
            self,
            [
                "--listen",
                "bogus:1",
                "--connect",
                f"tcp:{HOST}:1",
                "--self-signed",
                "localhost",
            ],
        )
        self.assert_names(failure, "--listen", "bogus:1")

    def test_unknown_connect_endpoint(self) -> None:
        """
        An unknown --connect endpoint type is named with the option.
        """
        failure = self.run_with("--connect", "bogus:1", "--self-signed", "localhost")
        self.assert_names(failure, "--connect", "bogus:1")

    def test_port_in_use(self) -> None:
        """
        A --listen port that is taken ends start-up with a non-zero status and
        one line naming --listen and its value, on stderr or in the log.
        """
        taken = bound_socket()
        self.addCleanup(taken.close)
        taken.listen(1)
        listen = f"tcp:{port_of(taken)}:interface={HOST}"
        failure = run_startup_error(
            self,
            [
                "--listen",
                listen,
                "--connect",
                f"tcp:{HOST}:1",
                "--self-signed",
                "localhost",
            ],
        )
        self.assertNotEqual(failure.exit_code, 0, failure.output)
        self.assertNotIn("Traceback", failure.output)
        candidates = [failure.last_line, *failure.log.splitlines()]
        self.assertTrue(
            any("--listen" in line and listen in line for line in candidates),
            failure.output + failure.log,
        )

    def test_non_numeric_timeout(self) -> None:
        """
        A non-numeric --idle-timeout is named with the option and the value.
        """
        failure = self.run_with(
            "--connect",
            f"tcp:{HOST}:1",
            "--self-signed",
            "localhost",
            "--idle-timeout",
            "abc",
        )
        self.assert_names(failure, "--idle-timeout", "abc")


class RuntimeFaultTests(TestCase):
    """
    A faulty peer ends only its own connection, releasing its descriptors.
    """

    def test_garbage_instead_of_client_hello(self) -> None:
        """
        Plain-text bytes instead of a ClientHello end that connection with a
        TLS error, and the proxy goes on serving.
        """
        proxy, backend, certs = http_proxy(self)
        baseline = fd_baseline(proxy, certs)
        with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n" * 20)
            wait_for_end(sock)
        proxy.wait_for_log(r"closed: TLS error")
        self.assertEqual(len(backend.peers()), 1)
        still_serves(proxy, certs, baseline)

    def test_truncated_client_hello(self) -> None:
        """
        Half a ClientHello followed by a close ends that connection without
        touching the backend, and the proxy goes on serving.
        """
        proxy, backend, certs = http_proxy(self)
        baseline = fd_baseline(proxy, certs)
        hello = client_hello()
        with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
            sock.sendall(hello[: len(hello) // 2])
        proxy.wait_for_closes(2)
        self.assertEqual(len(backend.peers()), 1)
        still_serves(proxy, certs, baseline)

    def test_stalled_handshakes_time_out(self) -> None:
        """
        Connections that send nothing are closed after --handshake-timeout,
        while a normal client is served meanwhile.
        """
        proxy, backend, certs = http_proxy(self, "--handshake-timeout", "1")
        baseline = fd_baseline(proxy, certs)
        started = time.monotonic()
        stalled = [
            socket.create_connection((HOST, proxy.port), timeout=20) for _ in range(5)
        ]
        for sock in stalled:
            self.addCleanup(sock.close)
        get_hello(proxy, certs)
        for sock in stalled:
            wait_for_end(sock)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 10)
        proxy.wait_for_log(r"closed: handshake timeout", 5)
        self.assertEqual(len(backend.peers()), 2)
        still_serves(proxy, certs, baseline)

    def test_absent_backend(self) -> None:
        """
        When the backend refuses the connection the client's connection is
        closed, the log says so, and the proxy serves once the backend is up.
        """
        certs = certificates(self)
        listening = bound_socket()
        self.addCleanup(listening.close)
        proxy = start_proxy(self, *connect_to(port_of(listening)), *tls_args(certs))
        with tls_connect(proxy.port) as sock:
            wait_for_end(sock)
        proxy.wait_for_log(r"closed: backend connect failed")
        baseline = proxy.fd_count()
        with tls_connect(proxy.port) as sock:
            wait_for_end(sock)
        proxy.wait_for_log(r"closed: backend connect failed", 2)
        start_http_backend(self, listening)
        still_serves(proxy, certs, baseline)

    def test_backend_reset_aborts_client(self) -> None:
        """
        When the backend resets mid-stream the client's TLS connection is
        aborted without close_notify and the log says backend error.
        """
        certs = certificates(self)
        backend = start_raw_backend(self, HttpReply(body=HELLO))
        proxy = start_proxy(self, *connect_to(backend.port), *tls_args(certs))
        baseline = fd_baseline(proxy, certs)
        backend.mode = SendThenReset(4 * MIB)
        received = 0
        with tls_connect(proxy.port) as sock, self.assertRaises(ABORTS):
            while chunk := sock.recv(65536):
                received += len(chunk)
        self.assertLessEqual(received, 4 * MIB)
        proxy.wait_for_log(r"closed: backend error")
        backend.mode = HttpReply(body=HELLO)
        still_serves(proxy, certs, baseline)

    def test_client_reset_mid_transfer(self) -> None:
        """
        A client that resets while downloading is logged as a client error and
        the proxy goes on serving.
        """
        proxy, _, certs = http_proxy(self)
        baseline = fd_baseline(proxy, certs)
        with tls_connect(proxy.port) as sock:
            sock.sendall(http_request(f"/bytes/{BIG}"))
            read_http_head(sock)
            got = 0
            while got < MIB:
                got += len(sock.recv(65536))
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        proxy.wait_for_log(r"closed: client error")
        still_serves(proxy, certs, baseline)


class TimeoutTests(TestCase):
    """
    Idle connections are closed; busy ones are not.
    """

    def test_idle_connection_closed(self) -> None:
        """
        A connection quiet after the handshake is closed after --idle-timeout
        and the log says idle timeout.
        """
        proxy, _, _ = http_proxy(self, "--idle-timeout", "1")
        with tls_connect(proxy.port) as sock:
            started = time.monotonic()
            wait_for_end(sock)
            elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 10)
        proxy.wait_for_log(r"closed: idle timeout")

    def test_busy_connection_outlives_idle_timeout(self) -> None:
        """
        A connection with a request every 0.3 s stays open well past
        --idle-timeout.
        """
        proxy, _, _ = http_proxy(self, "--idle-timeout", "1")
        started = time.monotonic()
        with tls_connect(proxy.port) as sock:
            for _ in range(10):
                sock.sendall(http_request("/", connection="keep-alive"))
                status, headers, body = read_http_head(sock)
                while len(body) < int(headers["content-length"]):
                    body += sock.recv(65536)
                self.assertEqual((status, body), (200, HELLO))
                time.sleep(0.3)
        self.assertGreater(time.monotonic() - started, 2.5)
        self.assertNotIn("idle timeout", proxy.wait_for_closes(1)[0])

    def test_connect_timeout(self) -> None:
        """
        A backend that never answers the TCP handshake is abandoned after
        --connect-timeout.
        """
        # A listening socket with a backlog of 0 and one connection queued
        # drops further SYNs on Linux: a black hole on loopback.
        hole = socket.socket()
        self.addCleanup(hole.close)
        hole.bind((HOST, 0))
        hole.listen(0)
        queued = socket.create_connection((HOST, port_of(hole)))
        self.addCleanup(queued.close)
        proxy = start_proxy(
            self,
            "--self-signed",
            "localhost",
            "--connect",
            f"tcp:{HOST}:{port_of(hole)}",
            "--connect-timeout",
            "1",
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with tls_connect(proxy.port, context) as sock:
            started = time.monotonic()
            wait_for_end(sock)
            elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 10)
        proxy.wait_for_log(r"closed: backend connect timeout")


class SessionResumptionTests(TestCase):
    """
    TLS sessions can be resumed.
    """

    def test_tls12_not_resumable(self) -> None:
        """
        A TLS 1.2 session is served but cannot be resumed (OpenSSL would
        report the session's server name, not the one sent): no session ID,
        no ticket.
        """
        proxy, _, _ = http_proxy(self)
        request = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"
        first = run_s_client(proxy.port, "-tls1_2", "-ign_eof", stdin=request)
        self.assertIn(HELLO, first.stdout)
        self.assertIn(b"\n    Session-ID: \n", first.stdout)
        self.assertNotIn(b"TLS session ticket:", first.stdout)

    def test_tls13_resumption(self) -> None:
        """
        A TLS 1.3 session (from a ticket) is resumed.
        """
        proxy, _, _ = http_proxy(self)
        session = temp_dir(self) / "session.pem"
        request = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"
        runs = [
            run_s_client(
                proxy.port, "-tls1_3", "-ign_eof", sess, str(session), stdin=request
            )
            for sess in ("-sess_out", "-sess_in")
        ]
        for run, how in zip(
            runs, [rb"\nNew, TLSv1\.3", rb"\nReused, TLSv1\.3"], strict=True
        ):
            self.assertIn(HELLO, run.stdout)
            self.assertRegex(run.stdout, how)


class ProtocolPolicyTests(TestCase):
    """
    Only TLS 1.2 with ECDHE AEAD suites and TLS 1.3 are accepted.
    """

    def s_client(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """
        Run s_client with C{args} against a proxy with trustme certificates.
        """
        proxy, _, _ = http_proxy(self)
        return run_s_client(proxy.port, *args)

    def assert_refused(self, result: subprocess.CompletedProcess[bytes]) -> None:
        """
        Check that the TLS handshake failed after the TCP connection was made,
        and not because the client itself had nothing to offer.
        """
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn(b"Cipher is (NONE)", result.stdout, result.stderr)
        self.assertNotRegex(result.stderr, rb"no (protocols|ciphers) available")

    def test_tls_min_13(self) -> None:
        """With --tls-min 1.3 a TLS 1.2 client is refused and TLS 1.3 served."""
        proxy, _, _ = http_proxy(self, "--tls-min", "1.3")
        self.assert_refused(run_s_client(proxy.port, "-tls1_2"))
        self.assertIn(b"TLSv1.3", run_s_client(proxy.port, "-tls1_3").stdout)

    def test_alpn_with_curl(self) -> None:
        """
        With --alpn http/1.1, curl (offering h2 and http/1.1) negotiates
        http/1.1, and the record says so.
        """
        proxy, _, certs = http_proxy(self, "--alpn", "http/1.1")
        result = run_curl("-v", *verified(proxy, certs), url(proxy))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(
            result.stderr, rb"ALPN.*accepted.*http/1\.1|server accepted http/1\.1"
        )

    def test_tls11_refused(self) -> None:
        """
        A TLS 1.1 client (one that would accept any cipher) cannot connect.
        """
        self.assert_refused(self.s_client("-tls1_1", "-cipher", "ALL@SECLEVEL=0"))

    def test_ssl3_refused(self) -> None:
        """
        An SSL 3 client cannot connect.
        """
        usage = run_s_client(0, "-help")
        if not re.search(rb"^ -ssl3\b", usage.stdout + usage.stderr, re.MULTILINE):
            raise SkipTest("this openssl has no -ssl3")
        self.assert_refused(self.s_client("-ssl3", "-cipher", "ALL@SECLEVEL=0"))

    def test_tls12_ecdhe_aead(self) -> None:
        """
        A TLS 1.2 client connects with an ECDHE AEAD suite.
        """
        result = self.s_client("-tls1_2")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(
            result.stdout,
            rb"\nNew, TLSv1\.2, Cipher is ECDHE-(ECDSA|RSA)-"
            rb"(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)\n",
        )

    def test_tls13_accepted(self) -> None:
        """
        A TLS 1.3 client connects.
        """
        result = self.s_client("-tls1_3")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, rb"\nNew, TLSv1\.3, Cipher is TLS_")

    def test_cbc_only_client_refused(self) -> None:
        """
        A TLS 1.2 client offering only CBC suites, with or without ECDHE,
        cannot connect.
        """
        proxy, _, _ = http_proxy(self)
        for suites in (
            "AES128-SHA",
            "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA256"
            ":ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES128-SHA256",
        ):
            self.assert_refused(run_s_client(proxy.port, "-tls1_2", "-cipher", suites))


class ClientCertificateTests(TestCase):
    """--client-ca and --allow-cn with a real curl presenting a certificate."""

    def test_client_certificates(self) -> None:
        """
        A client with a certificate from the --client-ca is served; one
        without a certificate, or with a name no --allow-cn lists, is not,
        and the log says why.
        """
        import trustme

        directory = temp_dir(self)
        authority = trustme.CA()
        client = authority.issue_cert("client.example", common_name="client-1")
        (directory / "client-ca.pem").write_bytes(authority.cert_pem.bytes())
        client_pem = directory / "client.pem"
        client_pem.write_bytes(
            client.cert_chain_pems[0].bytes() + client.private_key_pem.bytes()
        )
        certs = certificates(self)
        backend = start_http_backend(self)

        def proxy(*allow: str) -> TwistdProxy:
            return start_proxy(
                self,
                *connect_to(backend.port),
                *tls_args(certs),
                "--client-ca",
                str(directory / "client-ca.pem"),
                *allow,
            )

        served = proxy("--allow-cn", "client-1")
        body = curl_ok(*verified(served, certs), "--cert", str(client_pem), url(served))
        self.assertEqual(body, HELLO)
        self.assertNotEqual(
            run_curl(*verified(served, certs), url(served)).returncode, 0
        )
        served.wait_for_log(r"closed: TLS error")
        refused = proxy("--allow-cn", "someone-else")
        result = run_curl(
            *verified(refused, certs), "--cert", str(client_pem), url(refused)
        )
        self.assertNotEqual(result.returncode, 0)
        refused.wait_for_log(r"closed: client certificate not allowed")
