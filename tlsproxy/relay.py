"""
The pair, owned by L{ClientSide}: the backend connected after the handshake,
flow control both ways, every byte in order; a clean close on one side is
one on the other (close_notify, FIN), else both abort; one C{close} record
with the reason of what ended the connection first.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from .backend import Backend, BackendTLSError
from .context import ServerConnection, openssl_reasons
from .flow import Throttle, Transport
from .listen import Admission, Refused
from .peer import (
    Proxied,
    backend_address,
    client_address,
    host_port,
    server_name,
    tls_facts,
    without_header,
)
from .proxyheader import no_header
from .record import Recording, RecordObserver
from .values import ProxyConfig


class _Absent:
    """The backend before the handshake (no bytes come), and once lost (dropped)."""

    def write(self, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    abortConnection = unregisterProducer = resumeProducing = loseConnection


class _Connecting(_Absent):
    """The backend being connected: client bytes wait, a clean end is noted."""

    def __init__(self, attempt: Deferred[Transport]) -> None:
        self.attempt, self.closing = attempt, False
        self.chunks: list[bytes] = []

    @override
    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    @override
    def loseConnection(self) -> None:
        self.closing = True

    @override
    def abortConnection(self) -> None:
        self.attempt.cancel()


_TLS_ERROR = {"client": "TLS error", "backend": "backend TLS error"}


def describe(side: str, reason: Failure) -> str:
    """The close reason for a side's loss: one short line, no payload."""
    if isinstance(reason.value, ConnectionDone):
        return f"{side} closed"
    if isinstance(reason.value, SSL.Error):
        return f"{_TLS_ERROR[side]}: {openssl_reasons(reason.value)}"
    return f"{side} error: {reason.getErrorMessage()}"


def _no_delay(transport: object) -> None:
    """Small writes at once (as stunnel): not after the client's delayed ACK."""
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


class RelayFactory(ServerFactory):
    """A L{ClientSide} per connection C{admission} lets in; C{live}: not closed."""

    noisy = False

    def __init__(
        self,
        config: ProxyConfig,
        connect: Backend,
        admission: Admission,
        clock: IReactorTime,
        observe: RecordObserver,
    ) -> None:
        self.connect, self.admission, self.clock = connect, admission, clock
        self.observe, self.timeouts = observe, config.timeouts
        self.service, self.header = config.service, config.header
        self.allow, self.tls = config.allow, config.certificates is not None
        self.live: set[ClientSide] = set()

    @override
    def buildProtocol(self, addr: IAddress | None) -> ClientSide | Refused:
        return ClientSide(self) if self.admission.admit() else Refused()

    @override
    def logPrefix(self) -> str:
        return self.service


