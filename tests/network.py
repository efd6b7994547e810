"""
In-memory TCP connections that a test moves one event at a time: a read of
at most 64 KiB, an end of file, a reset.  Each end buffers what its protocol
writes as Twisted's TCP transport does (its producer paused past 64 KiB,
resumed once the buffer is empty; closed once empty after loseConnection;
aborted at the next turn, its buffer dropped), with no kernel buffer in
between: bytes wait in the writer's end until the other end reads them, and
the test can hold back a peer's reading.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IPushProducer, ITCPTransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

SIZE = 2**16  # Twisted's: a TCP read, and the write buffer that pauses producers


@implementer(ITCPTransport)
class End:
    """
    One end of a L{Connection}: the transport of C{protocol}.  C{buffer}
    holds what it wrote that the other end has not read; C{misuse} what it
    was asked to do that a real transport would not do for it.
    """

    other: End

    def __init__(
        self, protocol: IProtocol, host: IPv4Address, peer: IPv4Address
    ) -> None:
        self.protocol, self.host, self.peer = protocol, host, peer
        self.buffer = bytearray()
        self.read = 0  # bytes of this end's that the other end has read
        self.reading = True  # its protocol wants to read (as Twisted's)
        self.held = False  # its reading is held back by the test
        self.writing = False  # it has something to do once its buffer is empty
        self.connected, self.disconnected = True, False
        self.disconnecting = False  # loseConnection was called
        self.aborting = False  # abortConnection was called
        self.fin = self.reset = False  # what it sent the other end, after its bytes
        self.lost: Failure | None = None  # how it ended, once its protocol knows
        self.closing = False  # its protocol is being told
        self.producer: IPushProducer | None = None
        self.streaming = self.producer_paused = False
        self.no_delay = False
        self.misuse: list[str] = []

    # ITransport

    def write(self, data: bytes) -> None:
        if self.disconnected or self.aborting:
            if not self.closing:  # (its protocol's last words are lost, silently)
                self.misuse.append(f"{len(data)} bytes written after it was gone")
            return
        if data:
            self.buffer += data
            self.writing = True
            if self.producer is not None and self.streaming and len(self.buffer) > SIZE:
                self.producer_paused = True
                self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting:
            self.reading = False
            self.writing = True
            self.disconnecting = True

    def abortConnection(self) -> None:
        if self.disconnected or self.aborting:
            return
        self.aborting = True
        self.reading = self.writing = False
        del self.buffer[:]

    def getHost(self) -> IPv4Address:
        return self.host

    def getPeer(self) -> IPv4Address:
        return self.peer

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    # IConsumer, IPushProducer

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is registered already")
        if self.disconnected:
            producer.stopProducing()
        else:
            self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None
        if self.connected and self.disconnecting:
            self.writing = True

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        if self.connected and not self.disconnecting:
            self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    # The network's side.

    @property
    def listening(self) -> bool:
        """Whether it would read what comes (bytes, an end, a reset) now."""
        return self.reading and not self.held and not self.aborting

    def close(self, reason: Failure) -> None:
        """Its connection is lost: its producer stopped, its protocol told."""
        if self.disconnected:
            return
        self.connected, self.disconnected = False, True
        self.reading = self.writing = False
        del self.buffer[:]
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.closing = True
        self.protocol.connectionLost(reason)
        self.closing = False
        self.lost = reason

    def turn(self) -> bool:
        """What Twisted's reactor does for it in one turn: did anything happen?"""
        if self.aborting and not self.disconnected:
            self.reset = True
            self.close(Failure(ConnectionAborted()))
            return True
        if not (self.writing and self.connected and not self.buffer):
            return False
        self.writing = False  # (Twisted's doWrite with an empty buffer)
        if self.producer is not None and (not self.streaming or self.producer_paused):
            self.producer_paused = False
            self.producer.resumeProducing()
        elif self.disconnecting:
            self.fin = True
            self.close(Failure(ConnectionDone()))
        return True


class Connection:
    """
    A TCP connection between C{accepting} (the listening side's protocol)
    and C{connecting}, made at once (the accepting side is told first).
    """

    def __init__(
        self,
        accepting: IProtocol,
        connecting: IProtocol,
        accepting_address: IPv4Address,
        connecting_address: IPv4Address,
    ) -> None:
        self.accepting = End(accepting, accepting_address, connecting_address)
        self.connecting = End(connecting, connecting_address, accepting_address)
        self.accepting.other, self.connecting.other = self.connecting, self.accepting
        accepting.makeConnection(self.accepting)
        connecting.makeConnection(self.connecting)

    @staticmethod
    def carry(source: End) -> str | None:
        """
        Carry one thing from C{source} to the other end, if it can: a read
        (C{"bytes"}), the end of file after them (C{"end"}), a reset
        (C{"reset"}); bytes toward an end that is gone reset C{source}
        (C{"bounced"}).  C{None}: nothing can move that way now.
        """
        to = source.other
        if source.buffer and to.disconnected:
            if source.connected and not source.aborting:
                source.reset = True
                source.close(Failure(ConnectionLost("reset by the peer")))
                return "bounced"
            return None
        if not to.connected or not to.listening:
            if source.reset and to.connected and to.buffer and not to.aborting:
                to.close(Failure(ConnectionLost("reset by the peer")))
                return "reset"
            return None
        if source.buffer:
            data = bytes(source.buffer[:SIZE])
            del source.buffer[:SIZE]
            source.read += len(data)
            if not source.buffer and source.connected:
                source.writing = True
            to.protocol.dataReceived(data)
            return "bytes"
        if source.reset:
            to.close(Failure(ConnectionLost("reset by the peer")))
            return "reset"
        if source.fin:
            to.close(Failure(ConnectionDone()))
            return "end"
        return None


def turn(clock: Clock, ends: list[End]) -> None:
    """Reactor turns until neither the ends nor the clock's 0 s calls act."""
    for _ in range(1000):
        acted = any([end.turn() for end in ends])
        due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        clock.advance(0)
        if not acted and not due:
            return
    raise AssertionError("still turning after 1000 turns")
