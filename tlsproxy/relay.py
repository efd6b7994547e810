"""
The proxy pair: one TLS client connection and the backend connection it
gets once its handshake has completed.

L{ClientSide} owns the pair.  Its contract:

  - the backend is connected only after the TLS handshake completes (at
    once for a plain TCP client, C{--client}); client bytes decrypted before
    the backend is there wait in L{_Connecting} (at most one read's worth:
    the client is paused at the handshake).  A TLS backend is there once
    verified (L{tlsproxy.backend}); the PROXY header goes before its TLS;
  - flow control both ways: each side's transport pauses the other side's
    reading when its write buffer is full, so a connection holds at most
    about one read and one write buffer per direction (see README.rst);
  - every byte arrives, in order.  When the backend closes, the client gets
    every byte and then a TLS close_notify; when the client sends
    close_notify, the backend gets every byte and then a FIN.  Any other
    end (a reset, a TLS error, a timeout) aborts both sides;
  - one close path: each side's loss is counted in L{ClientSide._side_closed}
    and when both are gone one C{close} record is published, with the
    reason of whatever ended the connection first.
"""

from __future__ import annotations

import typing
import uuid

import attrs
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from .backend import BackendTLSError
from .peer import (
    client_address,
    client_identity,
    host_port,
    server_name,
    without_header,
)
from .proxyheader import HeaderEncoder, no_header
from .record import ConnectionRecord, RecordObserver
from .tls import ANY_CERTIFICATE, AllowList, ServerConnection, openssl_reasons


@attrs.frozen(kw_only=True)
class Timeouts:
    """
    Seconds allowed for the TLS handshake, for connecting to the backend
    (counted from the end of the handshake), and without traffic either way.
    """

    handshake: float = 30.0
    connect: float = 30.0
    idle: float = 3600.0


class _BackendEnd(typing.Protocol):
    """What the client side asks of its backend, whatever state it is in."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def unregisterProducer(self) -> None: ...


class _Pausable(typing.Protocol):
    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class _Transport(_BackendEnd, _Pausable, typing.Protocol):
    """What the pair uses of the backend's transport."""

    def writeSequence(self, data: list[bytes]) -> None: ...

    def getHost(self) -> IAddress: ...

    def getPeer(self) -> IAddress: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...


class _NoBackend:
    """
    The backend before the handshake completes: nothing to close.  (No
    client bytes arrive before the handshake completes, so nothing writes.)
    """

    def write(self, data: bytes) -> None:
        raise AssertionError("client data before the TLS handshake completed")

    def abortConnection(self) -> None:
        pass

    loseConnection = unregisterProducer = abortConnection


class _Connecting:
    """
    The backend while it is being connected: client bytes wait here, and a
    client that finishes cleanly meanwhile still has them delivered.
    """

    def __init__(self, attempt: Deferred[IProtocol]) -> None:
        self.attempt = attempt
        self.chunks: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def loseConnection(self) -> None:
        self.closing = True

    def abortConnection(self) -> None:
        self.attempt.cancel()

    def unregisterProducer(self) -> None:
        pass


class _Gone:
    """
    The backend once its connection is lost: client bytes still arriving are
    dropped, and there is nothing to close (a lost TLS layer must not be).
    """

    def write(self, data: bytes) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    loseConnection = unregisterProducer = abortConnection


@implementer(IPushProducer)
@attrs.frozen
class _Throttle:
    """
    Flow control from one side's transport to the other's: pausing and
    resuming pass through; stopping does not, because a transport that is
    lost stops its producer, and the other side must be closed by the close
    path (with a TLS close_notify), not by the lost transport.
    """

    transport: _Pausable

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


_TLS_ERROR = {"client": "TLS error", "backend": "backend TLS error"}


def describe(side: str, reason: Failure) -> str:
    """The close reason for a side's loss: one short line, no payload."""
    if reason.check(ConnectionDone):
        return f"{side} closed"
    if reason.check(SSL.Error):
        why = openssl_reasons(typing.cast(SSL.Error, reason.value))
        return f"{_TLS_ERROR[side]}: {why}"
    return f"{side} error: {reason.getErrorMessage()}"


