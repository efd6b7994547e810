"""
Unit tests for tlsproxy-logjoin: reading the connection log, matching
access-log lines to connections, rewriting lines, and the command line
(in-process, and as C{python -m tlsproxy.logjoin}).
"""

from __future__ import annotations

import calendar
import io
import json
import os
import random
import runpy
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.logformat import compile_format
from tlsproxy.logjoin import (
    DEFAULT_FORMAT,
    ConnectionIndex,
    join_line,
    main,
    read_index,
)
from tlsproxy.record import ConnectionLog, ConnectionRecord

# 2025-11-27 09:00:00 UTC, 10:00:00 in +0100.
NINE_UTC = calendar.timegm((2025, 11, 27, 9, 0, 0))
HOUR = 3600


def record(
    event: str, key: str, port: int | None, opened: float, **fields: object
) -> bytes:
    """One connection-log line, with every field tlsproxy writes."""
    values: dict[str, object] = dict(
        event=event,
        id=key,
        service="tlsproxy",
        client_host="192.0.2.7",
        client_port=50123,
        listen_host="192.0.2.1",
        listen_port=443,
        backend_local_host=None if port is None else "127.0.0.1",
        backend_local_port=port,
        backend_host="127.0.0.1",
        backend_port=8080,
        opened=opened,
        closed=None,
        duration=None,
        bytes_from_client=0,
        bytes_to_client=0,
        tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        sni=None,
        alpn=None,
        client_cert=None,
        reason=None,
    )
    values.update(fields)
    return json.dumps(values).encode() + b"\n"


def connection(
    key: str, port: int, opened: float, closed: float, **fields: object
) -> list[bytes]:
    """The open and close records of one connection."""
    return [
        record("open", key, port, opened, **fields),
        record("close", key, port, opened, closed=closed, **fields),
    ]


def index_of(*records: list[bytes]) -> ConnectionIndex:
    """The index of the connections whose records are given."""
    index, _, skipped = read_index([line for lines in records for line in lines])
    assert skipped == 0
    return index


def access(
    when: str = "27/Nov/2025:10:00:00 +0100", port: int = 40001, host: str = "127.0.0.1"
) -> bytes:
    """One access-log line in the default format."""
    return (
        f'{host} - - [{when}] "GET / HTTP/1.1" 200 512 "-" "curl/8.5.0" {port}\n'
    ).encode()


