"""
The JSON connection log: unit tests on files, and one through the real
twistd with curl.
"""

from __future__ import annotations

import json
import os
import stat
import unittest
from pathlib import Path

import attrs
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import tap
from tlsproxy.record import ConnectionLog, ConnectionRecord

from .harness import (
    HttpBackend,
    TwistdProxy,
    curl_ok,
    make_certificates,
    start_http_backend,
    start_proxy,
    temp_dir,
    wait_until,
)


def start_up_error(path: str) -> str:
    """The start-up error for a command line logging connections to path."""
    try:
        tap.Options().parseOptions(
            ["--connect", "tcp:h:1", "--self-signed", "x", "--connection-log", path]
        )
    except usage.UsageError as e:
        return str(e)
    raise AssertionError("no start-up error")


FIELDS = [
    "event",
    "id",
    "service",
    "client_host",
    "client_port",
    "listen_host",
    "listen_port",
    "balancer_host",
    "balancer_port",
    "backend_local_host",
    "backend_local_port",
    "backend_host",
    "backend_port",
    "opened",
    "closed",
    "duration",
    "handshake_time",
    "connect_time",
    "bytes_from_client",
    "bytes_to_client",
    "tls_version",
    "cipher",
    "sni",
    "alpn",
    "client_cert",
    "client_cn",
    "reason",
]

RECORD = ConnectionRecord(
    event="open",
    id="0123abcd",
    service="tlsproxy",
    client_host="192.0.2.7",
    client_port=50123,
    listen_host="127.0.0.1",
    listen_port=443,
    backend_local_host="10.0.0.3",
    backend_local_port=40001,
    backend_host="10.0.0.2",
    backend_port=80,
    opened=1764000000.25,
    tls_version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    sni="www.example.com",
)


class ConnectionLogTests(SynchronousTestCase):
    """One JSON object per line, appended, whole, at once."""

    def setUp(self) -> None:
        self.path = self.mktemp()

    def open(self) -> ConnectionLog:
        log = ConnectionLog.open(self.path)
        self.addCleanup(log.close)
        return log

    def lines(self) -> list[str]:
        with open(self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_fields(self) -> None:
        """
        A record is one line of JSON with every field of the interface, in
        order, null where it does not apply, written at once.
        """
        self.open()(RECORD)
        [line] = self.lines()
        fields = json.loads(line)
        self.assertEqual(list(fields), FIELDS)
        self.assertEqual(fields["backend_local_port"], 40001)
        self.assertIsNone(fields["closed"])
        self.assertIsNone(fields["client_cert"])
        self.assertNotIn(" ", line)

    def test_appends(self) -> None:
        """An existing log is appended to, never overwritten."""
        with open(self.path, "w") as f:
            f.write("earlier\n")
        log = self.open()
        log(RECORD)
        log(attrs.evolve(RECORD, event="close", reason="client closed"))
        lines = self.lines()
        self.assertEqual(lines[0], "earlier")
        self.assertEqual([json.loads(x)["event"] for x in lines[1:]], ["open", "close"])

    def test_mode(self) -> None:
        """A new log is readable by its owner and group only."""
        os.umask(old := os.umask(0))
        self.open()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640 & ~old)

    def test_copytruncate(self) -> None:
        """
        After logrotate's copytruncate, the next record starts the file: no
        hole of zero bytes before it.
        """
        log = self.open()
        log(RECORD)
        os.truncate(self.path, 0)
        log(RECORD)
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"{"))
        self.assertEqual(data.count(b"\n"), 1)

    def test_open_error(self) -> None:
        """A log that cannot be opened is a one-line start-up error."""
        path = os.path.join(self.path, "missing", "conn.log")
        self.assertEqual(
            start_up_error(path), f"--connection-log {path}: No such file or directory"
        )

    def test_not_through_a_link(self) -> None:
        """
        A symbolic link at the log's path is refused, and what it points at
        is left alone: root's start-up writes no file a link chose.
        """
        target = self.mktemp()
        with open(target, "w") as f:
            f.write("precious\n")
        os.symlink(target, self.path)
        self.assertEqual(
            start_up_error(self.path), f"--connection-log {self.path}: a symbolic link"
        )
        with open(target) as f:
            self.assertEqual(f.read(), "precious\n")

    def test_write_error(self) -> None:
        """A record that cannot be written is reported in twistd's log, not raised."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log = ConnectionLog("/dev/full", os.open("/dev/full", os.O_WRONLY))
        self.addCleanup(log.close)
        log(RECORD)
        [event] = [e for e in events if e.get("path") == "/dev/full"]
        self.assertEqual(event["id"], "0123abcd")
        self.assertEqual(event["error"], "No space left on device")


class OptionTests(SynchronousTestCase):
    """--connection-log on the command line."""

    def test_option(self) -> None:
        """--connection-log adds the log after twistd's line observer."""
        path = self.mktemp()
        options = tap.Options()
        options.parseOptions(
            ["--connect", "tcp:h:1", "--self-signed", "x", "--connection-log", path]
        )
        self.assertEqual(len(options.observers), 2)
        options.observers[1](RECORD)
        options.observers[1].close()  # type: ignore[attr-defined]
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["id"], "0123abcd")

    def test_quiet(self) -> None:
        """--quiet leaves out twistd's line, not the connection log."""
        path = self.mktemp()
        options = tap.Options()
        options.parseOptions(
            ["--connect", "tcp:h:1", "--self-signed", "x", "--connection-log", path,
             "--quiet"]
        )  # fmt: skip
        [observer] = options.observers
        self.assertIsInstance(observer, ConnectionLog)
        observer.close()  # type: ignore[attr-defined]

    def test_nothing_created_on_error(self) -> None:
        """A command line that fails creates no log file."""
        path = self.mktemp()
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(
                ["--connect", "bogus:1", "--self-signed", "x", "--connection-log", path]
            )
        self.assertFalse(os.path.exists(path))