def _no_delay(transport: object) -> None:
    """
    Send small writes at once on a TCP transport, as stunnel does: with
    Nagle's algorithm a response that follows the session tickets waits for
    the client's delayed ACK (40 ms a connection).
    """
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def _in_clear(transport: ITransport) -> ITransport:
    """Where bytes go unencrypted: under a TLS layer toward the backend, if any."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return typing.cast(ITransport, transport.transport)
    return transport


def _server_tls(transport: object) -> ServerConnection | None:
    """The TLS connection of a client, if it speaks TLS (not under --client)."""
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return None
    return typing.cast(ServerConnection, transport.getHandle())


def _text(value: bytes | None) -> str | None:
    return value.decode("ascii", "replace") if value else None


class RelayFactory(ServerFactory):
    """
    Builds a L{ClientSide} for each accepted TLS connection (this factory
    sits under Twisted's C{TLSMemoryBIOFactory}).
    """

    def __init__(
        self,
        *,
        connect: IStreamClientEndpoint,
        clock: IReactorTime,
        observe: RecordObserver,
        timeouts: Timeouts,
        service: str,
        header: HeaderEncoder = no_header,
        allow: AllowList = ANY_CERTIFICATE,
    ) -> None:
        self.connect = connect
        self.clock = clock
        self.observe = observe
        self.timeouts = timeouts
        self.service = service
        self.header = header
        self.allow = allow

    @override
    def buildProtocol(self, addr: IAddress | None) -> ClientSide:
        return ClientSide(self)


@implementer(IHandshakeListener)
class ClientSide(Protocol):
    """
    The TLS client's side of one proxied connection, and the owner of the
    pair (see the module's docstring for the contract).
    """

    transport: TLSMemoryBIOProtocol  # (a bare ProtocolWrapper under --client)

    def __init__(self, relay: RelayFactory) -> None:
        self._relay = relay
        # Where client bytes go: a stand-in until the backend is connected.
        self._backend: _BackendEnd = _NoBackend()
        # 1 while only the client is counted, 2 once the backend is tried.
        self._open_sides = 1
        # The first reason anything gave for ending the connection.
        self._reason: str | None = None
        self._from_client = 0
        self._to_client = 0

    @override
    def connectionMade(self) -> None:
        relay = self._relay
        _no_delay(self.transport)
        # The record's fields so far (a record is made when one is published).
        self._facts: dict[str, typing.Any] = {
            "id": uuid.uuid4().hex,
            "service": relay.service,
            "opened": relay.clock.seconds(),
        }
        self._note_addresses()
        # One timer for the whole connection: its period and reason change
        # from handshake to connect to idle.
        self._period = relay.timeouts.handshake
        self._timeout_reason = "handshake timeout"
        self._deadline: IDelayedCall = relay.clock.callLater(
            self._period, self._timed_out
        )
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._connect_backend()  # plain TCP (--client): no handshake

    def _note_addresses(self) -> None:
        """
        Put the client's and the listening address in the record.  Behind a
        front balancer (C{--listen haproxy:...}) they come from its PROXY
        header, which has certainly arrived once the handshake is done.
        """
        listen_host, listen_port = host_port(self.transport.getHost())
        self._facts.update(listen_host=listen_host, listen_port=listen_port)
        self._note_peer()

    def _note_peer(self) -> None:
        """
        Put the client's address in the record, and a front balancer's own
        in C{balancer_host}/C{balancer_port}.  (Unlike the listening
        address, the peers can still be read once the connection is lost.)
        """
        self._facts.update(client_address(self.transport.getPeer()))

    def _arm(self, period: float, reason: str) -> None:
        self._period = period
        self._timeout_reason = reason
        self._deadline.reset(period)

    def handshakeCompleted(self) -> None:
        """
        Note the TLS facts, then connect to the backend.
        """
        handshake_done = self._relay.clock.seconds()
        self._note_addresses()
        tls = self.transport.getHandle()
        identity = client_identity(tls.get_peer_certificate(as_cryptography=True))
        self._facts.update(
            handshake_time=handshake_done - self._facts["opened"],
            tls_version=tls.get_protocol_version_name(),
            cipher=tls.get_cipher_name(),
            sni=server_name(tls) or None,
            alpn=_text(tls.get_alpn_proto_negotiated()),
            client_cert=identity and identity.subject,
            client_cn=identity and identity.cn,
        )
        refusal = self._relay.allow.refusal(identity)
        if refusal is not None:
            self.abort(refusal)
            return
        self._connect_backend()

    def _connect_backend(self) -> None:
        """Hold the client's further bytes, and connect to the backend."""
        self._connect_started = self._relay.clock.seconds()
        self.transport.pauseProducing()
        self._arm(self._relay.timeouts.connect, "backend connect timeout")
        header = self._relay.header(self._counted(event="open"))
        attempt = self._relay.connect.connect(_BackendFactory(self, header))
        pending = _Connecting(attempt)
        self._backend = pending
        self._open_sides = 2
        attempt.addCallbacks(
            self._backend_connected, self._backend_failed, callbackArgs=(pending,)
        )

    def _backend_connected(self, backend: IProtocol, pending: _Connecting) -> None:
        transport = typing.cast(
            _Transport, typing.cast(_BackendSide, backend).transport
        )
        self._backend = transport
        _no_delay(transport)
        local_host, local_port = host_port(transport.getHost())
        backend_host, backend_port = host_port(transport.getPeer())
        self._facts.update(
            connect_time=self._relay.clock.seconds() - self._connect_started,
            backend_local_host=local_host,
            backend_local_port=local_port,
            backend_host=backend_host,
            backend_port=backend_port,
        )
        # What the client sent meanwhile (after the PROXY header, if any).
        transport.writeSequence(pending.chunks)
        self._relay.observe(self._counted(event="open"))
        if pending.closing:
            # The client finished while we connected: deliver, then FIN.
            transport.loseConnection()
            return
        transport.registerProducer(_Throttle(self.transport), True)
        self.transport.registerProducer(_Throttle(transport), True)
        self.transport.resumeProducing()
        self._arm(self._relay.timeouts.idle, "idle timeout")

    def _backend_failed(self, reason: Failure) -> None:
        failed = "backend connect failed"
        if reason.check(BackendTLSError):  # (TLS toward the backend)
            failed = "backend TLS error"
        self._note(f"{failed}: {reason.getErrorMessage()}")
        if self._open_sides == 2:  # the client is still connected
            self.transport.abortConnection()
        self._side_closed()

    @override
    def dataReceived(self, data: bytes) -> None:
        self._from_client += len(data)
        self._deadline.reset(self._period)
        self._backend.write(data)

    def backend_data(self, data: bytes) -> None:
        """Send the backend's bytes to the client."""
        self._to_client += len(data)
        self._deadline.reset(self._period)
        self.transport.write(data)

    def backend_lost(self, reason: Failure) -> None:
        """
        The backend connection is gone: a clean close gives the client every
        byte and then close_notify; anything else aborts the client.
        """
        self._note(describe("backend", reason))
        self._backend = _Gone()
        if self._open_sides == 2:  # the client is still connected
            if reason.check(ConnectionDone):
                self.transport.unregisterProducer()
                # Read again: the client's close_notify must be able to arrive.
                self.transport.resumeProducing()
                self.transport.loseConnection()
            else:
                self.transport.abortConnection()
        self._side_closed()

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline.active():
            self._deadline.cancel()
        self._note_peer()  # a PROXY header may have come without a handshake
        refusal = None
        tls = _server_tls(self.transport)
        if tls is not None:
            # The name asked for, also when the handshake failed (for the log).
            self._facts["sni"] = server_name(tls) or None
            refusal = tls.refusal  # (TLS's own reason, such as an SNI name)
            if tls.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
                # Its close_notify came: a reset after it loses nothing.
                reason = Failure(ConnectionDone())
        if without_header(self.transport.getPeer()):
            refusal = "no valid PROXY header"
        self._note(refusal or describe("client", reason))
        self._side_closed()  # first, so that the backend sees the client gone
        if reason.check(ConnectionDone):
            # (A TLS layer toward the backend closes only without a producer.)
            self._backend.unregisterProducer()
            self._backend.loseConnection()
        else:
            self._backend.abortConnection()

    def _timed_out(self) -> None:
        self.abort(self._timeout_reason)

    def abort(self, reason: str) -> None:
        """End the connection now, both sides, for C{reason} (first wins)."""
        self._note(reason)
        self.transport.abortConnection()
        self._backend.abortConnection()

    def _note(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def _side_closed(self) -> None:
        self._open_sides -= 1
        if self._open_sides == 0:
            closed = self._relay.clock.seconds()
            self._relay.observe(
                self._counted(
                    event="close",
                    closed=closed,
                    duration=closed - self._facts["opened"],
                    reason=self._reason,
                )
            )

    def _counted(self, **changes: typing.Any) -> ConnectionRecord:
        """The record of the connection as it is now, with C{changes}."""
        return ConnectionRecord(
            **self._facts,
            bytes_from_client=self._from_client,
            bytes_to_client=self._to_client,
            **changes,
        )


class _BackendSide(Protocol):
    """
    The backend's side of the pair: it sends the PROXY header, in clear,
    first; everything it receives goes to its L{ClientSide}.
    """

    def __init__(self, client: ClientSide, header: bytes) -> None:
        self._client = client
        self._header = header

    @override
    def connectionMade(self) -> None:
        # Under a TLS layer, this is before its ClientHello.
        _in_clear(typing.cast(ITransport, self.transport)).write(self._header)

    @override
    def dataReceived(self, data: bytes) -> None:
        self._client.backend_data(data)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._client.backend_lost(reason)


class _BackendFactory(Factory):
    """Builds the one L{_BackendSide} of a L{ClientSide}."""

    noisy = False

    def __init__(self, client: ClientSide, header: bytes) -> None:
        self._client = client
        self._header = header

    @override
    def buildProtocol(self, addr: IAddress | None) -> _BackendSide:
        return _BackendSide(self._client, self._header)