@implementer(IHandshakeListener)
class ClientSide(Protocol):
    """The client's side of one proxied connection, and the owner of the pair."""

    transport: Transport  # type: ignore[assignment]  # (TLS, or plain: --client)

    def __init__(self, relay: RelayFactory) -> None:
        self._relay = relay
        self._backend: Transport | _Absent = _Absent()  # where client bytes go
        self._open_sides = 1  # 2 once the backend is tried

    @override
    def connectionMade(self) -> None:
        relay = self._relay
        relay.live.add(self)
        _no_delay(self.transport)
        self._record = Recording(relay.service, relay.clock, relay.observe)
        self._note_addresses()
        # One timer for the whole connection: handshake, connect, then idle.
        self._period, self._why = relay.timeouts.handshake, "handshake timeout"
        self._deadline = relay.clock.callLater(self._period, self._timed_out)
        if not relay.tls:
            self._connect_backend()

    def _note_addresses(self) -> None:
        """The client's and listening address (a balancer's header's, once come)."""
        host, port = host_port(self.transport.getHost())
        facts = self._record.facts
        facts.update(client_address(self.transport.getPeer()))
        facts.update(listen_host=host, listen_port=port)

    def _arm(self, period: float, why: str) -> None:
        self._period, self._why = period, why
        self._deadline.reset(period)

    def handshakeCompleted(self) -> None:
        """Note the TLS facts, then connect to the backend if allowed."""
        facts, identity = tls_facts(self.transport.getHandle())  # type: ignore[attr-defined]
        if isinstance(self.transport.getPeer(), Proxied):  # (the header's, now)
            self._note_addresses()
        since = self._relay.clock.seconds() - self._record.facts["opened"]
        self._record.facts.update(facts, handshake_time=since)
        refusal = self._relay.allow.refusal(identity)
        if refusal is not None:
            self.abort(refusal)
        else:
            self._connect_backend()

    def _connect_backend(self) -> None:
        """Hold the client's further bytes, and connect to the backend."""
        self._connect_started = self._relay.clock.seconds()
        self.transport.pauseProducing()
        self._arm(self._relay.timeouts.connect, "backend connect timeout")
        encode = self._relay.header
        header = (
            b"" if encode is no_header else encode(self._record.record(event="open"))
        )
        attempt = self._relay.connect.connect(self, header)
        self._backend = pending = _Connecting(attempt)
        self._open_sides = 2
        attempt.addCallbacks(
            self._backend_connected, self._backend_failed, callbackArgs=(pending,)
        )

    def _backend_connected(self, transport: Transport, pending: _Connecting) -> None:
        self._backend = transport
        _no_delay(transport)
        connect_time = self._relay.clock.seconds() - self._connect_started
        addresses = backend_address(transport.getHost(), transport.getPeer())
        self._record.facts.update(addresses, connect_time=connect_time)
        transport.writeSequence(pending.chunks)  # what the client sent meanwhile
        self._record.opened()
        if pending.closing:  # the client finished meanwhile: deliver, then FIN
            transport.loseConnection()
            return
        transport.registerProducer(Throttle(self.transport), True)
        self.transport.registerProducer(Throttle(transport), True)
        self.transport.resumeProducing()
        self._arm(self._relay.timeouts.idle, "idle timeout")

    def _backend_failed(self, reason: Failure) -> None:
        tls = isinstance(reason.value, BackendTLSError)
        failed = "backend TLS error" if tls else "backend connect failed"
        self._record.because(f"{failed}: {reason.getErrorMessage()}")
        if self._open_sides == 2:  # the client is still connected
            self.transport.abortConnection()
        self._side_closed()

    @override
    def dataReceived(self, data: bytes) -> None:
        self._record.from_client += len(data)
        self._deadline.reset(self._period)
        self._backend.write(data)

    def backend_data(self, data: bytes) -> None:
        """Send the backend's bytes to the client (gone: a TLS backend's last)."""
        if self._open_sides == 2:  # the client is still connected
            self._record.to_client += len(data)
            self._deadline.reset(self._period)
            self.transport.write(data)

    def backend_lost(self, reason: Failure) -> None:
        """The backend is gone: closed, the client gets close_notify; else aborted."""
        self._record.because(describe("backend", reason))
        self._backend = _Absent()
        if self._open_sides == 2:  # the client is still connected
            if isinstance(reason.value, ConnectionDone):
                self.transport.unregisterProducer()
                # Read on: the client's close_notify must be able to arrive.
                self.transport.resumeProducing()
                self.transport.loseConnection()
            else:
                self.transport.abortConnection()
        self._side_closed()

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._relay.live.discard(self)
        self._relay.admission.release()
        if self._deadline.active():
            self._deadline.cancel()
        record, peer = self._record, self.transport.getPeer()
        record.facts.update(client_address(peer))  # (a balancer's, now)
        if without_header(peer):
            record.because("no valid PROXY header")
        clean = isinstance(reason.value, ConnectionDone)
        if self._relay.tls:
            tls: ServerConnection = self.transport.getHandle()  # type: ignore[attr-defined]
            record.facts["sni"] = server_name(tls) or None  # (if it failed too)
            if tls.refusal is not None:  # (TLS's own reason: an SNI name, say)
                record.because(tls.refusal)
            clean = clean or tls.closed()
        record.because("client closed" if clean else describe("client", reason))
        self._side_closed()  # first: the backend sees the client gone
        if clean:
            self._backend.unregisterProducer()
            self._backend.resumeProducing()  # (a TLS backend's close_notify must come)
            self._backend.loseConnection()
        else:
            self._backend.abortConnection()

    def _timed_out(self) -> None:
        self.abort(self._why)

    def abort(self, reason: str) -> None:
        """End the connection now, both sides, for C{reason} (first wins)."""
        self._record.because(reason)
        self.transport.abortConnection()
        self._backend.abortConnection()

    def _side_closed(self) -> None:
        self._open_sides -= 1
        if self._open_sides == 0:
            self._record.closed()
