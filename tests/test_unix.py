"""
UNIX sockets on both sides, through the real twistd: listen on one, relay
to another, and say so in a PROXY v1 header.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from unittest import TestCase

from .harness import make_certificates, temp_dir, wait_until


class UnixBackend:
    """Answers one HTTP request per connection on a UNIX socket; keeps what came."""

    def __init__(self, path: Path) -> None:
        self.received: list[bytes] = []
        self._listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listening.bind(str(path))
        self._listening.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listening.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            self.received.append(data)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")

    def stop(self) -> None:
        self._listening.close()
        self._thread.join(20)


class UnixTests(TestCase):
    """--listen unix:PATH and --connect unix:PATH."""

    def start(self) -> tuple[Path, Path, Path, Path]:
        """
        Run twistd tlsproxy from a UNIX socket to a L{UnixBackend}; its
        sockets' directory, listening socket, log and connection log.
        """
        directory = temp_dir(self)
        self.certificates = make_certificates(directory)
        # Socket paths are short (108 bytes): not under the checkout.
        sockets = Path(tempfile.mkdtemp(prefix="tlsproxy-"))
        self.addCleanup(shutil.rmtree, sockets, ignore_errors=True)
        self.backend = UnixBackend(sockets / "backend.sock")
        self.addCleanup(self.backend.stop)
        listen = sockets / "tls.sock"
        log = directory / "twistd.log"
        connections = directory / "connections.log"
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("twistd")),
                "-n",
                "--logfile",
                str(log),
                "--pidfile",
                "",
                "tlsproxy",
                "--listen",
                f"unix:{listen}",
                "--connect",
                f"unix:{sockets / 'backend.sock'}",
                "--cert",
                str(self.certificates.cert),
                "--key",
                str(self.certificates.key),
                "--proxy-protocol",
                "v1",
                "--connection-log",
                str(connections),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)

        self.addCleanup(stop)
        wait_until(listen.exists, "the proxy to listen")
        return sockets, listen, log, connections

    def request(self, listen: Path, bound: Path | None = None) -> bytes:
        """One HTTP request over TLS on C{listen}, from C{bound} if given."""
        context = ssl.create_default_context(cafile=str(self.certificates.ca))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(20)
            if bound is not None:
                raw.bind(str(bound))
            raw.connect(str(listen))
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := tls.recv(4096):
                    reply += chunk
        return reply

    def test_unix_both_sides(self) -> None:
        """
        A TLS client on a UNIX socket reaches a backend on another; the
        backend gets PROXY UNKNOWN (no IP address to give), and the record
        names the paths.
        """
        sockets, listen, log, connections = self.start()
        reply = self.request(listen)
        self.assertTrue(reply.endswith(b"\r\n\r\nhello\n"), reply)
        self.assertEqual(
            self.backend.received, [b"PROXY UNKNOWN\r\nGET / HTTP/1.0\r\n\r\n"]
        )
        wait_until(lambda: "closed:" in log.read_text(), "the close line")
        opened = json.loads(connections.read_text().splitlines()[0])
        self.assertEqual(opened["listen_host"], str(listen))
        self.assertIsNone(opened["listen_port"])
        self.assertEqual(opened["backend_host"], str(sockets / "backend.sock"))
        self.assertIsNone(opened["backend_port"])
        self.assertNotIn("Traceback", log.read_text())
        self.assertTrue(
            re.search(r" closed: (client|backend) closed;", log.read_text())
        )

    def test_client_path_escaped(self) -> None:
        """
        A local client whose socket's path holds a line break, a forged
        line and a terminal escape gets one close line, with them escaped;
        the connection log has the path as it is; the backend, UNKNOWN.
        """
        sockets, listen, log, connections = self.start()
        bound = sockets / "c\nFORGED line\x1b[0m"
        self.assertTrue(self.request(listen, bound).endswith(b"hello\n"))
        wait_until(lambda: "closed:" in log.read_text(), "the close line")
        text = log.read_text()
        self.assertNotIn("\x1b", text)
        self.assertFalse([x for x in text.splitlines() if x.startswith("FORGED")])
        self.assertIn(f"from {sockets}/c\\nFORGED line\\x1b[0m via ", text)
        opened = json.loads(connections.read_text().splitlines()[0])
        self.assertEqual(opened["client_host"], str(bound))
        self.assertEqual(
            self.backend.received, [b"PROXY UNKNOWN\r\nGET / HTTP/1.0\r\n\r\n"]
        )