class ReadIndexTests(SynchronousTestCase):
    """The connection log becomes an index of intervals by port."""

    def test_intervals(self) -> None:
        """An open and a close record make one closed interval, found inside it."""
        index, records, skipped = read_index(
            connection("a", 40001, 100.0, 200.0, client_host="192.0.2.7")
        )
        self.assertEqual((records, skipped), (2, 0))
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 150.0), b"192.0.2.7")
        self.assertIsNone(index.find(b"40001", b"127.0.0.1", 250.0))
        self.assertIsNone(index.find(b"40002", b"127.0.0.1", 150.0))

    def test_deeply_nested_line(self) -> None:
        """A line nested too deeply for the JSON parser is skipped, not fatal."""
        _, records, skipped = read_index([b"[" * 100000])
        self.assertEqual((records, skipped), (0, 1))

    def test_connection_log(self) -> None:
        """The records tlsproxy's connection log writes are read."""
        path = self.mktemp()
        log = ConnectionLog.open(path)
        fields = dict(
            id="6f1c",
            service="tlsproxy",
            client_host="192.0.2.7",
            backend_local_host="10.0.0.3",
            backend_local_port=40001,
            opened=100.0,
        )
        log(ConnectionRecord(event="open", **fields))
        log(ConnectionRecord(event="close", closed=200.0, **fields))
        log(ConnectionRecord(event="close", id="7", service="tlsproxy", opened=1.0))
        log.close()
        with open(path, "rb") as lines:
            index, records, skipped = read_index(lines)
        self.assertEqual((records, skipped), (3, 0))
        self.assertEqual(index.find(b"40001", b"10.0.0.3", 200.5), b"192.0.2.7")
        self.assertIsNone(index.find(b"40001", b"10.0.0.3", 201.5))

    def test_still_open(self) -> None:
        """A connection with no close record is open until the end of time."""
        index = index_of([record("open", "a", 40001, 100.0)])
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 1e12), b"192.0.2.7")
        self.assertIsNone(index.find(b"40001", b"127.0.0.1", 98.0))

    def test_close_only(self) -> None:
        """A close record alone (its open one rotated away) is a connection."""
        index = index_of([record("close", "a", 40001, 100.0, closed=200.0)])
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 150.0), b"192.0.2.7")

    def test_no_backend(self) -> None:
        """A connection that never reached the backend is a record, not indexed."""
        index, records, skipped = read_index(
            [record("close", "a", None, 100.0, closed=101.0)]
        )
        self.assertEqual((records, skipped), (1, 0))
        self.assertIsNone(index.find(b"-", b"127.0.0.1", None))

    def test_skipped(self) -> None:
        """Lines that are not records are skipped and counted; the rest is read."""
        lines = [
            b"not json\n",
            b"\n",
            b"[1, 2]\n",
            b'"open"\n',
            b"\xff\xfe\n",
            record("open", "b", 40001, 100.0)[:-20],
            json.dumps({"event": "open", "id": "c"}).encode(),
            record("flush", "d", 40001, 100.0),
            record("open", "e", 40001, "soon"),
            record("open", "f", "40001", 100.0),
            record("open", "g", 40001, 100.0, client_host=7),
            *connection("a", 40001, 100.0, 200.0),
        ]
        index, records, skipped = read_index(lines)
        self.assertEqual((records, skipped), (2, 11))
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 150.0), b"192.0.2.7")

    def test_unknown_client(self) -> None:
        """A connection without a client address gives C{-}."""
        index = index_of(connection("a", 40001, 100.0, 200.0, client_host=None))
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 150.0), b"-")

    def test_mapped(self) -> None:
        """An IPv4-mapped backend-local address is compared as IPv4."""
        index = index_of(
            connection("a", 40001, 100.0, 200.0, backend_local_host="::ffff:10.0.0.3")
        )
        self.assertEqual(index.find(b"40001", b"10.0.0.3", 150.0), b"192.0.2.7")


