"""
Flow control, measured on real sockets on 127.0.0.1, through the service
that C{twistd tlsproxy} runs (L{proxy_service}): a reader that stops
reading makes the proxy hold a bounded number of bytes, whatever the other
side sends (bytes to relay, or TLS messages that make TLS answer, such as
KeyUpdates that ask for one), and every byte still arrives, in order.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tlsproxy import BackendTLS, ProxyConfig, proxy_service
from tlsproxy.flow import TLSProtocol
from tlsproxy.service import ProxyService

from .keyupdate import Flooder
from .memory import CA, leaf_certificates

TOTAL = 32 * 1024 * 1024  # bytes offered by the fast side
CHUNK = bytes(range(256)) * 256  # 64 KiB
BOUND = 300 * 1024  # what tlsproxy(8) promises per connection (docs/man)
FLOOD = 600_000  # KeyUpdates: 16 MB, far more than every buffer on the way


def buffered(transport: Any) -> int:
    """
    Bytes a Twisted TCP transport holds, not yet given to the kernel.  (Its
    attributes are Twisted's own: no public call tells.)
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def held(tls: TLSProtocol) -> int:
    """What the proxy holds toward C{tls}'s peer: its TCP buffer, its TLS layer's."""
    return (
        buffered(tls.transport)
        + sum(map(len, tls._aggregator._buffer))  # type: ignore[attr-defined]
        + sum(map(len, tls._appSendBuffer))
    )


@implementer(IPushProducer)
class Source(Protocol):
    """Writes TOTAL bytes as fast as its transport takes them, then closes."""

    def __init__(self) -> None:
        self.sent = 0
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < TOTAL:
            self.transport.write(CHUNK)
            self.sent += len(CHUNK)
        if self.sent >= TOTAL:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.paused = True


@implementer(IHandshakeListener)
class Sink(Protocol):
    """
    Reads nothing once connected (over TLS: once the handshake is done)
    until told to, then hashes everything until the end.
    """

    def __init__(self, tls: bool) -> None:
        self.tls = tls
        self.hash = hashlib.sha256()
        self.received = 0
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if not self.tls:
            self.transport.pauseProducing()

    def handshakeCompleted(self) -> None:
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended.callback(None)


class Closing(Protocol):
    """A backend that closes each connection at once."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


def expected_hash() -> str:
    h = hashlib.sha256()
    for _ in range(TOTAL // len(CHUNK)):
        h.update(CHUNK)
    return h.hexdigest()


def small_buffers(sock: socket.socket) -> socket.socket:
    """C{sock} with small kernel buffers, so that it fills soon."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return sock


class BoundTests(TestCase):
    """A slow reader on either side: bounded buffering, nothing lost."""

    timeout = 120

    def start(
        self, backend_port: int, scheme: str = "tcp", **config: Any
    ) -> ProxyService:
        """
        Run the shipped service on a free loopback port (L{port}) toward
        C{backend_port}.
        """
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        service = proxy_service(
            ProxyConfig(
                listen=f"tcp:{self.port}:interface=127.0.0.1",
                connect=f"{scheme}:127.0.0.1:{backend_port}",
                certificates=leaf_certificates(),
                **config,
            ),
            reactor,
            lambda record: None,
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @inlineCallbacks
    def relay(self, backend: Protocol, client: Protocol) -> Generator[Any, Any, Any]:
        """Listen for the backend, start the proxy, connect the client."""
        loopback = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        backend_port = yield loopback.listen(Factory.forProtocol(lambda: backend))
        self.addCleanup(backend_port.stopListening)
        self.service = self.start(backend_port.getHost().port)
        yield self.connect(client)

    def connect(self, client: Protocol) -> Deferred[Any]:
        trust = trustRootFromCertificates([Certificate.loadPEM(CA.cert_pem.bytes())])
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        return endpoint.connect(Factory.forProtocol(lambda: client))

    def proxy_side(self) -> TLSProtocol:
        [side] = list(self.service.relay.live)
        return side.transport  # type: ignore[return-value]

    @inlineCallbacks
    def settle(self, progress: Any) -> Generator[Any, Any, None]:
        """Wait until C{progress()} stops changing (the pipes are full)."""
        last, still = -1, 0
        for _ in range(300):
            yield deferLater(reactor, 0.05, lambda: None)
            now = progress()
            still = still + 1 if now == last else 0
            last = now
            if still >= 10:
                return
        raise AssertionError("the transfer never settled")

    @inlineCallbacks
    def test_slow_client(self) -> Generator[Any, Any, None]:
        """
        A client that stops reading while the backend sends 32 MiB makes
        the proxy hold at most BOUND bytes; then all arrive, in order.
        """
        source, sink = Source(), Sink(tls=True)
        yield self.relay(source, sink)
        yield self.settle(lambda: source.sent)
        self.assertTrue(source.paused)
        self.assertLess(source.sent, TOTAL)
        tls = self.proxy_side()
        backend = tls.wrappedProtocol._backend  # type: ignore[attr-defined]
        self.assertLessEqual(held(tls) + buffered(backend), BOUND)
        sink.transport.resumeProducing()
        yield sink.ended
        self.assertEqual(sink.received, TOTAL)
        self.assertEqual(sink.hash.hexdigest(), expected_hash())

    @inlineCallbacks
    def test_slow_backend(self) -> Generator[Any, Any, None]:
        """
        A backend that stops reading while the client sends 32 MiB makes
        the proxy hold at most BOUND bytes; then all arrive, in order.
        """
        sink, source = Sink(tls=False), Source()
        yield self.relay(sink, source)
        yield self.settle(lambda: source.sent)
        self.assertTrue(source.paused)
        self.assertLess(source.sent, TOTAL)
        tls = self.proxy_side()
        backend = tls.wrappedProtocol._backend  # type: ignore[attr-defined]
        self.assertLessEqual(buffered(backend) + held(tls), BOUND)
        sink.transport.resumeProducing()
        yield sink.ended
        self.assertEqual(sink.received, TOTAL)
        self.assertEqual(sink.hash.hexdigest(), expected_hash())

    @inlineCallbacks
    def test_key_update_flood(self) -> Generator[Any, Any, None]:
        """
        A client that sends KeyUpdates asking for one back, and never reads,
        is no longer read from once the answers fill the buffer toward it:
        it cannot send 16 MB of them, and the proxy holds at most BOUND.
        """
        yield self.flood_client(Protocol)

    @inlineCallbacks
    def test_key_update_flood_after_close(self) -> Generator[Any, Any, None]:
        """
        The same once the backend has closed and the proxy has sent its
        close_notify (OpenSSL still answers), while it waits for the
        client's.
        """
        yield self.flood_client(Closing)

    @inlineCallbacks
    def flood_client(self, backend: type[Protocol]) -> Generator[Any, Any, None]:
        """A KeyUpdate flood from a client that never reads, to C{backend}."""
        loopback = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        backend_port = yield loopback.listen(Factory.forProtocol(backend))
        self.addCleanup(backend_port.stopListening)
        self.service = self.start(backend_port.getHost().port)
        sock = small_buffers(socket.socket())
        sock.connect(("127.0.0.1", self.port))
        flooder = yield threads.deferToThread(Flooder, sock)
        self.addCleanup(flooder.close)
        yield threads.deferToThread(flooder.write, b"hello")
        yield self.settle(lambda: len(self.service.relay.live))
        sent = yield threads.deferToThread(flooder.flood, FLOOD)
        self.assertLess(sent, FLOOD)
        self.assertLessEqual(held(self.proxy_side()), BOUND)

    @inlineCallbacks
    def test_backend_key_update_flood(self) -> Generator[Any, Any, None]:
        """
        A TLS backend (C{--connect tls:}) that floods KeyUpdates and never
        reads is held the same way.
        """
        leaf = CA.issue_cert("127.0.0.1")
        directory = Path(self.mktemp())
        directory.mkdir()
        cert, key, ca = (
            directory / "cert.pem",
            directory / "key.pem",
            directory / "ca.pem",
        )
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        CA.cert_pem.write_to_path(str(ca))
        listening = small_buffers(socket.socket())
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        self.service = self.start(
            port, "tls", backend_tls=BackendTLS("127.0.0.1", str(ca))
        )

        def accept() -> Flooder:
            sock, _ = listening.accept()
            return Flooder(small_buffers(sock), str(cert), str(key))

        accepted = threads.deferToThread(accept)
        client = Sink(tls=True)
        yield self.connect(client)
        flooder = yield accepted
        self.addCleanup(flooder.close)
        sent = yield threads.deferToThread(flooder.flood, FLOOD)
        self.assertLess(sent, FLOOD)
        backend = self.proxy_side().wrappedProtocol._backend  # type: ignore[attr-defined]
        self.assertIsInstance(backend, TLSProtocol)
        self.assertLessEqual(held(backend), BOUND)
