"""
Tests of the TCP connections that write at once (tlsproxy.eager), on real
sockets on 127.0.0.1 with the real reactor.
"""

from __future__ import annotations

import hashlib
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import (
    ClientFactory,
    Protocol,
    ServerFactory,
    connectionDone,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tlsproxy.eager import AtOnce, _Sender

from .harness import HOST

BIG = 32 << 20


class Peer(Protocol):
    """Records what arrives, and fires C{made} and C{lost}."""

    def __init__(self) -> None:
        self.received = hashlib.sha256()
        self.count = 0
        self.made: Deferred[Peer] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received.update(data)
        self.count += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class AtOnceTests(TestCase):
    """Writes go out at once when nothing is pending; the rest as Twisted does."""

    async def pair(self) -> tuple[Peer, Peer]:
        """A server and a client protocol, connected through AtOnce."""
        at_once = AtOnce(reactor)
        server, client = Peer(), Peer()
        port = at_once.listenTCP(
            0, ServerFactory.forProtocol(lambda: server), interface=HOST
        )
        self.addCleanup(port.stopListening)
        at_once.connectTCP(
            HOST, port.getHost().port, ClientFactory.forProtocol(lambda: client)
        )
        await server.made
        await client.made
        for peer in (server, client):
            self.addCleanup(lambda p=peer: p.transport.abortConnection())  # type: ignore[misc]
        return server, client

    async def test_at_once(self) -> None:
        """Writes are sent at the end of the turn, without epoll, coalesced."""
        server, client = await self.pair()
        for side, other in [(server, client), (client, server)]:
            side.transport.write(b"hel")  # type: ignore[union-attr]
            side.transport.write(b"lo")  # type: ignore[union-attr]
            self.assertEqual(other.count, 0)
            while other.count < 5:
                self.assertNotIn(side.transport, reactor.getWriters())
                await deferred_later()
            self.assertEqual(other.received.digest(), hashlib.sha256(b"hello").digest())

    async def test_one_turn(self) -> None:
        """Connections written to in one turn are sent together at its end."""
        server, client = await self.pair()
        server.transport.write(b"ping")  # type: ignore[union-attr]
        client.transport.write(b"pong")  # type: ignore[union-attr]
        while server.count < 4 or client.count < 4:
            await deferred_later()
        self.assertEqual(client.received.digest(), hashlib.sha256(b"ping").digest())
        self.assertEqual(server.received.digest(), hashlib.sha256(b"pong").digest())

    async def test_rest_buffered(self) -> None:
        """What the kernel does not take is left to the reactor; all arrives."""
        server, client = await self.pair()
        client.transport.pauseProducing()  # type: ignore[union-attr]
        data = bytes(range(256)) * (BIG // 256)
        server.transport.write(data)  # type: ignore[union-attr]
        await deferred_later()
        self.assertIn(server.transport, reactor.getWriters())
        server.transport.write(b"tail")  # type: ignore[union-attr]
        client.transport.resumeProducing()  # type: ignore[union-attr]
        while client.count < BIG + 4:
            await deferred_later()
        expected = hashlib.sha256(data + b"tail").digest()
        self.assertEqual(client.received.digest(), expected)

    async def test_send_error(self) -> None:
        """A send that fails loses the connection as usual, without raising."""
        server, _ = await self.pair()
        server.transport.getHandle().shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        server.transport.write(b"x")  # type: ignore[union-attr]  (EPIPE)
        await server.lost
        assert server.reason is not None
        self.assertTrue(server.reason.check(ConnectionLost))

    async def test_aborted(self) -> None:
        """
        What is written just before an abort is dropped, as Twisted drops it
        (a TLS layer writes its close_notify just before it aborts).
        """
        server, client = await self.pair()
        server.transport.write(b"close_notify")  # type: ignore[union-attr]
        server.transport.abortConnection()  # type: ignore[union-attr]
        server.transport.write(b"late")  # type: ignore[union-attr]
        await client.lost
        self.assertEqual(client.count, 0)

    async def test_lost_meanwhile(self) -> None:
        """A connection lost before the end of the turn has nothing sent."""
        server, client = await self.pair()
        server.transport.write(b"x")  # type: ignore[union-attr]
        server.transport.connectionLost(Failure(ConnectionDone()))  # type: ignore[union-attr]
        await client.lost
        self.assertEqual(client.count, 0)

    def test_one_fails(self) -> None:
        """
        A connection whose send raises is left to the reactor (which meets
        the error again and closes it); the others are still sent.
        """

        class Stub:
            def __init__(self, fails: bool) -> None:
                self.fails = fails
                self.calls: list[str] = []

            def send_now(self) -> None:
                self.calls.append("send")
                if self.fails:
                    raise RuntimeError("a producer raised")

            def startWriting(self) -> None:
                self.calls.append("reactor")

        clock = Clock()
        sender = _Sender(clock)
        failing, other = Stub(True), Stub(False)
        sender.add(failing)  # type: ignore[arg-type]
        sender.add(other)  # type: ignore[arg-type]
        clock.advance(0)
        self.assertEqual(failing.calls, ["send", "reactor"])
        self.assertEqual(other.calls, ["send"])

    def test_reactor(self) -> None:
        """Everything but listenTCP and connectTCP is the reactor's."""
        at_once = AtOnce(reactor)
        self.assertEqual(at_once.callLater, reactor.callLater)
        self.assertTrue(IReactorTCP.providedBy(at_once))

    async def test_closing(self) -> None:
        """A write after loseConnection is Twisted's: sent before the close."""
        server, client = await self.pair()
        server.transport.loseConnection()  # type: ignore[union-attr]
        server.transport.write(b"late")  # type: ignore[union-attr]
        await client.lost
        self.assertEqual(client.received.digest(), hashlib.sha256(b"late").digest())


def deferred_later() -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)
