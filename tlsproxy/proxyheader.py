"""
PROXY protocol headers for the backend (HAProxy's doc/proxy-protocol.txt):
the client's address and, in version 2, the TLS facts, sent before any
client byte.  Each encoder takes the connection record as it is when the
backend connects.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable

from twisted.internet.address import IPv4Address, IPv6Address

from .record import ConnectionRecord

HeaderEncoder = Callable[[ConnectionRecord], bytes]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_FAMILY = {4: 0x11, 6: 0x21}  # TCP over IPv4, TCP over IPv6; else UNSPEC (0x00)

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_CN = 0x22
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT = 0x02 | 0x04  # PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS


def no_header(record: ConnectionRecord) -> bytes:
    """Send nothing before the client's bytes."""
    return b""


def _addresses(
    record: ConnectionRecord,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """
    The client's and the listening address, if both are IP addresses of the
    same version, with ports from 0 to 65535; else none (a UNIX socket,
    say).  An IPv6 scope (C{fe80::1%eth0}) is dropped: the header has no
    room for it.
    """
    ports = (record.client_port, record.listen_port)
    try:
        pair = tuple(
            ipaddress.ip_address((host or "").partition("%")[0])
            for host in (record.client_host, record.listen_host)
        )
    except ValueError:
        return ()
    if not all(isinstance(p, int) and 0 <= p <= 0xFFFF for p in ports):
        return ()
    return pair if pair[0].version == pair[1].version else ()


def v1(record: ConnectionRecord) -> bytes:
    """The version 1 (text) header: C{PROXY TCP4 ...}, or C{PROXY UNKNOWN}."""
    addresses = _addresses(record)
    if not addresses:
        return b"PROXY UNKNOWN\r\n"
    source, destination = addresses
    return (
        f"PROXY TCP{source.version} {source} {destination}"
        f" {record.client_port} {record.listen_port}\r\n"
    ).encode("ascii")


def _tlv(kind: int, value: str | bytes | None) -> bytes:
    """
    One type-length-value; none for no value, or for one over 1 KiB (what
    enters is shorter: so the header's length always fits in 16 bits).
    """
    if value is None:
        return b""
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    if len(data) > 1024:
        return b""
    return struct.pack("!BH", kind, len(data)) + data


def v2(record: ConnectionRecord) -> bytes:
    """
    The version 2 (binary) header: addresses (AF_UNSPEC when they are not
    IP), then TLVs: ALPN, AUTHORITY (the SNI name), UNIQUE_ID (the record's
    id), and SSL with its VERSION, CN (of a client certificate) and CIPHER
    sub-TLVs.  A TLV whose value
    the connection does not have is left out.
    """
    addresses = _addresses(record)
    family, body = 0x00, b""
    if addresses:
        source, destination = addresses
        family = _FAMILY[source.version]
        body = (
            source.packed
            + destination.packed
            + struct.pack("!HH", record.client_port, record.listen_port)
        )
    cert_flags = 0 if record.client_cert is None else PP2_CLIENT_CERT
    ssl = (
        # TLS, a client certificate or not; verify result 0: OK (a client
        # certificate that fails verification fails the handshake).
        struct.pack("!BI", PP2_CLIENT_SSL | cert_flags, 0)
        + _tlv(PP2_SUBTYPE_SSL_VERSION, record.tls_version)
        + _tlv(PP2_SUBTYPE_SSL_CN, record.client_cn)
        + _tlv(PP2_SUBTYPE_SSL_CIPHER, record.cipher)
    )
    body += (
        _tlv(PP2_TYPE_ALPN, record.alpn)
        + _tlv(PP2_TYPE_AUTHORITY, record.sni)
        + _tlv(PP2_TYPE_UNIQUE_ID, record.id)
        + _tlv(PP2_TYPE_SSL, ssl)
    )
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


ENCODERS: dict[str, HeaderEncoder] = {"v1": v1, "v2": v2}


# Receiving: the PROXY header a front balancer sends first (--listen haproxy:).

_V1_MAX = 107  # the longest v1 line, CRLF included


_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
Addresses = tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address]


def parse(data: bytes) -> tuple[int, Addresses | None] | None:
    """
    Read the PROXY header (v1 or v2) at the start of C{data}: C{None} while
    it is not whole; then its length and the client's and the proxied
    destination's addresses, or C{None} for addresses when the header has
    none to give (v1 C{UNKNOWN}, v2 C{LOCAL}, or a family other than TCP
    over IPv4 or IPv6): the connection's own addresses stand.  Every field
    is checked: addresses are IP addresses of the family named, ports are
    0 to 65535.

    @raise ValueError: C{data} does not start with a valid header.
    """
    if data[:12] == V2_SIGNATURE[: len(data)]:
        return _v2(data) if len(data) >= 16 else None
    if data[:6] != b"PROXY "[: len(data)]:
        raise ValueError("not a PROXY header")
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ValueError("no CRLF in a v1 header")
        return None
    fields = data[6:end].split(b" ")
    if fields[0] == b"UNKNOWN":
        return end + 2, None
    kind = {b"TCP4": IPv4Address, b"TCP6": IPv6Address}.get(fields[0])
    if kind is None or len(fields) != 5:
        raise ValueError("not a v1 TCP4, TCP6 or UNKNOWN line")
    hosts, ports = fields[1:3], fields[3:]
    if not all(_PORT.fullmatch(p) and int(p) <= 0xFFFF for p in ports):
        raise ValueError("not a port")
    if any(b"%" in h for h in hosts):
        raise ValueError("a scoped address")  # (the scope could be any text)
    source, destination = (h.decode() for h in hosts)
    return end + 2, _pair(kind, source, destination, int(ports[0]), int(ports[1]))


def _v2(data: bytes) -> tuple[int, Addresses | None] | None:
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command not in (0x20, _V2_PROXY):
        raise ValueError("not a v2 LOCAL or PROXY command")
    if len(data) < 16 + length:
        return None
    body = data[16 : 16 + length]
    kind = {0x11: IPv4Address, 0x21: IPv6Address}.get(family)
    if version_command == 0x20 or kind is None:
        return 16 + length, None
    size = 4 if kind is IPv4Address else 16
    if length < 2 * size + 4:
        raise ValueError("addresses cut short")
    ports = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return 16 + length, _pair(kind, body[:size], body[size : 2 * size], *ports)


def _pair(
    kind: type[IPv4Address | IPv6Address],
    source: str | bytes,
    destination: str | bytes,
    source_port: int,
    destination_port: int,
) -> Addresses:
    """Twisted's addresses for what a header gives, its IP addresses checked."""
    version = 4 if kind is IPv4Address else 6
    hosts = [ipaddress.ip_address(h) for h in (source, destination)]
    if any(h.version != version for h in hosts):
        raise ValueError("not an address of the family named")
    return (
        kind("TCP", str(hosts[0]), source_port),
        kind("TCP", str(hosts[1]), destination_port),
    )
