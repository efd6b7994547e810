"""
TCP connections that send what is written without asking epoll first.

Twisted's TCP transports buffer every write, register the socket for
writability, send on the reactor's next turn, and then remove the socket:
two C{epoll_ctl} calls and a turn of the loop for every write, which is most
of a proxy's work on small requests.  Here what is written while nothing is
pending is buffered as Twisted does, but sent at the end of the current turn
(one C{callLater(0)} for all the connections written to in that turn), and
the socket is registered only if the kernel does not take everything.

Everything else stays Twisted's: the buffer (so a full one still pauses the
producer), the order of the bytes, and what is dropped.  In particular a
connection aborted before the end of the turn sends nothing of it: a TLS
layer's C{abortConnection} writes a close_notify just before it aborts the
connection below, and that must not reach the peer, who would then take a
cut-short stream for a whole one.  An error or a close that C{doWrite} meets
is left to the reactor, which meets it again at its next write attempt.

These transports never start TLS themselves (C{startTLS}): TLS is a
protocol above them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.interfaces import IConnector, IListeningPort
from twisted.internet.protocol import ClientFactory, ServerFactory
from zope.interface import directlyProvides, providedBy

if TYPE_CHECKING:
    _Connection = tcp.Connection
else:
    _Connection = object  # (a mixin: tcp.Connection comes after it)


class _Sender:
    """Sends, at the end of the reactor's turn, what was written during it."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._waiting: list[_SendSoon] = []

    def add(self, transport: _SendSoon) -> None:
        if not self._waiting:
            self._reactor.callLater(0, self._send)
        self._waiting.append(transport)

    def _send(self) -> None:
        waiting, self._waiting = self._waiting, []
        for transport in waiting:
            try:
                transport.send_now()
            except Exception:
                # (A producer that raised, say.)  The reactor's write meets
                # it again, and closes that connection as it always does;
                # the others are still sent.
                transport.startWriting()  # type: ignore[no-untyped-call]


_SENDERS: dict[object, _Sender] = {}  # by reactor (a process has one)


def _sender(reactor: object) -> _Sender:
    sender = _SENDERS.get(reactor)
    if sender is None:
        sender = _SENDERS[reactor] = _Sender(reactor)
    return sender


class _SendSoon(_Connection):
    """The write of L{tcp.Connection}, sent by a L{_Sender}, not by epoll."""

    _soon = False  # whether the sender has this transport to send

    def write(self, data: bytes) -> None:
        if self._soon or (data and self.connected and not self._pending()):
            self._tempDataBuffer.append(data)
            self._tempDataLen += len(data)
            self._maybePauseProducer()  # type: ignore[no-untyped-call]
            if not self._soon:
                self._soon = True
                _sender(self.reactor).add(self)
            return
        super().write(data)  # type: ignore[no-untyped-call]

    def send_now(self) -> None:
        """Send what was written; the reactor sends what the kernel left."""
        self._soon = False
        if not self.connected or self._aborting:
            return  # (gone or aborted meanwhile: dropped, as Twisted does)
        if self.doWrite() is not None or self.dataBuffer:  # type: ignore[no-untyped-call]
            self.startWriting()  # type: ignore[no-untyped-call]

    def _pending(self) -> bool:
        """Whether bytes wait to be sent, or the connection is closing."""
        return bool(
            self.dataBuffer
            or self._tempDataLen
            or self.disconnecting
            or self._writeDisconnected
            or self._aborting
        )


class _Server(_SendSoon, tcp.Server):
    pass


class _Client(_SendSoon, tcp.Client):
    pass


class _Connector(tcp.Connector):
    def _makeTransport(self) -> _Client:
        return _Client(  # type: ignore[no-untyped-call]
            self.host, self.port, self.bindAddress, self, self.reactor
        )


class AtOnce:
    """
    C{reactor}, except that its TCP connections send what is written at the
    end of the turn (see above): give it to endpoints (C{tcp:} strings, and
    those that wrap them) in its place.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))  # (for those who ask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        listening = self._reactor.listenTCP(port, factory, backlog, interface)
        listening.transport = _Server  # (the class a port makes at each accept)
        return listening  # type: ignore[no-any-return]

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30.0,
        bindAddress: tuple[str, int] | None = None,  # noqa: N803 (Twisted's name)
    ) -> IConnector:
        connector = _Connector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector
