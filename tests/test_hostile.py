"""
Hostile values (control characters, line breaks, terminal escapes,
non-ASCII, lone surrogates, huge texts, numbers out of range) for every
field a peer controls, into every sink: twistd's log line, the JSON
connection log, PROXY v1 and v2 headers to the backend, the metrics, and
tlsproxy-logjoin; and any bytes as a front balancer's PROXY header, a
client's SNI name or its certificate's CN.  No exception escapes, no raw
control character reaches a line of text, and every PROXY header sent is
one the spec allows (it reads back whole).

Run as the other property tests are (see tests/test_properties.py).
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import string
import tempfile
import unittest

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from twisted.logger import formatEvent, globalLogPublisher

from tlsproxy.logjoin import main as logjoin
from tlsproxy.metrics import Metrics
from tlsproxy.peer import printable, server_name
from tlsproxy.proxyheader import parse, v1, v2
from tlsproxy.record import ConnectionLog, ConnectionRecord, log_close

from .memory import Pair
from .test_properties import read, tlvs

# Text as hostile as text gets: every control character, escapes, line and
# paragraph separators, surrogates, and plenty of it.
NASTY = st.text(
    st.one_of(
        st.characters(codec=None),
        st.sampled_from("\n\r\t\x00\x1b\x7f\x85\u2028\u2029\ud800\udfff%:[] "),
    ),
    max_size=300,
) | st.text(max_size=70_000).map(lambda t: t * 2)
HOSTS = st.one_of(
    st.none(), NASTY, st.ip_addresses().map(str), st.just("fe80::1%eth0\nX")
)
PORTS = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.integers(0, 65535))
TEXTS = st.one_of(st.none(), NASTY)


@st.composite
def records(draw: st.DrawFn) -> ConnectionRecord:
    """A close record whose every peer-controlled field is drawn hostile."""
    return ConnectionRecord(
        event="close",
        id="0123abcd",
        service="tlsproxy",
        client_host=draw(HOSTS),
        client_port=draw(PORTS),
        listen_host=draw(HOSTS),
        listen_port=draw(PORTS),
        balancer_host=draw(HOSTS),
        balancer_port=draw(PORTS),
        backend_local_host="127.0.0.1",
        backend_local_port=40001,
        opened=1.0,
        closed=2.0,
        duration=1.0,
        tls_version=draw(TEXTS),
        cipher=draw(TEXTS),
        sni=draw(TEXTS),
        alpn=draw(TEXTS),
        client_cert=draw(TEXTS),
        client_cn=draw(TEXTS),
        reason=draw(TEXTS),
    )


class SinkTests(unittest.TestCase):
    """Any record, into each sink."""

    def setUp(self) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @settings(max_examples=300, deadline=None, database=None)
    @given(records())
    def test_log_line(self, record: ConnectionRecord) -> None:
        """twistd's log gets one printable line: no break, no escape."""
        del self.events[:]
        log_close(record)
        [event] = [e for e in self.events if e.get("service") == "tlsproxy"]
        line = formatEvent(event)
        self.assertTrue(line.isprintable(), repr(line))

    @settings(max_examples=300, deadline=None, database=None)
    @given(records())
    def test_connection_log(self, record: ConnectionRecord) -> None:
        """The connection log gets one line of ASCII JSON that reads back."""
        with tempfile.TemporaryFile() as file:
            log = ConnectionLog("file", os.dup(file.fileno()))
            log(record)
            log.close()
            file.seek(0)
            data = file.read()
        self.assertEqual(data.count(b"\n"), 1)
        self.assertTrue(data.endswith(b"\n"))
        self.assertTrue(data[:-1].decode("ascii").isprintable())
        self.assertEqual(json.loads(data)["reason"], record.reason)

    @settings(max_examples=300, deadline=None, database=None)
    @given(records())
    def test_proxy_headers(self, record: ConnectionRecord) -> None:
        """Both versions: a header that reads back whole, whatever came in."""
        for encode in (v1, v2):
            header = encode(record)
            read(header)
        self.assertLessEqual(len(v1(record)), 107)
        body = v2(record)[16:]
        family = v2(record)[13]
        tlvs(body[{0x00: 0, 0x11: 12, 0x21: 36}[family] :])

    @settings(max_examples=100, deadline=None, database=None)
    @given(records())
    def test_metrics(self, record: ConnectionRecord) -> None:
        """The metrics count any record, and the page still renders."""
        metrics = Metrics()
        metrics.observe(attrs.evolve(record, event="open"))
        metrics.observe(record)
        self.assertIn(b"tlsproxy_connections_closed", generate_latest(metrics.registry))

    @settings(max_examples=100, deadline=None, database=None)
    @given(HOSTS)
    def test_logjoin(self, host: str | None) -> None:
        """One line in, one line out; a client that is no IP address changes none."""
        record = {
            "event": "close",
            "id": "a",
            "client_host": host,
            "backend_local_host": "127.0.0.1",
            "backend_local_port": 40001,
            "opened": 1764234000.0 - 1,
            "closed": 1764234000.0 + 1,
        }
        access = (
            b'127.0.0.1 - - [27/Nov/2025:09:00:00 +0000] "GET / HTTP/1.1" 200 5'
            b' "-" "curl" 40001\n'
        )
        out, err = io.BytesIO(), io.StringIO()
        with tempfile.NamedTemporaryFile() as connections:
            connections.write(json.dumps(record).encode() + b"\n")
            connections.flush()
            status = logjoin([connections.name, "-"], io.BytesIO(access), out, err)
        self.assertEqual(status, 0)
        joined = out.getvalue()
        self.assertEqual(joined.count(b"\n"), 1)
        try:
            address = str(ipaddress.ip_address(host or ""))
        except ValueError:
            address = None
        if host is None:
            self.assertTrue(joined.startswith(b"- "))
        elif address is None or "%" in (host or ""):
            self.assertEqual(joined, access)
        else:
            self.assertTrue(joined.startswith(host.encode() + b" "))