class TwistdTests(unittest.TestCase):
    """The real twistd writes the log; twistd's own log does not get it."""

    def curl_through(self, *extra: str) -> tuple[TwistdProxy, HttpBackend, Path]:
        """
        Run twistd with a connection log (and C{extra} options) in front of
        an HTTP backend, and make one curl request through it; the proxy,
        the backend and the connection log's path.
        """
        directory = temp_dir(self)
        certificates = make_certificates(directory)
        backend = start_http_backend(self)
        path = directory / "connections.log"
        proxy = start_proxy(
            self,
            "--connect",
            f"tcp:127.0.0.1:{backend.port}",
            "--cert",
            str(certificates.cert),
            "--key",
            str(certificates.key),
            "--connection-log",
            str(path),
            *extra,
        )
        curl_ok("--cacert", str(certificates.ca), f"https://localhost:{proxy.port}/")
        return proxy, backend, path

    def test_records_through_twistd(self) -> None:
        """
        A curl request gives an open and a close record whose
        backend_local_port is the port the backend saw, and twistd's log
        keeps its one text line.
        """
        proxy, backend, path = self.curl_through()
        proxy.wait_for_closes(1)
        opened, closed = (json.loads(line) for line in path.read_text().splitlines())
        self.assertEqual((opened["event"], closed["event"]), ("open", "close"))
        self.assertEqual(opened["id"], closed["id"])
        [(host, port)] = backend.peers()
        self.assertEqual(
            (closed["backend_local_host"], closed["backend_local_port"]), (host, port)
        )
        self.assertIn(closed["reason"], ("client closed", "backend closed"))
        self.assertEqual(closed["sni"], "localhost")
        self.assertEqual(closed["tls_version"], "TLSv1.3")
        self.assertGreater(closed["bytes_to_client"], 0)
        self.assertLessEqual(closed["opened"], closed["closed"])
        self.assertNotIn('"event"', proxy.log_text())
        self.assertIn(f"{closed['id']} from ", proxy.log_text())

    def test_quiet_through_twistd(self) -> None:
        """
        With --quiet, a connection's close record reaches the connection log
        and no line reaches twistd's log (which, without --quiet, gets its
        line before the connection log gets the record).
        """
        proxy, _, path = self.curl_through("--quiet")
        wait_until(lambda: path.read_text().count("\n") == 2, "the close record")
        closed = json.loads(path.read_text().splitlines()[1])
        self.assertEqual(closed["event"], "close")
        self.assertEqual(proxy.close_lines(), [])
        self.assertNotIn(closed["id"], proxy.log_text())
