"""
What a client presents (addresses, server name, certificate), read and
checked in one place for the allow list, the record and the PROXY header.
"""

from __future__ import annotations

import os
import re

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IAddress
from zope.interface import implementer

_CN_MOST = 64  # characters in a CN, at most (RFC 5280's ub-common-name)


@attrs.frozen
class ClientIdentity:
    """
    A client certificate's C{subject}, escaped; C{cn}, its only CN, printable,
    of 64 characters at most; C{names}: its CN, OUs, DNS names and URIs.
    """

    subject: str
    cn: str | None
    names: frozenset[tuple[str, str]]


def client_identity(certificate: x509.Certificate | None) -> ClientIdentity | None:
    """The identity of a client certificate, or C{None} without one."""
    if certificate is None:
        return None
    subject = certificate.subject
    cns = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    one = cns[0] if len(cns) == 1 else ""
    cn = one if one.isprintable() and 0 < len(one) <= _CN_MOST else None
    names = {("cn", cn)} if cn is not None else set()
    ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    names |= {("ou", str(a.value)) for a in ous}
    try:
        alternative = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        pass
    else:
        names |= {("dns", n) for n in alternative.get_values_for_type(x509.DNSName)}
        uris = alternative.get_values_for_type(x509.UniformResourceIdentifier)
        names |= {("uri", n) for n in uris}
    return ClientIdentity(printable(subject.rfc4514_string()), cn, frozenset(names))


# A host name as RFC 6066 sends it: letters, digits, '-' and '_' in labels of
# 1 to 63, joined by single dots, no trailing dot, 253 at most.
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*", re.A)


def server_name(connection: SSL.Connection) -> str | None:
    """The client's server name, lower case: None if none, C{""} if not a host name."""
    sent = connection.get_servername()
    if sent is None:
        return None
    name = sent.decode("ascii", "replace").lower()
    return name if _HOST_NAME.fullmatch(name) else ""


def printable(text: str) -> str:
    """C{text} with line breaks and other control characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@implementer(IAddress)
@attrs.frozen
class Proxied:
    """A client's address from a balancer's PROXY header (None: none yet), its own."""

    client: IAddress | None
    balancer: IAddress


def host_port(address: IAddress | None) -> tuple[str | None, int | None]:
    """An address's host and port; a UNIX socket's: its path, no port."""
    port = getattr(address, "port", None)
    host = getattr(address, "host", getattr(address, "name", None))
    return (None if host is None else os.fsdecode(host)), port


def client_address(peer: IAddress) -> dict[str, str | int | None]:
    """The record's client and balancer fields for a connection's C{peer}."""
    client, balancer = peer, None
    if isinstance(peer, Proxied):
        client, balancer = peer.client or peer.balancer, peer.balancer
    fields = ("client_host", "client_port", "balancer_host", "balancer_port")
    return dict(zip(fields, (*host_port(client), *host_port(balancer)), strict=True))


def backend_address(local: IAddress, peer: IAddress) -> dict[str, str | int | None]:
    """The record's backend fields: where tlsproxy is on it, and where it is."""
    fields = (
        "backend_local_host",
        "backend_local_port",
        "backend_host",
        "backend_port",
    )
    return dict(zip(fields, (*host_port(local), *host_port(peer)), strict=True))


def without_header(peer: IAddress) -> bool:
    """Whether C{peer} is behind a balancer that sent no valid PROXY header."""
    return isinstance(peer, Proxied) and peer.client is None


def tls_facts(
    connection: SSL.Connection,
) -> tuple[dict[str, str | None], ClientIdentity | None]:
    """The record's TLS fields once the handshake is done, and the identity."""
    identity = client_identity(connection.get_peer_certificate(as_cryptography=True))
    alpn = connection.get_alpn_proto_negotiated()  # (one of ours: ASCII)
    facts = {
        "tls_version": connection.get_protocol_version_name(),
        "cipher": connection.get_cipher_name(),
        "sni": server_name(connection) or None,
        "alpn": alpn.decode("ascii") if alpn else None,
        "client_cert": identity.subject if identity else None,
        "client_cn": identity.cn if identity else None,
    }
    return facts, identity
