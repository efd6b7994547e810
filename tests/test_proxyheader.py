"""
PROXY protocol headers, checked byte by byte and against Twisted's own
parsers.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import tap
from tlsproxy.proxyheader import V2_SIGNATURE, no_header, v1, v2
from tlsproxy.record import ConnectionRecord

from .memory import Pair

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


class V1Tests(SynchronousTestCase):
    """The text header."""

    def test_ipv4(self) -> None:
        """IPv4: the spec's exact line, which Twisted parses back."""
        header = v1(IPV4)
        self.assertEqual(header, b"PROXY TCP4 192.0.2.7 10.0.0.3 50123 443\r\n")
        info = V1Parser.parse(header[:-2])
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.7", 50123))
        self.assertEqual(info.destination, IPv4Address("TCP", "10.0.0.3", 443))

    def test_ipv6(self) -> None:
        """IPv6 addresses give a TCP6 line."""
        header = v1(IPV6)
        self.assertEqual(header, b"PROXY TCP6 2001:db8::7 2001:db8::3 50123 443\r\n")
        info = V1Parser.parse(header[:-2])
        self.assertEqual(info.source, IPv6Address("TCP", "2001:db8::7", 50123))

    def test_unknown(self) -> None:
        """A client without an IP address (a UNIX socket) is UNKNOWN."""
        # The spec's minimal form, as HAProxy sends it.  (Twisted's V1Parser
        # wrongly wants more after "UNKNOWN"; mod_remoteip accepts it.)
        self.assertEqual(v1(UNIX), b"PROXY UNKNOWN\r\n")

    def test_scoped_ipv6(self) -> None:
        """A link-local client's scope (%eth0) has no place in the header."""
        scoped = attrs.evolve(IPV6, client_host="fe80::1%eth0")
        self.assertEqual(v1(scoped), b"PROXY TCP6 fe80::1 2001:db8::3 50123 443\r\n")
        source = V2Parser.parse(v2(scoped)).source
        assert isinstance(source, IPv6Address)
        self.assertEqual(ip_address(source.host), ip_address("fe80::1"))

    def test_mixed_families(self) -> None:
        """An IPv4 client on an IPv6 listener cannot be said in one line."""
        mixed = attrs.evolve(IPV4, listen_host="2001:db8::3")
        self.assertEqual(v1(mixed), b"PROXY UNKNOWN\r\n")


class V2Tests(SynchronousTestCase):
    """The binary header and its TLVs."""

    def test_ipv4(self) -> None:
        """IPv4 addresses and ports, as Twisted reads them."""
        header = v2(IPV4)
        self.assertEqual(v2_parts(header)[0], 0x11)
        info = V2Parser.parse(header)
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.7", 50123))
        self.assertEqual(info.destination, IPv4Address("TCP", "10.0.0.3", 443))

    def test_ipv6(self) -> None:
        """IPv6 addresses and ports, as Twisted reads them."""
        header = v2(IPV6)
        self.assertEqual(v2_parts(header)[0], 0x21)
        info = V2Parser.parse(header)
        source, destination = info.source, info.destination
        assert isinstance(source, IPv6Address)
        assert isinstance(destination, IPv6Address)
        self.assertEqual(ip_address(source.host), ip_address("2001:db8::7"))
        self.assertEqual(ip_address(destination.host), ip_address("2001:db8::3"))
        self.assertEqual((source.port, destination.port), (50123, 443))

    def test_unspecified(self) -> None:
        """Without IP addresses the family is UNSPEC; the TLVs still follow."""
        header = v2(UNIX)
        family, addresses, found = v2_parts(header)
        self.assertEqual((family, addresses), (0x00, b""))
        self.assertEqual(found[0x05], IPV4.id.encode())
        self.assertIsNone(V2Parser.parse(header).source)

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
