"""
TLS toward the backend: C{--connect tls:HOST:PORT} connects over TCP (so
C{bindAddress} and C{timeout} work as for C{tcp:}), then verifies the
backend's certificate, against C{--backend-ca} or the platform's trust, and
its name, HOST, with service_identity.

A backend connection counts as made (the endpoint's L{Deferred} fires) only
once its handshake has verified it: the relay's connect timeout covers the
handshake, the client's bytes wait until then, and a backend that fails
verification is a failed connect, with a one-line reason.  A PROXY header
goes in clear before the ClientHello (see L{tlsproxy.relay}), as HAProxy's
C{send-proxy} does with C{ssl}.
"""

from __future__ import annotations

import ipaddress

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import _parse, clientFromString
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from .tls import CountingConnection, TLSProtocol, load_cas, openssl_reasons

TLS_PREFIX = "tls:"


def client_from_string(reactor: object, text: str) -> IStreamClientEndpoint:
    """
    Twisted's C{clientFromString}, but C{tls:...} is read as C{tcp:...}:
    the TLS goes on top in L{TLSEndpoint} (Twisted's own C{tls:} endpoint is
    not used).
    """
    if text.startswith(TLS_PREFIX):
        text = "tcp:" + text[len(TLS_PREFIX) :]
    endpoint: IStreamClientEndpoint = clientFromString(reactor, text)
    return endpoint


def host_of(connect: str) -> str:
    """The host of a C{--connect} string that L{client_from_string} took."""
    args, kwargs = _parse(connect)
    return str(kwargs.get("host") or args[1])


@implementer(IOpenSSLClientConnectionCreator)
class BackendTLS:
    """
    What a TLS backend must prove: a certificate for C{host} (a DNS name or
    an IP address) from a CA in C{ca_path} (C{--backend-ca}), or from the
    platform's trust when C{None}.  The client offers TLS 1.2 or later, SNI
    (for a name) and no ALPN.  Each connection starts with the trust
    current then.
    """

    def __init__(self, host: str, ca_path: str | None = None) -> None:
        """@raise ConfigError: C{ca_path} cannot be read or has no certificate."""
        self.host = host
        self.ca_path = ca_path
        try:
            self._address: str | None = str(ipaddress.ip_address(host))
        except ValueError:
            self._address = None
        self._context = self._load()

    def reload(self) -> None:
        """
        Re-read C{ca_path} and verify new connections with it (those under
        way are not disturbed).  The platform's CAs are not re-read: in a
        jail they are not there.

        @raise ConfigError: the file is now unreadable or has no
            certificate; the trust in use stays.
        """
        if self.ca_path is not None:
            self._context = self._load()

    def _load(self) -> SSL.Context:
        """A client context that verifies the chain (the name: L{verify})."""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        context.set_verify(SSL.VERIFY_PEER)
        if self.ca_path is None:
            context.set_default_verify_paths()  # (read now, before the chroot)
        else:
            store = context.get_cert_store()
            assert store is not None
            for ca in load_cas("--backend-ca", self.ca_path):
                store.add_cert(crypto.X509.from_cryptography(ca))
        return context

    def clientConnectionForTLS(
        self, tls_protocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        connection = CountingConnection(self._context, None)
        if self._address is None:
            connection.set_tlsext_host_name(self.host.encode("idna"))
        connection.set_connect_state()
        return connection

    def verify(self, connection: SSL.Connection) -> None:
        """
        Check that the verified certificate of C{connection} is for C{host}.

        @raise VerificationError: it is not.
        @raise CertificateError: it names no host at all.
        """
        certificate = connection.get_peer_certificate(as_cryptography=True)
        assert certificate is not None  # (verified: VERIFY_PEER)
        if self._address is None:
            verify_certificate_hostname(certificate, self.host)
        else:
            verify_certificate_ip_address(certificate, self._address)


class BackendTLSError(Exception):
    """The backend's TLS handshake failed; C{str()} is one line why."""


@implementer(IHandshakeListener)
class _Verifying(Protocol):
    """
    Between the TLS layer and the relay's protocol, C{inner}.  C{inner} is
    connected at once, so that it can write in clear (under the TLS layer)
    before the ClientHello; C{ready} fires with it once the handshake has
    verified the backend, its chain and its name.  A loss before that
    errbacks C{ready} with a L{BackendTLSError} and does not reach
    C{inner}; cancelling C{ready} aborts.
    """

    transport: TLSMemoryBIOProtocol

    def __init__(self, inner: IProtocol, tls: BackendTLS) -> None:
        self._inner = inner
        self._tls = tls
        self._verified = False
        self._failure: Exception | None = None
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)

    @override
    def connectionMade(self) -> None:
        self._inner.makeConnection(self.transport)

    def handshakeCompleted(self) -> None:
        try:
            self._tls.verify(self.transport.getHandle())
        except (VerificationError, CertificateError):
            self._failure = BackendTLSError(f"certificate is not for {self._tls.host}")
            self.transport.abortConnection()
            return
        self._verified = True
        self.ready.callback(self._inner)

    @override
    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._verified:
            self._inner.connectionLost(reason)
        elif not self.ready.called:  # (cancelled: already told)
            self.ready.errback(self._failure or _why(reason))

    def _cancel(self, ready: Deferred[IProtocol]) -> None:
        self.transport.abortConnection()


def _why(reason: Failure) -> Failure:
    """A handshake's failure as a L{BackendTLSError} with a short reason."""
    if reason.check(SSL.Error):
        return Failure(BackendTLSError(openssl_reasons(reason.value)))  # type: ignore[arg-type]
    return reason


class _VerifyingFactory(Factory):
    """Builds a L{_Verifying} around each protocol of C{factory}."""

    noisy = False

    def __init__(self, factory: IProtocolFactory, tls: BackendTLS) -> None:
        self._factory = factory
        self._tls = tls

    @override
    def buildProtocol(self, addr: object) -> _Verifying:
        inner = self._factory.buildProtocol(addr)  # type: ignore[arg-type]
        assert inner is not None
        return _Verifying(inner, self._tls)


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """
    C{tcp}, then TLS verified as C{tls} says; C{connect}'s L{Deferred} fires
    once the backend is verified, or fails with a L{BackendTLSError} (or the
    TCP connection's failure).
    """

    def __init__(
        self, tcp: IStreamClientEndpoint, tls: BackendTLS, clock: IReactorTime
    ) -> None:
        self._tcp = tcp
        self._tls = tls
        self._clock = clock

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        verifying = _VerifyingFactory(factory, self._tls)
        tls = TLSMemoryBIOFactory(self._tls, True, verifying, self._clock)
        tls.protocol = TLSProtocol
        return self._tcp.connect(tls).addCallback(_ready)


def _ready(tls: IProtocol) -> Deferred[IProtocol]:
    return tls.wrappedProtocol.ready  # type: ignore[attr-defined, no-any-return]


def backend_endpoint(
    reactor: object, connect: str, tls: BackendTLS | None
) -> IStreamClientEndpoint:
    """
    The backend's endpoint: C{connect} as L{client_from_string} reads it,
    with TLS on top if C{tls} is given.

    @raise ValueError: C{tls} is given without a C{tls:} endpoint, or a
        C{tls:} endpoint without it; or C{connect} is not understood.
    """
    if (tls is not None) != connect.startswith(TLS_PREFIX):
        raise ValueError(f"{connect}: backend_tls goes with a tls: endpoint only")
    tcp = client_from_string(reactor, connect)
    return tcp if tls is None else TLSEndpoint(tcp, tls, reactor)  # type: ignore[arg-type]
