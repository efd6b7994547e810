"""
The way to the backend: its endpoint, the PROXY header first, in clear, and
for C{--connect tls:} TLS, connected once verified.
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
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
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
    A TLS backend's certificate is for C{host} (name or IP), from a CA of
    C{ca_path} (None: the platform's); ConfigError if it holds none.
    """

    def __init__(self, host: str, ca_path: str | None = None) -> None:
        self.host, self.ca_path = host, ca_path
        try:
            self._address: str | None = str(ipaddress.ip_address(host))
        except ValueError:
            self._address = None
        self._context = self._load()

    def reload(self) -> None:
        """Read C{ca_path} again (ConfigError: bad, the trust in use stays)."""
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
        """L{BackendTLSError} unless C{connection}'s certificate is for C{host}."""
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


class Receiver(typing.Protocol):
    """What the backend's side hands its bytes and its end to: the relay."""

    def backend_data(self, data: bytes) -> None: ...

    def backend_lost(self, reason: Failure) -> None: ...


class BackendSide(Protocol):
    """
    The backend's side: C{header} first, then bytes to and from C{receiver};
    C{ready} fires with its transport once connected, or fails with why not.
    """

    def __init__(self, receiver: Receiver, header: bytes) -> None:
        self._receiver, self._header = receiver, header
        self.ready: Deferred[Transport] = Deferred(self._cancel)
        self.connecting: Deferred[typing.Any] = Deferred()  # (the endpoint's)
        self._verified = False  # for TLS: the handshake verified the backend

    @override
    def connectionMade(self) -> None:
        self.transport.write(self._header)  # type: ignore[union-attr]
        self.ready.callback(self.transport)  # type: ignore[arg-type]

    def failed(self, reason: Failure) -> None:
        """The endpoint failed (or was cancelled by C{ready}): C{ready} says why."""
        self.ready.errback(reason)

    def _cancel(self, ready: object) -> None:
        if self.transport is None:
            self.connecting.cancel()
        else:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    @override
    def dataReceived(self, data: bytes) -> None:
        self._receiver.backend_data(data)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._receiver.backend_lost(reason)


@implementer(IHandshakeListener)
class _Verified(BackendSide):
    """
    A L{BackendSide} under TLS: the header below it, before the ClientHello;
    C{ready} fires once verified (a loss before that fails it).
    """

    transport: TLSMemoryBIOProtocol

    def __init__(self, receiver: Receiver, header: bytes, tls: BackendTLS) -> None:
        super().__init__(receiver, header)
        self._tls = tls

    @override
    def connectionMade(self) -> None:
        self.transport.transport.write(self._header)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        try:
            self._tls.verify(self.transport.getHandle())
        except BackendTLSError:
            self.ready.errback()
            self.transport.abortConnection()
            return
        self._verified = True
        self.ready.callback(self.transport)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._verified:
            clean = typing.cast(CountingConnection, self.transport.getHandle()).closed()
            super().connectionLost(connectionDone if clean else reason)
        elif not self.ready.called:  # (else told already: cancelled, refused)
            if reason.check(SSL.Error):
                why = openssl_reasons(reason.value)  # type: ignore[arg-type]
                reason = Failure(BackendTLSError(why))
            self.ready.errback(reason)


class Backend:
    """The backend: the C{tcp} endpoint, TLS on top if C{tls}; C{clock} for TLS."""

    def __init__(
        self, tcp: IStreamClientEndpoint, tls: BackendTLS | None, clock: IReactorTime
    ) -> None:
        self._tcp, self._tls, self._clock = tcp, tls, clock

    def connect(self, receiver: Receiver, header: bytes) -> Deferred[Transport]:
        """A L{BackendSide}'s C{ready}, for C{receiver}, C{header} first."""
        tls = self._tls
        side = (
            BackendSide(receiver, header)
            if tls is None
            else _Verified(receiver, header, tls)
        )
        factory: IProtocolFactory = Factory.forProtocol(lambda: side)
        factory.noisy = False  # type: ignore[attr-defined]
        if tls is not None:
            factory = TLSMemoryBIOFactory(tls, True, factory, self._clock)
            factory.protocol = TLSProtocol
        side.connecting = self._tcp.connect(factory)
        side.connecting.addErrback(side.failed)
        return side.ready