class EntryTests(unittest.TestCase):
    """What a peer sends is checked where it enters."""

    @settings(max_examples=1000, deadline=None, database=None)
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=120).map(lambda b: b"PROXY " + b),
            st.builds(
                lambda kind, a, b, p, q: (
                    b"PROXY %s %s %s %s %s\r\n" % (kind, a, b, p, q)
                ),
                st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"UDP4"]),
                st.binary(max_size=20)
                | st.ip_addresses().map(lambda a: str(a).encode()),
                st.binary(max_size=20)
                | st.ip_addresses().map(lambda a: str(a).encode()),
                st.binary(max_size=8) | st.integers(-9, 99999).map(lambda i: b"%d" % i),
                st.binary(max_size=8) | st.integers(-9, 99999).map(lambda i: b"%d" % i),
            ),
            st.binary(max_size=120).map(lambda b: b"\r\n\r\n\x00\r\nQUIT\n" + b),
        )
    )
    def test_proxy_header(self, data: bytes) -> None:
        """
        Any bytes from a front balancer: not whole yet, refused, or a header
        whose addresses are IP addresses and whose ports are 0 to 65535.
        """
        try:
            parsed = parse(data)
        except ValueError:
            return
        if parsed is None:
            return
        length, addresses = parsed
        self.assertLessEqual(length, len(data))
        for address in addresses or ():
            self.assertEqual(str(ipaddress.ip_address(address.host)), address.host)
            self.assertTrue(0 <= address.port <= 65535)

    @settings(max_examples=50, deadline=None, database=None)
    @given(st.binary(min_size=1, max_size=200))
    def test_balancer_bytes(self, data: bytes) -> None:
        """
        Through the real TLS server, any first bytes from a front balancer
        end in exactly one close record, and nothing escapes.
        """
        pair = Pair(balancer=data)
        pair.flush()
        for _ in range(2):  # the handshake's timeout, then the connect's
            pair.clock.advance(31)
            pair.flush()
        self.assertEqual(
            [r.event for r in pair.records if r.event == "close"], ["close"]
        )
        reason = pair.records[-1].reason
        assert reason is not None
        self.assertTrue(printable(reason) == reason)

    @settings(max_examples=500, deadline=None, database=None)
    @given(st.one_of(st.none(), st.binary(max_size=300)))
    def test_server_name(self, sent: bytes | None) -> None:
        """
        Any SNI bytes: none, not a host name (C{""}), or a host name of
        letters, digits, '-', '_' and dots, in lower case.
        """

        class Sent:
            def get_servername(self) -> bytes | None:
                return sent

        name = server_name(Sent())  # type: ignore[arg-type]
        if sent is None:
            self.assertIsNone(name)
            return
        assert name is not None
        allowed = set(string.ascii_lowercase + string.digits + "-_.")
        self.assertLessEqual(set(name), allowed)
        self.assertLessEqual(len(name), 253)
        self.assertFalse(name.startswith(".") or name.endswith(".") or ".." in name)
