"""
PROXY protocol headers (HAProxy's doc/proxy-protocol.txt): made for the
backend from the record, and read, checked, from a front balancer.
"""

from __future__ import annotations

import ipaddress
import re
import struct
import typing
from collections.abc import Callable

from twisted.internet.address import IPv4Address, IPv6Address

from .record import ConnectionRecord

HeaderEncoder = Callable[[ConnectionRecord], bytes]
Addresses = tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address]
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_SSL, PP2_SUBTYPE_SSL_CN = 0x20, 0x22


def no_header(record: ConnectionRecord) -> bytes:
    """Nothing before the client's bytes."""
    return b""


def _addresses(record: ConnectionRecord) -> list[typing.Any]:
    """The client's and listening IP addresses, if of one version; scopes dropped."""
    ports = (record.client_port, record.listen_port)
    try:
        pair = [
            ipaddress.ip_address((host or "").partition("%")[0])
            for host in (record.client_host, record.listen_host)
        ]
    except ValueError:
        return []
    if not all(isinstance(p, int) and 0 <= p <= 0xFFFF for p in ports):
        return []
    return pair if pair[0].version == pair[1].version else []


def v1(record: ConnectionRecord) -> bytes:
    """The text header: C{PROXY TCP4 ...}, or C{PROXY UNKNOWN}."""
    if not (addresses := _addresses(record)):
        return b"PROXY UNKNOWN\r\n"
    source, destination = addresses
    return (
        f"PROXY TCP{source.version} {source} {destination}"
        f" {record.client_port} {record.listen_port}\r\n"
    ).encode("ascii")


def _tlv(kind: int, value: str | bytes | None) -> bytes:
    """A TLV; none for no value or one over 1 KiB (the length stays 16 bits)."""
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    if data is None or len(data) > 1024:
        return b""
    return struct.pack("!BH", kind, len(data)) + data


def v2(record: ConnectionRecord) -> bytes:
    """
    The binary header: the addresses (or AF_UNSPEC), then the TLVs it has
    values for: ALPN, AUTHORITY, UNIQUE_ID, SSL (VERSION, CN, CIPHER).
    """
    family, body = 0x00, b""
    if addresses := _addresses(record):
        source, destination = addresses
        family = {4: 0x11, 6: 0x21}[source.version]  # TCP over IPv4, IPv6
        ports = struct.pack("!HH", record.client_port, record.listen_port)
        body = source.packed + destination.packed + ports
    # PP2_CLIENT_SSL, and _CERT_CONN | _CERT_SESS; verify result 0: OK (a
    # client certificate that fails verification fails the handshake).
    flags = 0x01 if record.client_cert is None else 0x07
    ssl = struct.pack("!BI", flags, 0) + b"".join(
        _tlv(kind, value)
        for kind, value in [
            (0x21, record.tls_version),
            (PP2_SUBTYPE_SSL_CN, record.client_cn),
            (0x23, record.cipher),
        ]
    )
    body += b"".join(
        _tlv(kind, value)
        for kind, value in [
            (0x01, record.alpn),
            (0x02, record.sni),
            (0x05, record.id),
            (PP2_TYPE_SSL, ssl),
        ]
    )
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


ENCODERS: dict[str, HeaderEncoder] = {"v1": v1, "v2": v2}
_V1_MAX = 107  # the longest v1 line, CRLF included
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


def parse(data: bytes) -> tuple[int, Addresses | None] | None:
    """
    The header C{data} starts with: None while incomplete, then its length and
    addresses (None: none given); ValueError if it is not a valid one.
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
    return end + 2, _pair(kind, [h.decode() for h in hosts], [int(p) for p in ports])


def _v2(data: bytes) -> tuple[int, Addresses | None] | None:
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command not in (0x20, 0x21):  # version 2: LOCAL, PROXY
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
    return 16 + length, _pair(kind, [body[:size], body[size : 2 * size]], ports)


def _pair(
    kind: type[IPv4Address | IPv6Address],
    hosts: typing.Sequence[str | bytes],
    ports: typing.Sequence[int],
) -> Addresses:
    """Twisted's source and destination addresses of a header, checked."""
    version = 4 if kind is IPv4Address else 6
    ips = [ipaddress.ip_address(h) for h in hosts]
    if any(ip.version != version for ip in ips):
        raise ValueError("not an address of the family named")
    return kind("TCP", str(ips[0]), ports[0]), kind("TCP", str(ips[1]), ports[1])