class MatchTests(SynchronousTestCase):
    """An access-log line matches the connection its port came from at its time."""

    def test_port_reused(self) -> None:
        """
        One port used by three connections over a day: each request goes to
        the connection open at its time, and a request between them to none.
        """
        index = index_of(
            connection(
                "a",
                40001,
                NINE_UTC - 4 * HOUR,
                NINE_UTC - 4 * HOUR + 30,
                client_host="198.51.100.1",
            ),
            connection(
                "c",
                40001,
                NINE_UTC + 10 * HOUR,
                NINE_UTC + 10 * HOUR + 5,
                client_host="198.51.100.3",
            ),
            connection(
                "b", 40001, NINE_UTC - 5, NINE_UTC + 5, client_host="198.51.100.2"
            ),
        )
        found = [
            index.find(b"40001", b"127.0.0.1", when)
            for when in [
                NINE_UTC - 4 * HOUR + 10,
                NINE_UTC,
                NINE_UTC + 10 * HOUR + 4,
                NINE_UTC + HOUR,
                NINE_UTC - 5 * HOUR,
            ]
        ]
        self.assertEqual(
            found, [b"198.51.100.1", b"198.51.100.2", b"198.51.100.3", None, None]
        )

    def test_one_second(self) -> None:
        """A connection matches from a second before it opens to a second after."""
        index = index_of(connection("a", 40001, 100.5, 200.5))
        for when, client in [
            (99.4, None),
            (99.5, b"192.0.2.7"),
            (201.5, b"192.0.2.7"),
            (201.6, None),
        ]:
            self.assertEqual(index.find(b"40001", b"127.0.0.1", when), client, when)

    def test_opened_last(self) -> None:
        """Of two connections that both contain the time, the one opened last wins."""
        index = index_of(
            connection("a", 40001, 100.0, 105.2, client_host="198.51.100.1"),
            connection("b", 40001, 105.6, 300.0, client_host="198.51.100.2"),
        )
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 105.0), b"198.51.100.2")
        self.assertEqual(index.find(b"40001", b"127.0.0.1", 104.0), b"198.51.100.1")

    def test_long_lived(self) -> None:
        """A long connection still matches after shorter ones opened later closed."""
        index = index_of(
            connection(
                "a",
                40001,
                100.0,
                1000.0,
                client_host="198.51.100.1",
                backend_local_host="10.0.0.3",
            ),
            connection("b", 40001, 200.0, 210.0, client_host="198.51.100.2"),
        )
        self.assertEqual(index.find(b"40001", b"10.0.0.3", 500.0), b"198.51.100.1")

    def test_host(self) -> None:
        """
        Two proxy addresses using one port at once: the line's address picks
        the connection, and an address that is neither matches nothing.
        """
        index = index_of(
            connection(
                "a",
                40001,
                100.0,
                200.0,
                client_host="198.51.100.1",
                backend_local_host="10.0.0.3",
            ),
            connection(
                "b",
                40001,
                100.0,
                200.0,
                client_host="198.51.100.2",
                backend_local_host="10.0.0.4",
            ),
        )
        self.assertEqual(index.find(b"40001", b"10.0.0.3", 150.0), b"198.51.100.1")
        self.assertEqual(index.find(b"40001", b"10.0.0.4", 150.0), b"198.51.100.2")
        self.assertIsNone(index.find(b"40001", b"10.0.0.5", 150.0))

    def test_host_unknown(self) -> None:
        """A connection whose local address is not recorded matches any address."""
        index = index_of(connection("a", 40001, 100.0, 200.0, backend_local_host=None))
        self.assertEqual(index.find(b"40001", b"10.0.0.9", 150.0), b"192.0.2.7")

    def test_no_time(self) -> None:
        """
        Without a time, a line matches only the one connection that ever
        used its port (from its address).
        """
        index = index_of(
            connection("a", 40001, 100.0, 200.0),
            connection("b", 40002, 100.0, 200.0, client_host="198.51.100.1"),
            connection("c", 40002, 300.0, 400.0, client_host="198.51.100.2"),
            connection(
                "d",
                40003,
                100.0,
                200.0,
                client_host="198.51.100.3",
                backend_local_host="10.0.0.3",
            ),
            connection(
                "e",
                40003,
                100.0,
                200.0,
                client_host="198.51.100.4",
                backend_local_host="10.0.0.4",
            ),
        )
        self.assertEqual(index.find(b"40001", b"127.0.0.1", None), b"192.0.2.7")
        self.assertIsNone(index.find(b"40002", b"127.0.0.1", None))
        self.assertEqual(index.find(b"40003", b"10.0.0.4", None), b"198.51.100.4")
        self.assertIsNone(index.find(b"40004", b"127.0.0.1", None))


