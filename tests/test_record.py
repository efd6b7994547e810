"""
Unit tests for connection records and the line in twistd's log.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.peer import host_port
from tlsproxy.record import ConnectionRecord, fan_out, log_close


class HostPortTests(SynchronousTestCase):
    """Every address family gives a host and a port, or None."""

    def test_ip(self) -> None:
        """IPv4 and IPv6 addresses give their host and port."""
        self.assertEqual(
            host_port(IPv4Address("TCP", "10.0.0.3", 40001)), ("10.0.0.3", 40001)
        )
        self.assertEqual(host_port(IPv6Address("TCP", "::1", 443)), ("::1", 443))

    def test_unix(self) -> None:
        """A UNIX socket gives its path (or None) and no port."""
        self.assertEqual(
            host_port(UNIXAddress(b"/run/app.sock")), ("/run/app.sock", None)
        )
        self.assertEqual(host_port(UNIXAddress(None)), (None, None))


class FanOutTests(SynchronousTestCase):
    """Several observers see the same records."""

    def test_in_order(self) -> None:
        """Each record goes to every observer, in the order given."""
        seen: list[tuple[str, str]] = []
        observe = fan_out(
            [lambda r: seen.append(("a", r.id)), lambda r: seen.append(("b", r.id))]
        )
        record = ConnectionRecord(
            event="open",
            id="x",
            service="s",
            client_host=None,
            client_port=None,
            listen_host=None,
            listen_port=None,
            opened=0.0,
        )
        observe(record)
        self.assertEqual(seen, [("a", "x"), ("b", "x")])


class LogCloseTests(SynchronousTestCase):
    """One line per closed connection in twistd's log, as stunnel writes."""

    def setUp(self) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def record(self, **fields: object) -> ConnectionRecord:
        values: dict[str, object] = dict(
            event="close",
            id="abc",
            service="https",
            client_host="192.0.2.7",
            client_port=50123,
            listen_host="127.0.0.1",
            listen_port=443,
            backend_local_host="10.0.0.3",
            backend_local_port=40001,
            backend_host="10.0.0.2",
            backend_port=80,
            opened=100.0,
            closed=101.25,
            duration=1.25,
            bytes_from_client=78,
            bytes_to_client=1234,
            reason="backend closed",
        )
        values.update(fields)
        return ConnectionRecord(**values)  # type: ignore[arg-type]

    def test_close_line(self) -> None:
        """A closed connection is one line: who, via where, to where, why, bytes."""
        log_close(self.record())
        [event] = self.events
        self.assertEqual(
            formatEvent(event),
            "[https] abc from 192.0.2.7:50123 via 10.0.0.3:40001 to 10.0.0.2:80"
            " closed: backend closed; 78 bytes from client, 1234 bytes to client"
            " in 1.250 s",
        )
        self.assertEqual(event["service"], "https")

    def test_never_connected(self) -> None:
        """A connection that never reached the backend shows "-" there."""
        log_close(
            self.record(
                backend_local_host=None,
                backend_local_port=None,
                backend_host=None,
                backend_port=None,
                reason="handshake timeout",
            )
        )
        self.assertIn(
            " via - to - closed: handshake timeout;", formatEvent(self.events[0])
        )

    def test_open_not_logged(self) -> None:
        """Open records do not add lines."""
        log_close(self.record(event="open"))
        self.assertEqual(self.events, [])
