"""
Integration tests of TLS toward the backend and of client mode: the real
C{twistd -n tlsproxy} between curl and a TLS backend on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
from pathlib import Path
from unittest import SkipTest, TestCase, mock

import attrs
import trustme

from tests.harness import (
    HOST,
    TIMEOUT,
    TwistdProxy,
    bound_socket,
    curl_ok,
    make_certificates,
    port_of,
    run_curl,
    run_startup_error,
    start_proxy,
    temp_dir,
    wait_until,
)
from tests.test_jail import _NO_JAIL, JailedProxy, make_jail

BODY = b"hello over TLS\n"


@attrs.define
class Visit:
    """What a L{TLSBackend} saw of one connection."""

    peer: tuple[str, int]
    preamble: bytes = b""  # a PROXY header, in clear
    first_tls_byte: bytes = b""
    request: bytes = b""
    error: str | None = None


class TLSBackend:
    """
    An HTTP backend behind TLS (a trustme certificate) on 127.0.0.1, in a
    thread: for each connection it reads a PROXY v1 header in clear if
    C{proxy_header}, then does the handshake, reads a request head, answers
    L{BODY} and closes with close_notify.
    """

    def __init__(self, case: TestCase, leaf: trustme.LeafCert, proxy_header: bool):
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(self._context)
        self._proxy_header = proxy_header
        self.visits: list[Visit] = []
        self._socket = bound_socket()
        self._socket.listen(8)
        self._socket.settimeout(0.1)
        self.port = port_of(self._socket)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tls-backend")
        self._thread.start()
        case.addCleanup(self._close)

    def seen(self) -> list[Visit]:
        """The visits, once there is one."""
        wait_until(lambda: bool(self.visits), "a visit to the TLS backend")
        return self.visits

    def _close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._socket.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            visit = Visit(peer=peer)
            try:
                self._visit(conn, visit)
            except (OSError, ssl.SSLError) as e:
                visit.error = str(e)
            finally:
                conn.close()
                self.visits.append(visit)

    def _visit(self, conn: socket.socket, visit: Visit) -> None:
        while self._proxy_header and not visit.preamble.endswith(b"\r\n"):
            visit.preamble += conn.recv(1)
        visit.first_tls_byte = conn.recv(1, socket.MSG_PEEK)
        with self._context.wrap_socket(conn, server_side=True) as tls:
            while b"\r\n\r\n" not in visit.request:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                visit.request += chunk
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
            )
            tls.unwrap()


class Setup:
    """A CA, a backend leaf from it, and its PEM file; another CA's file."""

    def __init__(self, case: TestCase, *names: str) -> None:
        self.directory = temp_dir(case)
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert(*(names or ("localhost", "127.0.0.1")))
        self.ca_file = self.directory / "backend-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.other_ca_file = self.directory / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(self.other_ca_file))
        self.log = self.directory / "connections.log"


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TLSBackendTests(TestCase):
    """--connect tls:HOST:PORT verifies the backend's certificate and name."""

    def proxy(
        self, setup: Setup, connect: str, *extra: str, proxy_header: bool = False
    ) -> tuple[TwistdProxy, TLSBackend, list[str]]:
        """A TLS backend and a proxy (server mode) before it; curl's options."""
        backend = TLSBackend(self, setup.leaf, proxy_header)
        certs = make_certificates(setup.directory)
        proxy = start_proxy(
            self,
            "--cert", str(certs.cert), "--key", str(certs.key),
            "--connect", f"tls:{connect}:{backend.port}",
            "--connection-log", str(setup.log),
            *extra,
        )  # fmt: skip
        curl = [
            "--cacert",
            str(certs.ca),
            "--resolve",
            f"localhost:{proxy.port}:{HOST}",
        ]
        return proxy, backend, [*curl, f"https://localhost:{proxy.port}/"]

    def test_verified_backend(self) -> None:
        """
        A backend with a certificate for its name from --backend-ca is
        served, both ways; the record's backend_local_port is the port the
        backend saw.
        """
        setup = Setup(self)
        proxy, backend, curl = self.proxy(
            setup, "localhost", "--backend-ca", str(setup.ca_file)
        )
        self.assertEqual(curl_ok(*curl), BODY)
        proxy.wait_for_closes(1)
        [visit] = backend.seen()
        self.assertTrue(visit.request.startswith(b"GET / HTTP/1.1\r\n"))
        opened = records(setup.log)[0]
        self.assertEqual(
            (opened["backend_local_host"], opened["backend_local_port"]), visit.peer
        )
        self.assertEqual(opened["backend_port"], backend.port)

    def test_wrong_ca(self) -> None:
        """A backend certificate from another CA closes the connection."""
        setup = Setup(self)
        proxy, _, curl = self.proxy(
            setup, "localhost", "--backend-ca", str(setup.other_ca_file)
        )
        self.assertNotEqual(run_curl(*curl).returncode, 0)
        [line] = proxy.wait_for_closes(1)
        self.assertIn("closed: backend TLS error: certificate verify failed", line)
        self.assertEqual(records(setup.log)[-1]["event"], "close")

    def test_wrong_name(self) -> None:
        """A backend certificate for another name closes the connection."""
        setup = Setup(self, "other.example")
        proxy, _, curl = self.proxy(setup, HOST, "--backend-ca", str(setup.ca_file))
        self.assertNotEqual(run_curl(*curl).returncode, 0)
        [line] = proxy.wait_for_closes(1)
        self.assertIn(f"closed: backend TLS error: certificate is not for {HOST}", line)

    def test_proxy_header_before_tls(self) -> None:
        """The PROXY v1 header arrives in clear, before the ClientHello."""
        setup = Setup(self)
        proxy, backend, curl = self.proxy(
            setup,
            HOST,
            "--backend-ca", str(setup.ca_file),
            "--proxy-protocol", "v1",
            proxy_header=True,
        )  # fmt: skip
        self.assertEqual(curl_ok(*curl), BODY)
        [visit] = backend.seen()
        self.assertRegex(
            visit.preamble.decode(),
            rf"\APROXY TCP4 {HOST} {HOST} \d+ {proxy.port}\r\n\Z",
        )
        self.assertEqual(visit.first_tls_byte, b"\x16")  # a TLS handshake record


