"""
Flow control, measured on real sockets on 127.0.0.1: a reader that stops
reading makes the proxy hold a bounded number of bytes, whatever the other
side has to send, and every byte still arrives, in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
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
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tlsproxy.relay import RelayFactory, Timeouts
from tlsproxy.tls import ServerTLS

from .memory import CA, leaf_certificates

TOTAL = 32 * 1024 * 1024  # bytes offered by the fast side
CHUNK = bytes(range(256)) * 256  # 64 KiB
BOUND = 300 * 1024  # what README.rst promises per connection


def buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds, not yet given to the kernel."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


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


def expected_hash() -> str:
    h = hashlib.sha256()
    for _ in range(TOTAL // len(CHUNK)):
        h.update(CHUNK)
    return h.hexdigest()


class BoundTests(TestCase):
    """A slow reader on either side: bounded buffering, nothing lost."""

    timeout = 120

    @inlineCallbacks
    def relay(self, backend: Protocol, client: Protocol) -> Generator[Any, Any, Any]:
        """Listen for the backend, start the proxy, connect the client."""
        loopback = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        backend_port = yield loopback.listen(Factory.forProtocol(lambda: backend))
        self.addCleanup(backend_port.stopListening)
        relay = RelayFactory(
            connect=TCP4ClientEndpoint(
                reactor, "127.0.0.1", backend_port.getHost().port
            ),
            clock=reactor,
            observe=lambda record: None,
            timeouts=Timeouts(),
            service="test",
        )
        self.tls = TLSMemoryBIOFactory(ServerTLS(leaf_certificates()), False, relay)
        proxy_port = yield loopback.listen(self.tls)
        self.addCleanup(proxy_port.stopListening)
        trust = trustRootFromCertificates([Certificate.loadPEM(CA.cert_pem.bytes())])
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port.getHost().port),
        )
        yield endpoint.connect(Factory.forProtocol(lambda: client))

    def proxy_side(self) -> Any:
        [tls] = list(self.tls.protocols)
        return tls

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
        held = (
            buffered(tls.transport)
            + sum(map(len, tls._aggregator._buffer))
            + sum(map(len, tls._appSendBuffer))
            + buffered(tls.wrappedProtocol._backend)
        )
        self.assertLessEqual(held, BOUND)
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
        backend = tls.wrappedProtocol._backend
        held = buffered(backend) + buffered(tls.transport)
        self.assertLessEqual(held, BOUND)
        sink.transport.resumeProducing()
        yield sink.ended
        self.assertEqual(sink.received, TOTAL)
        self.assertEqual(sink.hash.hexdigest(), expected_hash())
