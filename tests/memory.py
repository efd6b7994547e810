"""
In-memory TLS clients and backends for unit tests of the proxy pair: real
TLS handshakes over Twisted's iosim transports, one shared clock.
"""

from __future__ import annotations

from typing import Any

import trustme
from cryptography import x509
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate as TwistedCertificate
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from tlsproxy.backend import Backend, BackendTLS
from tlsproxy.context import DEFAULT_POLICY, Certificates
from tlsproxy.credentials import Credentials, Identity
from tlsproxy.listen import Admission, SharedLimit, accepting, behind_balancer_factory
from tlsproxy.proxyheader import HeaderEncoder, no_header
from tlsproxy.record import ConnectionRecord
from tlsproxy.relay import RelayFactory
from tlsproxy.values import AllowList, Limits, ProxyConfig, Timeouts, TLSPolicy

DEFAULTS = Timeouts()
ANY_CERTIFICATE = AllowList()
CA = trustme.CA()
LEAF = CA.issue_cert("localhost", "127.0.0.1")


def identity(leaf: trustme.LeafCert = LEAF) -> Identity:
    """The test CA's C{leaf} certificate ("localhost" by default)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    chain = [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return Identity(tuple(chain), key, "test")


def leaf_certificates(
    policy: TLSPolicy = DEFAULT_POLICY,
    client_cas: tuple[x509.Certificate, ...] = (),
    leaves: tuple[trustme.LeafCert, ...] = (LEAF,),
    strict: bool = False,
) -> Certificates:
    """
    Certificates for the test CA's C{leaves} (the first is the default),
    requiring client certificates signed by C{client_cas}, if any.
    """
    made = Credentials(tuple(identity(leaf) for leaf in leaves), client_cas)
    return Certificates(lambda: made, policy, strict)


@implementer(ITCPTransport)
class Transport(iosim.FakeTransport):  # type: ignore[misc]
    """
    iosim's transport, with what the relay's contract is about: an abort is
    reported as one (to both ends) and drops unsent bytes, as TCP's does,
    and pausing and Nagle's algorithm are visible.
    """

    peer: Transport
    aborted = False
    paused = False
    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        self.stream = []
        self.disconnectReason = ConnectionAborted()
        self.peer.disconnectReason = ConnectionLost()
        super().abortConnection()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


def connect(
    server: IProtocol,
    client: IProtocol,
    clock: Clock,
    server_address: IPv4Address,
    client_address: IPv4Address,
    preamble: bytes = b"",
) -> iosim.IOPump:
    """
    Connect two protocols in memory, the client's first bytes being
    C{preamble}; the pump is not run yet.
    """
    server_io = Transport(server, True, server_address, client_address)
    client_io = Transport(client, False, client_address, server_address)
    server_io.peer, client_io.peer = client_io, server_io
    client_io.write(preamble)
    return iosim.connect(server, server_io, client, client_io, greet=False, clock=clock)


class Recorder(Protocol):
    """A peer that keeps what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


@implementer(IStreamClientEndpoint)
class Endpoint:
    """A backend endpoint whose connection attempts the test completes."""

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(d: Deferred[IProtocol]) -> None:
            self.cancelled += 1

        attempt: Deferred[IProtocol] = Deferred(cancel)
        self.attempts.append((factory, attempt))
        return attempt


class Pair:
    """
    One TLS client connected in memory to the proxy's server side, with the
    proxy's backend endpoint under the test's control.
    """

    CLIENT = IPv4Address("TCP", "192.0.2.7", 50123)
    LISTEN = IPv4Address("TCP", "127.0.0.1", 8443)
    BACKEND_LOCAL = IPv4Address("TCP", "127.0.0.2", 40001)
    BACKEND = IPv4Address("TCP", "127.0.0.3", 8080)

    def __init__(
        self,
        timeouts: Timeouts = DEFAULTS,
        header: HeaderEncoder = no_header,
        balancer: bytes | None = None,
        policy: TLSPolicy = DEFAULT_POLICY,
        allow: AllowList = ANY_CERTIFICATE,
        client_cas: tuple[x509.Certificate, ...] = (),
        certificates: Certificates | None = None,
        backend_tls: BackendTLS | None = None,
        **client_options: Any,
    ) -> None:
        """
        @param balancer: if given, the proxy listens behind a front balancer
            (C{haproxy:}), and the client sends these bytes (a PROXY header)
            before TLS.
        """
        self.clock = Clock()
        self.records: list[ConnectionRecord] = []
        self.endpoint = Endpoint()
        certificates = certificates or leaf_certificates(policy, client_cas)
        config = ProxyConfig(
            listen="tcp:0",
            connect="tls:h:1" if backend_tls else "tcp:h:1",
            certificates=certificates,
            backend_tls=backend_tls,
            timeouts=timeouts,
            service="test",
            header=header,
            allow=allow,
        )
        relay = RelayFactory(
            config,
            Backend(self.endpoint, backend_tls, self.clock),
            Admission("test", Limits(), SharedLimit(), self.clock),
            self.clock,
            self.records.append,
        )
        server_factory = accepting(relay, certificates, self.clock)
        trust = trustRootFromCertificates(
            [TwistedCertificate.loadPEM(CA.cert_pem.bytes())]
        )
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trust, **client_options),
            True,
            Factory.forProtocol(Recorder),
            self.clock,
        )
        listening = server_factory
        if balancer is not None:
            listening = behind_balancer_factory(server_factory)
        self.server = listening.buildProtocol(self.CLIENT)
        self.client_tls = client_factory.buildProtocol(self.LISTEN)
        self.client: Recorder = self.client_tls.wrappedProtocol
        self.pump = connect(
            self.server,
            self.client_tls,
            self.clock,
            self.LISTEN,
            self.CLIENT,
            balancer or b"",
        )
        self.backend = Recorder()
        self.backend_pump: iosim.IOPump | None = None

    @property
    def server_io(self) -> Transport:
        return self.pump.serverIO  # type: ignore[no-any-return]

    def connect_backend(self) -> None:
        """Complete the proxy's (single) backend connection attempt."""
        factory, attempt = self.endpoint.attempts[0]
        proxy_side = factory.buildProtocol(self.BACKEND)
        assert proxy_side is not None
        self.backend_pump = connect(
            self.backend, proxy_side, self.clock, self.BACKEND, self.BACKEND_LOCAL
        )
        attempt.callback(proxy_side)

    @property
    def backend_io(self) -> Transport:
        assert self.backend_pump is not None
        return self.backend_pump.clientIO  # type: ignore[no-any-return]

    def flush(self) -> None:
        """Move bytes on both connections until nothing moves."""
        flush(self.pump, self.backend_pump)


def flush(pump: iosim.IOPump, backend_pump: iosim.IOPump | None) -> None:
    """Move bytes on the client's and the backend's (if any) connections."""
    for _ in range(100):
        moved = pump.flush()
        if backend_pump is not None:
            moved = backend_pump.flush() or moved
        if not moved:
            return
    raise AssertionError("still moving after 100 rounds")
