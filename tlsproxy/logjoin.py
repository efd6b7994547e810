"""
tlsproxy-logjoin: rebuild a web server's access log with the real client
addresses, by joining it with tlsproxy's connection log.

An access-log line matches the connection whose C{backend_local_port} is the
line's C{%{remote}p} (and whose C{backend_local_host} is the line's address,
when the record has one) and that was open at the line's time, give or take
a second.  Every line comes out, in order: matched lines with the client's
address and without the port, others unchanged.  A client address that is
not an IP address (a record written by hand, say) is never copied into a
line: such a line comes out unchanged, counted as C{not an address}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from operator import itemgetter
from typing import IO, Any

from .logformat import LogFormat, LogFormatError, compile_format

PROG = "tlsproxy-logjoin"
DEFAULT_FORMAT = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i" %{remote}p'
# Seconds of slack on each side of a connection's interval: %t has
# one-second resolution.
SLACK = 1.0

# One connection: opened, closed (inf while open), backend_local_host,
# client_host (b"" when it is not an IP address).
Connection = tuple[float, float, bytes | None, bytes]
_OPENED = itemgetter(0)


class ConnectionIndex:
    """
    The connections of a connection log by C{backend_local_port} (as the
    decimal bytes an access log shows), each port's sorted by opening time.
    """

    def __init__(self, by_port: dict[bytes, list[Connection]]) -> None:
        self._by_port = by_port

    def find(self, port: bytes, host: bytes, when: float | None) -> bytes | None:
        """
        The client address of the connection from C{port} (and C{host}, when
        the connection's host is known) open at C{when}, the one opened last
        if several are; with no C{when}, of the only connection from there.
        C{None} if there is no such connection.
        """
        candidates = self._by_port.get(port, [])
        if when is None:
            hosts = [c for c in candidates if c[2] in (host, None)]
            return hosts[0][3] if len(hosts) == 1 else None
        for i in reversed(range(bisect_right(candidates, when + SLACK, key=_OPENED))):
            _, closed, local_host, client_host = candidates[i]
            if when <= closed + SLACK and local_host in (host, None):
                return client_host
        return None


def read_index(lines: Iterable[bytes]) -> tuple[ConnectionIndex, int, int]:
    """
    The index of a connection log's C{lines}, with the number of records
    read and of lines skipped (not JSON, or not a record).  A connection
    with an C{open} record and no C{close} record is still open.
    """
    by_port: dict[bytes, list[Connection]] = {}
    still_open: dict[str, tuple[bytes, Connection]] = {}
    interned: dict[bytes | None, bytes | None] = {None: None}
    records = skipped = 0
    for line in lines:
        try:
            event, key, port, connection = _connection(json.loads(line), interned)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            skipped += 1
            continue
        records += 1
        if event == "open":
            still_open[key] = (port, connection)
        elif port:
            still_open.pop(key, None)
            by_port.setdefault(port, []).append(connection)
    for port, connection in still_open.values():
        by_port.setdefault(port, []).append(connection)
    for connections in by_port.values():
        connections.sort(key=_OPENED)
    return ConnectionIndex(by_port), records, skipped


def _connection(
    record: Any, interned: dict[bytes | None, bytes | None]
) -> tuple[str, str, bytes, Connection]:
    """
    The event, id, port and connection of one record; the port is empty for
    a connection that never reached the backend.  Raise C{KeyError},
    C{TypeError}, C{ValueError} or C{AttributeError} if it is not a record.
    """
    event, key, port = record["event"], record["id"], record["backend_local_port"]
    closed = {"open": math.inf, "close": record["closed"] or 0}[event]
    local_host = _host(record["backend_local_host"])
    client_host = _client(record["client_host"])
    connection = (
        float(record["opened"] or 0),
        float(closed),
        interned.setdefault(local_host, local_host),
        interned.setdefault(client_host, client_host) or b"",
    )
    return event, str(key), b"" if port is None else b"%d" % port, connection


def _client(host: str | None) -> bytes:
    """
    The client's address as a joined line shows it: C{-} for none (a UNIX
    socket's client), else the IP address; empty if it is not one.
    """
    if host is None:
        return b"-"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return b""
    return b"" if "%" in host else host.encode()


def _host(host: str | None) -> bytes | None:
    """An address as web servers write it: IPv4 without C{::ffff:}."""
    return None if host is None else host.removeprefix("::ffff:").encode()


def join_line(
    line: bytes, log_format: LogFormat, index: ConnectionIndex
) -> tuple[bytes, str]:
    """
    One access-log line, joined, and how: C{"matched"} (the addresses
    replaced by the client's, the remote port dropped), or C{"unmatched"},
    C{"unparsable"} or C{"not an address"} (unchanged).  The line keeps its
    ending, or gets C{\\n}.
    """
    body = line.rstrip(b"\r\n")
    ending = line[len(body) :].removesuffix(b"\n") + b"\n"
    match = log_format.pattern.fullmatch(body)
    if match is None:
        return body + ending, "unparsable"
    client = index.find(
        match[log_format.port_group],
        match[log_format.host_group].removeprefix(b"::ffff:"),
        log_format.time_of(match[log_format.time_group]),
    )
    if not client:
        return body + ending, "unmatched" if client is None else "not an address"
    pieces: list[bytes] = []
    position = 0
    for group, is_address in log_format.edits:
        start, end = match.span(group)
        pieces += (body[position:start], client if is_address else b"")
        position = end
    pieces += (body[position:], ending)
    return b"".join(pieces), "matched"


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write the access logs to standard output with each"
        " request's real client address, from tlsproxy's connection log.",
    )
    parser.add_argument(
        "--format",
        default=DEFAULT_FORMAT,
        metavar="LOGFORMAT",
        help="the access logs' Apache LogFormat, with %%h or %%a and"
        " %%{remote}p (default: %(default)s)",
    )
    parser.add_argument(
        "connection_log", metavar="CONNECTION_LOG", help="tlsproxy's --connection-log"
    )
    parser.add_argument(
        "access_logs", metavar="ACCESS_LOG", nargs="+", help='"-" for stdin'
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """
    Run C{tlsproxy-logjoin} with C{argv}; return the exit status: 0, 1 for
    input that cannot be read, 2 for a bad command line.
    """
    args = _arguments().parse_args(argv)
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr
    try:
        log_format = compile_format(args.format)
    except LogFormatError as error:
        print(f"{PROG}: --format: {error}", file=stderr)
        return 2
    with ExitStack() as files:
        try:
            connection_log, *access_logs = [
                (stdin or sys.stdin.buffer)
                if path == "-"
                else files.enter_context(open(path, "rb"))
                for path in [args.connection_log, *args.access_logs]
            ]
        except OSError as error:
            print(f"{PROG}: {error.filename}: {error.strerror}", file=stderr)
            return 1
        index, records, skipped = read_index(connection_log)
        print(
            f"{PROG}: connection log: {records} records, {skipped} skipped", file=stderr
        )
        counts = Counter(matched=0, unmatched=0, unparsable=0)
        counts["not an address"] = 0
        for access_log in access_logs:
            for line in access_log:
                joined, outcome = join_line(line, log_format, index)
                stdout.write(joined)
                counts[outcome] += 1
    stdout.flush()
    summary = ", ".join(f"{outcome} {n}" for outcome, n in counts.items())
    print(f"{PROG}: {summary}", file=stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
