"""
The way to the backend: its endpoint (C{--connect}), the PROXY header that
goes first, in clear, and TLS on top for C{--connect tls:HOST:PORT}: TCP
(so C{bindAddress} and C{timeout} work as for C{tcp:}), then a handshake
that verifies the certificate, against C{--backend-ca} or the platform's
trust, and its name, HOST.  A TLS backend counts as connected only once it
is verified: the relay's connect timeout covers the handshake, and a backend
that fails verification is a failed connect with a one-line reason.
"""

from __future__ import annotations

import ipaddress
import typing

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from .context import openssl_reasons
from .credentials import load_cas
from .flow import CountingConnection, TLSProtocol, Transport


@implementer(IOpenSSLClientConnectionCreator)
class BackendTLS:
    """
    What a TLS backend must prove: a certificate for C{host} (a DNS name or
    an IP address) from a CA in C{ca_path} (C{--backend-ca}), or from the
    platform's trust when C{None}.  tlsproxy offers TLS 1.2 or later, SNI
    for a name, no ALPN.  Each connection starts with the trust current then.

    @raise ConfigError: C{ca_path} cannot be read or has no certificate.
    """

    def __init__(self, host: str, ca_path: str | None = None) -> None:
        self.host = host
        self.ca_path = ca_path
        try:
            self._address: str | None = str(ipaddress.ip_address(host))
        except ValueError:
            self._address = None
        self._context = self._load()

    def reload(self) -> None:
        """
        Read C{ca_path} again, for new connections.  The platform's CAs are
        not read again: in a jail they are not there.

        @raise ConfigError: the file is now bad; the trust in use stays.
        """
        if self.ca_path is not None:
            self._context = self._load()

    def _load(self) -> SSL.Context:
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

    def clientConnectionForTLS(self, tls: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = CountingConnection(self._context, None)
        if self._address is None:
            connection.set_tlsext_host_name(self.host.encode("idna"))
        connection.set_connect_state()
        return connection

    def verify(self, connection: SSL.Connection) -> None:
        """
        Check that the (chain-verified) certificate of C{connection} is for
        C{host}.

        @raise BackendTLSError: it is not.
        """
        certificate = connection.get_peer_certificate(as_cryptography=True)
        assert certificate is not None  # (VERIFY_PEER)
        try:
            if self._address is None:
                verify_certificate_hostname(certificate, self.host)
            else:
                verify_certificate_ip_address(certificate, self._address)
        except (VerificationError, CertificateError):
            raise BackendTLSError(f"certificate is not for {self.host}") from None


class BackendTLSError(Exception):
    """The backend's TLS handshake failed; C{str()} is one line why."""


@implementer(IHandshakeListener)
class _Verifying(Protocol):
    """
    Between the TLS layer and the relay's protocol, C{inner}, which is
    connected at once; C{ready} fires with it once the handshake has
    verified the backend.  A loss before that errbacks C{ready} with a
    L{BackendTLSError} (or the connection's failure) and does not reach
    C{inner}; cancelling C{ready} aborts.
    """

    transport: TLSMemoryBIOProtocol

    def __init__(self, inner: IProtocol, tls: BackendTLS) -> None:
        self._inner = inner
        self._tls = tls
        self._verified = False
        self._failure: Failure | None = None
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)

    @override
    def connectionMade(self) -> None:
        self._inner.makeConnection(self.transport)

    def handshakeCompleted(self) -> None:
        try:
            self._tls.verify(self.transport.getHandle())
        except BackendTLSError:
            self._failure = Failure()
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
            if reason.check(SSL.Error):
                why = openssl_reasons(reason.value)  # type: ignore[arg-type]
                reason = Failure(BackendTLSError(why))
            self.ready.errback(self._failure or reason)

    def _cancel(self, ready: Deferred[IProtocol]) -> None:
        self.transport.abortConnection()


class _VerifyingFactory(Factory):
    """Builds a L{_Verifying} around each protocol of C{factory}."""

    noisy = False

    def __init__(self, factory: IProtocolFactory, tls: BackendTLS) -> None:
        self._factory, self._tls = factory, tls

    @override
    def buildProtocol(self, addr: object) -> _Verifying:
        return _Verifying(self._factory.buildProtocol(addr), self._tls)  # type: ignore[arg-type]


class _Header(ProtocolWrapper):
    """Writes the PROXY header, in clear, before anything above writes."""

    factory: _HeaderFactory

    @override
    def makeConnection(self, transport: ITransport) -> None:
        transport.write(self.factory.header)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]


class _HeaderFactory(WrappingFactory[_Header]):
    protocol = _Header
    noisy = False

    def __init__(self, factory: IProtocolFactory, header: bytes) -> None:
        super().__init__(factory)  # type: ignore[no-untyped-call]
        self.header = header


class Receiver(typing.Protocol):
    """What the backend's side of a pair hands on: the relay's client side."""

    def backend_data(self, data: bytes) -> None: ...

    def backend_lost(self, reason: Failure) -> None: ...


class BackendSide(Protocol):
    """The backend's side of a pair: what it receives goes to C{receiver}."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    @override
    def dataReceived(self, data: bytes) -> None:
        self._receiver.backend_data(data)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._receiver.backend_lost(reason)


class Backend:
    """
    The backend: C{tcp}, an endpoint, with TLS on top when C{tls} is given
    (the endpoint of C{--connect tls:...}); C{clock} times the TLS layer.
    """

    def __init__(
        self, tcp: IStreamClientEndpoint, tls: BackendTLS | None, clock: IReactorTime
    ) -> None:
        self._tcp, self._tls, self._clock = tcp, tls, clock

    def connect(self, receiver: Receiver, header: bytes) -> Deferred[Transport]:
        """
        Connect a backend side for C{receiver}, after C{header}; the
        L{Deferred} fires with its transport once it is connected (for TLS:
        verified), or fails.
        """
        tls = self._tls
        below: IProtocolFactory = Factory.forProtocol(lambda: BackendSide(receiver))
        below.noisy = False  # type: ignore[attr-defined]
        if tls is not None:
            verifying = _VerifyingFactory(below, tls)
            below = TLSMemoryBIOFactory(tls, True, verifying, self._clock)
            below.protocol = TLSProtocol
        if header:
            below = _HeaderFactory(below, header)
        connected: Deferred[typing.Any] = self._tcp.connect(below)
        if header:
            connected.addCallback(lambda wrapper: wrapper.wrappedProtocol)
        if tls is not None:
            connected.addCallback(lambda protocol: protocol.wrappedProtocol.ready)
        return connected.addCallback(lambda side: side.transport)