class JoinLineTests(SynchronousTestCase):
    """Each access-log line comes out once: rewritten if matched, else unchanged."""

    def setUp(self) -> None:
        self.index = index_of(
            connection("a", 40001, NINE_UTC - 1, NINE_UTC + 1, client_host="192.0.2.7"),
            connection(
                "b", 40002, NINE_UTC - 1, NINE_UTC + 1, client_host="2001:db8::7"
            ),
        )
        self.format = compile_format(DEFAULT_FORMAT)

    def join(self, line: bytes, log_format: str = DEFAULT_FORMAT) -> tuple[bytes, str]:
        return join_line(line, compile_format(log_format), self.index)

    def test_last_line_bare_cr(self) -> None:
        """A last line ending in a bare CR gets a newline: one line out."""
        self.assertEqual(self.join(b"x\r"), (b"x\r\n", "unparsable"))
        self.assertEqual(self.join(b"x\r\n"), (b"x\r\n", "unparsable"))
        self.assertEqual(self.join(b"x"), (b"x\n", "unparsable"))

    def test_matched(self) -> None:
        """A matched line is Combined: the client's address, no port."""
        self.assertEqual(
            self.join(access()),
            (
                b'192.0.2.7 - - [27/Nov/2025:10:00:00 +0100] "GET / HTTP/1.1" 200 512'
                b' "-" "curl/8.5.0"\n',
                "matched",
            ),
        )

    def test_zones(self) -> None:
        """The same instant in -0500 and +0000 matches the same connection."""
        for when in ["27/Nov/2025:04:00:00 -0500", "27/Nov/2025:09:00:01 +0000"]:
            self.assertEqual(self.join(access(when, 40002))[0][:12], b"2001:db8::7 ")
        self.assertEqual(
            self.join(access("27/Nov/2025:10:00:00 -0500"))[1], "unmatched"
        )

    def test_unmatched(self) -> None:
        """A line with an unknown port, time or address is unchanged."""
        for line in [
            access(port=40003),
            access("27/Nov/2025:11:00:00 +0100"),
            access(host="198.51.100.1"),
        ]:
            self.assertEqual(self.join(line), (line, "unmatched"))

    def test_not_an_address(self) -> None:
        """
        A record whose client address is not an IP address (a newline and a
        forged line in it, say) changes no line: one line in, one line out.
        """
        forged = '192.0.2.9 - - [x] "GET /forged" 200 1\n192.0.2.9'
        for host in [forged, "localhost", "fe80::1%eth0\nx", "", "192.0.2.7 "]:
            self.index = index_of(
                connection("a", 40001, NINE_UTC - 1, NINE_UTC + 1, client_host=host)
            )
            self.assertEqual(self.join(access()), (access(), "not an address"))

    def test_unparsable(self) -> None:
        """A line that the format does not describe is unchanged."""
        for line in [b"\n", b"garbage\n", access().replace(b"GET", b'G"ET')]:
            self.assertEqual(self.join(line), (line, "unparsable"))

    def test_bytes(self) -> None:
        """Bytes that are not UTF-8 come out as they went in."""
        line = access().replace(b"curl/8.5.0", b"caf\xe9\xff")
        self.assertEqual(
            self.join(line)[0],
            access()
            .replace(b"curl/8.5.0", b"caf\xe9\xff")
            .replace(b"127.0.0.1", b"192.0.2.7")
            .replace(b" 40001", b""),
        )
        self.assertEqual(self.join(b"\xff\xfe\n"), (b"\xff\xfe\n", "unparsable"))

    def test_endings(self) -> None:
        """A line keeps its CRLF ending; a last line without one gets C{\\n}."""
        self.assertEqual(self.join(access()[:-1] + b"\r\n")[0][-4:], b'0"\r\n')
        self.assertEqual(self.join(access()[:-1])[0][-3:], b'0"\n')
        self.assertEqual(self.join(b"garbage"), (b"garbage\n", "unparsable"))

    def test_port_first(self) -> None:
        """A port at the start of the line goes with the space after it."""
        self.assertEqual(
            self.join(
                b"40001 127.0.0.1 [27/Nov/2025:10:00:00 +0100]\n", "%{remote}p %h %t"
            )[0],
            b"192.0.2.7 [27/Nov/2025:10:00:00 +0100]\n",
        )

    def test_port_after_colon(self) -> None:
        """A port after a colon goes with the colon."""
        self.assertEqual(
            self.join(
                b"[127.0.0.1]:40001 [27/Nov/2025:10:00:00 +0100]\n",
                "[%h]:%{remote}p %t",
            )[0],
            b"[192.0.2.7] [27/Nov/2025:10:00:00 +0100]\n",
        )

    def test_port_alone(self) -> None:
        """A port with no space or colon before it, nor space after it, goes alone."""
        self.assertEqual(
            self.join(
                b"127.0.0.1 (40001) [27/Nov/2025:10:00:00 +0100]\n",
                "%h (%{remote}p) %t",
            )[0],
            b"192.0.2.7 () [27/Nov/2025:10:00:00 +0100]\n",
        )

    def test_addresses(self) -> None:
        """Every C{%h} and C{%a} field gets the client's address."""
        self.assertEqual(
            self.join(
                b"127.0.0.1 127.0.0.1 10.0.0.9 1764234000 40001\n",
                "%h %a %{c}a %{sec}t %{remote}p",
            )[0],
            b"192.0.2.7 192.0.2.7 10.0.0.9 1764234000\n",
        )

    def test_mapped(self) -> None:
        """A web server's IPv4-mapped address is compared as IPv4."""
        self.assertEqual(self.join(access(host="::ffff:127.0.0.1"))[1], "matched")

    def test_every_line(self) -> None:
        """
        Any mix of matched, unmatched, unparsable and arbitrary lines comes
        out one line for one line, in order, and all but the matched ones
        byte for byte.
        """
        rng = random.Random(7)
        makers = [
            lambda: access(),
            lambda: access(port=rng.randrange(1, 65536)),
            lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(40))) + b"\n",
            lambda: access().replace(b" ", b"\t", 1),
        ]
        lines = [rng.choice(makers)() for _ in range(2000)]
        stream = io.BytesIO(b"".join(lines))
        out = [self.join(line) for line in stream]
        self.assertEqual(
            b"".join(joined for joined, _ in out).count(b"\n"),
            b"".join(lines).count(b"\n"),
        )
        for line, (joined, outcome) in zip(
            (line for line in io.BytesIO(b"".join(lines))), out, strict=True
        ):
            if outcome != "matched":
                self.assertEqual(joined, line)
            else:
                self.assertEqual(joined, self.join(access())[0])


