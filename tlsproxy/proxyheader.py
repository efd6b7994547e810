"""
PROXY protocol headers for the backend (HAProxy's doc/proxy-protocol.txt):
the client's address and, in version 2, the TLS facts, sent before any
client byte.  Each encoder takes the connection record as it is when the
backend connects.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

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
    same version; else none (a UNIX socket, say).  An IPv6 scope
    (C{fe80::1%eth0}) is dropped: the header has no room for it.
    """
    try:
        pair = tuple(
            ipaddress.ip_address((host or "").partition("%")[0])
            for host in (record.client_host, record.listen_host)
        )
    except ValueError:
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
    if value is None:
        return b""
    data = value.encode("utf-8") if isinstance(value, str) else value
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
