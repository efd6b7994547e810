"""
Flow control: a side's full write buffer pauses the other side's reading
(L{Throttle}); a TLS layer stops reading its peer while TLS's own answers to
it (to a KeyUpdate, say) wait in a full buffer (L{TLSProtocol}).
"""

from __future__ import annotations

import typing

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IPushProducer, ITransport
from twisted.protocols.tls import BufferingTLSTransport
from typing_extensions import override
from zope.interface import implementer


class Transport(typing.Protocol):
    """What a relay uses of each side's transport."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getHost(self) -> IAddress: ...
    def getPeer(self) -> IAddress: ...


@implementer(IPushProducer)
@attrs.frozen
class Throttle:
    """A side's producer: the C{other} side's reading (stopping: the relay's job)."""

    other: Transport

    def pauseProducing(self) -> None:
        self.other.pauseProducing()

    def resumeProducing(self) -> None:
        self.other.resumeProducing()

    def stopProducing(self) -> None:
        pass


class CountingConnection(SSL.Connection):
    """An OpenSSL connection that counts the bytes TLS gives its transport."""

    written = 0

    @override
    def bio_read(self, bufsiz: int) -> bytes:
        data = super().bio_read(8 * bufsiz)  # all TLS wrote (answers to a 64 KiB read)
        self.written += len(data)
        return data

    def closed(self) -> bool:
        """close_notify both ways: a reset after it loses nothing (not an alert)."""
        return bool(self.get_shutdown() == SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)


@implementer(IPushProducer)
class _Drain:
    """A L{TLSProtocol}'s producer, passing on to the layer above's (not closing)."""

    def __init__(self, tls: TLSProtocol) -> None:
        self.tls = tls
        self.above: IPushProducer | None = None

    def pauseProducing(self) -> None:
        self.tls.full = True
        if self.above is not None:
            self.above.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self.tls.transport
        if transport.disconnecting:  # type: ignore[union-attr]
            transport.unregisterProducer()  # type: ignore[union-attr]
            return
        self.tls.drained()
        if self.above is not None:
            self.above.resumeProducing()

    def stopProducing(self) -> None:
        if self.above is not None:
            self.above.stopProducing()


class TLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS over a L{CountingConnection}, reading while neither the
    layer above nor a waiting answer holds it; close_notify goes at once.
    """

    full = False  # the transport's buffer is full
    _held = False  # by the layer above
    _answering = False  # answers wait in the full buffer

    @override
    def makeConnection(self, transport: ITransport) -> None:
        self._drain = _Drain(self)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        transport.registerProducer(self._drain, True)  # type: ignore[attr-defined]

    @override
    def dataReceived(self, data: bytes) -> None:
        connection: CountingConnection = self.getHandle()  # type: ignore[no-untyped-call]
        before = connection.written
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self.full and connection.written != before:
            self._answering = True
            self._reading()

    def drained(self) -> None:
        """The transport's buffer is no longer full."""
        self.full = self._answering = False
        self._reading()

    def pauseProducing(self) -> None:
        self._held = True
        self._reading()

    def resumeProducing(self) -> None:
        self._held = False
        self._reading()

    def _reading(self) -> None:
        if self._held or self._answering:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    @override
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._drain.above = producer

    @override
    def unregisterProducer(self) -> None:
        self._drain.above = None