class MainTests(SynchronousTestCase):
    """The command line, run in-process."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.connections = self.write(
            "connections.log",
            *connection("a", 40001, NINE_UTC - 1, NINE_UTC + 1),
            b"{not json\n",
            record("close", "x", None, NINE_UTC, closed=NINE_UTC),
        )

    def write(self, name: str, *lines: bytes) -> str:
        path = self.directory / name
        path.write_bytes(b"".join(lines))
        return str(path)

    def invoke(self, *argv: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
        stdout, stderr = io.BytesIO(), io.StringIO()
        status = main(list(argv), io.BytesIO(stdin), stdout, stderr)
        return status, stdout.getvalue(), stderr.getvalue()

    def test_join(self) -> None:
        """
        Several access logs come out in order, one line for each line in,
        with the summary on standard error.
        """
        first = self.write("first.log", access(), b"garbage\n", access(port=40002))
        second = self.write("second.log", access("27/Nov/2025:10:00:01 +0100"))
        status, out, err = self.invoke(self.connections, first, second)
        self.assertEqual(status, 0)
        self.assertEqual(
            out.splitlines(keepends=True),
            [
                access().replace(b"127.0.0.1", b"192.0.2.7").replace(b" 40001", b""),
                b"garbage\n",
                access(port=40002),
                access("27/Nov/2025:10:00:01 +0100")
                .replace(b"127.0.0.1", b"192.0.2.7")
                .replace(b" 40001", b""),
            ],
        )
        self.assertEqual(
            err,
            "tlsproxy-logjoin: connection log: 3 records, 1 skipped\n"
            "tlsproxy-logjoin: matched 2, unmatched 1, unparsable 1,"
            " not an address 0\n",
        )

    def test_stdin(self) -> None:
        """An access log of C{-} is standard input."""
        status, out, err = self.invoke(self.connections, "-", stdin=access(port=40009))
        self.assertEqual((status, out), (0, access(port=40009)))
        self.assertIn("matched 0, unmatched 1, unparsable 0", err)

    def test_format(self) -> None:
        """C{--format} gives the access log's format."""
        access_log = self.write("access.log", b"40001 127.0.0.1 1764234000 x\n")
        status, out, _ = self.invoke(
            "--format", "%{remote}p %h %{sec}t %r", self.connections, access_log
        )
        self.assertEqual((status, out), (0, b"192.0.2.7 1764234000 x\n"))

    def test_bad_format(self) -> None:
        """A format that cannot be joined is one line on standard error, status 2."""
        status, out, err = self.invoke("--format", "%h %t", self.connections, "-")
        self.assertEqual(
            (status, out, err),
            (2, b"", "tlsproxy-logjoin: --format: no %{remote}p: nothing to join on\n"),
        )

    def test_missing(self) -> None:
        """
        An input that cannot be opened is one line on standard error, status
        1, before any output.
        """
        access_log = self.write("access.log", access())
        for argv, name, reason in [
            (
                [str(self.directory / "nope"), access_log],
                "nope",
                "No such file or directory",
            ),
            (
                [self.connections, access_log, str(self.directory / "nope")],
                "nope",
                "No such file or directory",
            ),
            ([self.connections, str(self.directory)], "", "Is a directory"),
        ]:
            status, out, err = self.invoke(*argv)
            path = self.directory / name if name else self.directory
            self.assertEqual(
                (status, out, err), (1, b"", f"tlsproxy-logjoin: {path}: {reason}\n")
            )