class ClientModeTests(TestCase):
    """--client: plain TCP in, verified TLS to the backend."""

    def test_curl_http(self) -> None:
        """curl http:// through the proxy reaches the TLS backend."""
        setup = Setup(self)
        backend = TLSBackend(self, setup.leaf, proxy_header=False)
        proxy = start_proxy(
            self,
            "--client",
            "--connect", f"tls:localhost:{backend.port}",
            "--backend-ca", str(setup.ca_file),
            "--connection-log", str(setup.log),
        )  # fmt: skip
        self.assertEqual(curl_ok(f"http://{HOST}:{proxy.port}/"), BODY)
        [line] = proxy.wait_for_closes(1)
        # (Whichever closes first: curl, once it has the whole response.)
        self.assertRegex(line, "closed: (client|backend) closed")
        opened = records(setup.log)[0]
        self.assertIsNone(opened["tls_version"])
        self.assertEqual(opened["backend_local_port"], backend.seen()[0].peer[1])


class JailTests(TestCase):
    """TLS toward the backend from inside twistd's jail."""

    def test_platform_trust_in_jail(self) -> None:
        """
        The platform's CAs (here SSL_CERT_FILE's) are read before the
        chroot: in the jail, a --client proxy verifies a backend with them.
        """
        if _NO_JAIL is not None:
            raise SkipTest(_NO_JAIL)
        setup = Setup(self)
        backend = TLSBackend(self, setup.leaf, proxy_header=False)
        args = ["--client", "--listen", f"tcp:0:interface={HOST}"]
        args += ["--connect", f"tls:{HOST}:{backend.port}"]
        with mock.patch.dict(os.environ, {"SSL_CERT_FILE": str(setup.ca_file)}):
            proxy = JailedProxy(temp_dir(self), make_jail(self), args, daemon=False)
        self.addCleanup(proxy.stop)
        self.assertEqual(curl_ok(f"http://{HOST}:{proxy.port}/"), BODY)
        self.assertRegex(proxy.wait_for_closes(1)[0], "closed: (client|backend) closed")


class StartupErrorTests(TestCase):
    """Start-up mistakes with the new options: one line, exit status 1."""

    def assert_line(self, line: str, *args: str) -> None:
        failure = run_startup_error(
            self, ["--listen", f"tcp:0:interface={HOST}", *args]
        )
        self.assertNotEqual(failure.exit_code, 0)
        self.assertNotIn("Traceback", failure.output)
        self.assertTrue(failure.last_line.endswith(f": {line}"), failure.output)

    def test_missing_backend_ca(self) -> None:
        """A missing --backend-ca is named, with the reason."""
        missing = str(temp_dir(self) / "missing.pem")
        self.assert_line(
            f"--backend-ca {missing}: No such file or directory",
            "--client", "--connect", f"tls:{HOST}:1", "--backend-ca", missing,
        )  # fmt: skip

    def test_client_with_cert(self) -> None:
        """--client with a client-side TLS option is named."""
        self.assert_line(
            "--client: not with --self-signed",
            "--client", "--connect", f"tls:{HOST}:1", "--self-signed", "x",
        )  # fmt: skip
