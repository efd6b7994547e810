"""
PROXY protocol headers, sent (checked byte by byte, and read back) and
received (every field checked).
"""

from __future__ import annotations

import struct

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import tap
from tlsproxy.listen import behind_balancer_factory as behind_balancer
from tlsproxy.peer import Proxied
from tlsproxy.proxyheader import V2_SIGNATURE, Addresses, no_header, parse, v1, v2
from tlsproxy.record import ConnectionRecord

from .memory import Pair, Recorder

IPV4 = ConnectionRecord(
    event="open",
    id="5f0c9d2a7b8e4f10a1b2c3d4e5f60718",
    service="tlsproxy",
    client_host="192.0.2.7",
    client_port=50123,
    listen_host="10.0.0.3",
    listen_port=443,
    opened=0.0,
    tls_version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    sni="www.example.com",
    alpn="http/1.1",
)
IPV6 = attrs.evolve(IPV4, client_host="2001:db8::7", listen_host="2001:db8::3")
UNIX = attrs.evolve(IPV4, client_host=None, client_port=None, listen_host="/run/s")


def tlvs(data: bytes) -> dict[int, bytes]:
    """Type-length-value entries, by type."""
    found = {}
    while data:
        kind, length = struct.unpack("!BH", data[:3])
        found[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return found


def v2_parts(header: bytes) -> tuple[int, bytes, dict[int, bytes]]:
    """The family byte, the address block and the TLVs of a v2 header."""
    assert header[:12] == V2_SIGNATURE
    command, family, length = struct.unpack("!BBH", header[12:16])
    assert command == 0x21
    assert len(header) == 16 + length
    size = {0x11: 12, 0x21: 36, 0x00: 0}[family]
    return family, header[16 : 16 + size], tlvs(header[16 + size :])


def read(header: bytes) -> Addresses:
    """The addresses of a whole C{header}, which L{parse} must take whole."""
    parsed = parse(header)
    assert parsed is not None
    length, addresses = parsed
    assert length == len(header)
    assert addresses is not None
    return addresses


class V1Tests(SynchronousTestCase):
    """The text header."""

    def test_ipv4(self) -> None:
        """IPv4: the spec's exact line, which Twisted parses back."""
        header = v1(IPV4)
        self.assertEqual(header, b"PROXY TCP4 192.0.2.7 10.0.0.3 50123 443\r\n")
        self.assertEqual(
            read(header),
            (
                IPv4Address("TCP", "192.0.2.7", 50123),
                IPv4Address("TCP", "10.0.0.3", 443),
            ),
        )

    def test_ipv6(self) -> None:
        """IPv6 addresses give a TCP6 line."""
        header = v1(IPV6)
        self.assertEqual(header, b"PROXY TCP6 2001:db8::7 2001:db8::3 50123 443\r\n")
        self.assertEqual(read(header)[0], IPv6Address("TCP", "2001:db8::7", 50123))

    def test_unknown(self) -> None:
        """A client without an IP address (a UNIX socket) is UNKNOWN."""
        # The spec's minimal form, as HAProxy sends it.
        self.assertEqual(v1(UNIX), b"PROXY UNKNOWN\r\n")
        self.assertEqual(parse(v1(UNIX)), (15, None))

    def test_scoped_ipv6(self) -> None:
        """A link-local client's scope (%eth0) has no place in the header."""
        scoped = attrs.evolve(IPV6, client_host="fe80::1%eth0")
        self.assertEqual(v1(scoped), b"PROXY TCP6 fe80::1 2001:db8::3 50123 443\r\n")
        self.assertEqual(read(v2(scoped))[0], IPv6Address("TCP", "fe80::1", 50123))

    def test_mixed_families(self) -> None:
        """An IPv4 client on an IPv6 listener cannot be said in one line."""
        mixed = attrs.evolve(IPV4, listen_host="2001:db8::3")
        self.assertEqual(v1(mixed), b"PROXY UNKNOWN\r\n")

    def test_ports_out_of_range(self) -> None:
        """Ports that are not 0 to 65535 are not sent: UNKNOWN, AF_UNSPEC."""
        for ports in [(99999999, 443), (-7, 443), (50123, None), (None, None)]:
            record = attrs.evolve(IPV4, client_port=ports[0], listen_port=ports[1])
            self.assertEqual(v1(record), b"PROXY UNKNOWN\r\n")
            self.assertEqual(v2_parts(v2(record))[:2], (0x00, b""))


class ParseTests(SynchronousTestCase):
    """
    A front balancer's header: read whole, every field checked, or refused.
    """

    def test_whole_or_not_yet(self) -> None:
        """Until the header is whole, nothing; then its length, the rest aside."""
        for header in [v1(IPV4), v1(IPV6), v2(IPV4), v2(IPV6)]:
            for cut in range(len(header)):
                self.assertIsNone(parse(header[:cut]), (header, cut))
            self.assertEqual(parse(header + b"\x16\x03\x01")[0], len(header))

    def test_no_addresses(self) -> None:
        """UNKNOWN, LOCAL and other families: the connection's own addresses."""
        local = V2_SIGNATURE + b"\x20\x00\x00\x00"
        unix = V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"\x00" * 216
        for header in [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1 2 3 4\r\n", local, unix]:
            self.assertEqual(parse(header), (len(header), None), header)

    def test_refused(self) -> None:
        """
        A field that is not what its place says ends it: no address, an
        address of the other family or with a scope, a port out of range or
        not a number, bytes that are not ASCII, a v2 command or family block
        it does not have.
        """
        for header in [
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
            b"PROXY TCP4 1.2.3.4\nFORGED 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 \x1b[31m1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999999 -7\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 443\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 \xff\xfe::1 ::2 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 100 + b"\r\n",
            V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,
            V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,
            V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,
            V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,
        ]:
            with self.assertRaises(ValueError, msg=header):
                parse(header)

    def test_v1_longest(self) -> None:
        """107 bytes with no CRLF is no v1 header; 106 may still become one."""
        self.assertIsNone(parse(b"PROXY " + b"x" * 100))
        self.assertRaises(ValueError, parse, b"PROXY " + b"x" * 101)


class V2Tests(SynchronousTestCase):
    """The binary header and its TLVs."""

    def test_ipv4(self) -> None:
        """IPv4 addresses and ports, read back."""
        header = v2(IPV4)
        self.assertEqual(v2_parts(header)[0], 0x11)
        self.assertEqual(
            read(header),
            (
                IPv4Address("TCP", "192.0.2.7", 50123),
                IPv4Address("TCP", "10.0.0.3", 443),
            ),
        )

    def test_ipv6(self) -> None:
        """IPv6 addresses and ports, read back."""
        header = v2(IPV6)
        self.assertEqual(v2_parts(header)[0], 0x21)
        self.assertEqual(
            read(header),
            (
                IPv6Address("TCP", "2001:db8::7", 50123),
                IPv6Address("TCP", "2001:db8::3", 443),
            ),
        )

    def test_unspecified(self) -> None:
        """Without IP addresses the family is UNSPEC; the TLVs still follow."""
        header = v2(UNIX)
        family, addresses, found = v2_parts(header)
        self.assertEqual((family, addresses), (0x00, b""))
        self.assertEqual(found[0x05], IPV4.id.encode())
        self.assertEqual(parse(header), (len(header), None))

    def test_tlvs(self) -> None:
        """ALPN, AUTHORITY (SNI), UNIQUE_ID and SSL carry the TLS facts."""
        _, _, found = v2_parts(v2(IPV4))
        self.assertEqual(found[0x01], b"http/1.1")
        self.assertEqual(found[0x02], b"www.example.com")
        self.assertEqual(found[0x05], IPV4.id.encode())
        ssl = found[0x20]
        client, verify = struct.unpack("!BI", ssl[:5])
        self.assertEqual((client, verify), (0x01, 0))
        self.assertEqual(
            tlvs(ssl[5:]), {0x21: b"TLSv1.3", 0x23: b"TLS_AES_256_GCM_SHA384"}
        )

    def test_client_certificate(self) -> None:
        """A client certificate sets the SSL TLV's certificate flags and its CN."""
        record = attrs.evolve(
            IPV4, client_cert="CN=client-1,OU=ops", client_cn="client-1"
        )
        ssl = v2_parts(v2(record))[2][0x20]
        client, verify = struct.unpack("!BI", ssl[:5])
        self.assertEqual((client, verify), (0x07, 0))
        self.assertEqual(tlvs(ssl[5:])[0x22], b"client-1")

    def test_huge_values_left_out(self) -> None:
        """A value over 1 KiB has no TLV: the header's length stays 16 bits."""
        huge = attrs.evolve(IPV4, sni="x" * 1025, client_cn="y" * 70000)
        _, _, found = v2_parts(v2(huge))
        self.assertNotIn(0x02, found)
        self.assertNotIn(0x22, tlvs(found[0x20][5:]))

    def test_absent_values_left_out(self) -> None:
        """A fact the connection does not have (no SNI, no ALPN) has no TLV."""
        _, _, found = v2_parts(v2(attrs.evolve(IPV4, sni=None, alpn=None)))
        self.assertEqual(sorted(found), [0x05, 0x20])


class RelayTests(SynchronousTestCase):
    """The header goes first to the backend, then the client's bytes."""

    def test_header_first(self) -> None:
        """
        The backend gets the header, made from the connection's record, and
        then the bytes the client sent while the backend was connected.
        """
        pair = Pair(header=v1)
        pair.flush()
        pair.client_tls.write(b"early")
        pair.flush()
        pair.connect_backend()
        pair.client_tls.write(b" late")
        pair.flush()
        self.assertEqual(
            pair.backend.data,
            b"PROXY TCP4 192.0.2.7 127.0.0.1 50123 8443\r\nearly late",
        )

    def test_no_header(self) -> None:
        """Without --proxy-protocol nothing comes before the client's bytes."""
        self.assertEqual(no_header(IPV4), b"")


class BalancerTests(SynchronousTestCase):
    """
    Behind a front balancer (--listen haproxy:...): the client is the one
    its PROXY header names, and is passed on to the backend.
    """

    def test_client_from_header(self) -> None:
        """
        The record's client and listening address are the header's; the
        balancer's own address has its own fields; a PROXY header to the
        backend names the original client.
        """
        pair = Pair(
            header=v1, balancer=b"PROXY TCP4 203.0.113.9 198.51.100.1 4711 443\r\n"
        )
        pair.flush()
        pair.connect_backend()
        pair.flush()
        record = pair.records[0]
        self.assertEqual(
            (record.client_host, record.client_port), ("203.0.113.9", 4711)
        )
        self.assertEqual(
            (record.listen_host, record.listen_port), ("198.51.100.1", 443)
        )
        self.assertEqual(
            (record.balancer_host, record.balancer_port), ("192.0.2.7", 50123)
        )
        self.assertEqual(
            pair.backend.data, b"PROXY TCP4 203.0.113.9 198.51.100.1 4711 443\r\n"
        )

    def test_client_from_header_on_failure(self) -> None:
        """A client lost in its handshake is still the header's client."""
        pair = Pair(balancer=b"PROXY TCP4 203.0.113.9 198.51.100.1 4711 443\r\n")
        pair.pump.pump()  # the header and the ClientHello
        pair.client_tls.transport.abortConnection()
        pair.flush()
        [record] = pair.records
        self.assertEqual(record.client_host, "203.0.113.9")
        self.assertEqual(record.balancer_host, "192.0.2.7")

    def test_no_header(self) -> None:
        """A connection without a valid header is closed and logged as such."""
        pair = Pair(balancer=b"")
        pair.flush()
        [record] = pair.records
        self.assertEqual(record.reason, "no valid PROXY header")
        self.assertEqual((record.client_host, record.balancer_host), ("192.0.2.7",) * 2)
        self.assertEqual(pair.endpoint.attempts, [])

    def test_header_in_pieces(self) -> None:
        """
        A header that comes a byte at a time is read whole; the bytes after
        it reach the protocol above, and only they.
        """
        header = b"PROXY TCP4 203.0.113.9 198.51.100.1 4711 443\r\n"
        balancer = IPv4Address("TCP", "192.0.2.7", 50123)
        protocol = behind_balancer(Factory.forProtocol(Recorder)).buildProtocol(
            balancer
        )
        transport = StringTransport(peerAddress=balancer)
        protocol.makeConnection(transport)
        for byte in header + b"hello":
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(protocol.wrappedProtocol.data, b"hello")
        self.assertEqual(
            protocol.getPeer(),
            Proxied(IPv4Address("TCP", "203.0.113.9", 4711), balancer),
        )
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "198.51.100.1", 443))
        self.assertFalse(transport.disconnecting)

    def test_hostile_header(self) -> None:
        """A header with a field out of place aborts, recorded as such."""
        pair = Pair(balancer=b"PROXY TCP4 1.2.3.4\nX 5.6.7.8 1 2\r\n")
        pair.flush()
        [record] = pair.records
        self.assertEqual(record.reason, "no valid PROXY header")
        self.assertTrue(pair.server_io.aborted)
        self.assertEqual(pair.endpoint.attempts, [])

    def test_not_behind_balancer(self) -> None:
        """Without a front balancer the balancer fields are null."""
        pair = Pair()
        pair.flush()
        pair.connect_backend()
        record = pair.records[0]
        self.assertEqual((record.balancer_host, record.balancer_port), (None, None))


class OptionTests(SynchronousTestCase):
    """--proxy-protocol v1|v2."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--connect", "tcp:h:1", "--self-signed", "x", *args])
        return options

    def test_versions(self) -> None:
        """v1 and v2 choose their encoder; the default sends no header."""
        self.assertIs(self.parse().config.header, no_header)
        self.assertIs(self.parse("--proxy-protocol", "v1").config.header, v1)
        self.assertIs(self.parse("--proxy-protocol", "v2").config.header, v2)

    def test_unknown_version(self) -> None:
        """Anything else is a one-line error."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--proxy-protocol", "v3")
        self.assertEqual(str(caught.exception), "--proxy-protocol v3: must be v1 or v2")