class ScriptTests(SynchronousTestCase):
    """C{python -m tlsproxy.logjoin} and the C{tlsproxy-logjoin} script."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.connections = self.directory / "connections.log"
        self.connections.write_bytes(
            b"".join(connection("a", 40001, NINE_UTC - 1, NINE_UTC + 1))
        )

    def run_module(
        self, *argv: str, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
        return subprocess.run(
            [sys.executable, "-m", "tlsproxy.logjoin", *argv],
            input=stdin,
            capture_output=True,
            env=env,
            check=False,
        )

    def test_module(self) -> None:
        """C{python -m tlsproxy.logjoin} joins standard input to standard output."""
        done = self.run_module(str(self.connections), "-", stdin=access())
        self.assertEqual(done.returncode, 0)
        self.assertEqual(
            done.stdout,
            access().replace(b"127.0.0.1", b"192.0.2.7").replace(b" 40001", b""),
        )
        self.assertEqual(
            done.stderr.decode().splitlines()[-1],
            "tlsproxy-logjoin: matched 1, unmatched 0, unparsable 0, not an address 0",
        )

    def test_missing(self) -> None:
        """A missing connection log is one line and status 1, no traceback."""
        done = self.run_module("nope.log", "-")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (1, b"", b"tlsproxy-logjoin: nope.log: No such file or directory\n"),
        )

    def test_usage(self) -> None:
        """A command line without an access log is a usage error, status 2."""
        done = self.run_module(str(self.connections))
        self.assertEqual(done.returncode, 2)
        self.assertIn(b"usage: tlsproxy-logjoin [-h] [--format LOGFORMAT]", done.stderr)

    def test_main_guard(self) -> None:
        """Run as C{__main__}, the module exits with C{main()}'s status."""
        self.patch(sys, "argv", ["tlsproxy-logjoin", "nope.log", "-"])
        self.patch(sys, "stderr", io.StringIO())
        self.patch(sys, "stdout", io.TextIOWrapper(io.BytesIO()))
        with warnings.catch_warnings(), self.assertRaises(SystemExit) as exited:
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module("tlsproxy.logjoin", run_name="__main__")
        self.assertEqual(exited.exception.code, 1)
        self.assertIn("nope.log: No such file or directory", sys.stderr.getvalue())

    def test_console_script(self) -> None:
        """The installed project declares the C{tlsproxy-logjoin} console script."""
        (script,) = entry_points(group="console_scripts", name="tlsproxy-logjoin")
        self.assertEqual(script.value, "tlsproxy.logjoin:main")
