"""
The service tree: a listening TLS endpoint whose connections are relayed to
one backend endpoint, with connection records sent to an observer.

This is the public way to embed tlsproxy in another Twisted application
(see README.rst, "Embedding").
"""

from __future__ import annotations

import math
import re
import typing
from collections import Counter

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IReactorTCP2,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.tcp import Port, makeBinding
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from typing_extensions import override

from .backend import BackendTLS, backend_endpoint
from .eager import AtOnce
from .peer import Proxied, host_port
from .proxyheader import Addresses, HeaderEncoder, no_header, parse
from .record import RecordObserver, log_close
from .relay import ClientSide, RelayFactory, Timeouts
from .steer import steer
from .tls import (
    ANY_CERTIFICATE,
    AllowList,
    Certificates,
    ConfigError,
    ServerConnection,
    ServerTLS,
    TLSProtocol,
)

_log = Logger(namespace="tlsproxy")


@attrs.frozen(kw_only=True)
class Limits:
    """
    At most C{total} live connections, C{per_client} from one address
    (C{math.inf}: no limit), refusals logged once per C{report} seconds at
    most, and C{drain} seconds for live connections to finish on stop.
    """

    total: float = math.inf
    per_client: float = math.inf
    report: float = 10.0
    drain: float = 10.0


BALANCED = "haproxy:"  # --listen haproxy:ENDPOINT: a PROXY header comes first
_ANY = ("", "0.0.0.0", "::")  # the interfaces that are every interface


def binds(description: str) -> tuple[str, str, str]:
    """
    What an endpoint string listens on, as far as two services could share
    it: C{("tcp", port, interface)} for C{tcp:} and C{tcp6:} (C{haproxy:}
    over them too), C{("unix", path, "")}, or the kind and the rest.
    """
    if description.lower().startswith(BALANCED):
        description = description[len(BALANCED) :]
    kind, _, rest = description.partition(":")
    fields = [f.replace("\\:", ":") for f in re.split(r"(?<!\\):", rest)]
    named = dict(f.split("=", 1) for f in fields if "=" in f)
    plain = [f for f in fields if "=" not in f] + ["", ""]
    kind = kind.lower()
    if kind in ("tcp", "tcp6"):
        return "tcp", named.get("port", plain[0]), named.get("interface", plain[1])
    return kind, named.get("address", plain[0]) if kind == "unix" else rest, ""


def overlap(one: str, other: str) -> bool:
    """
    Whether two endpoint strings listen on the same port (not 0: a free
    one) of one interface, or the same path.
    """
    (kind, where, interface), (kind2, where2, interface2) = binds(one), binds(other)
    return (kind, where) == (kind2, where2) != ("tcp", "0") and (
        interface == interface2 or interface in _ANY or interface2 in _ANY
    )


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """
    One proxy service: accept TLS on C{listen} (a server endpoint string),
    with C{certificates}, and relay each connection to C{connect} (a client
    endpoint string), after C{header} (a PROXY protocol header encoder from
    L{tlsproxy.proxyheader}, or none).  A C{tls:HOST:PORT} C{connect} needs
    C{backend_tls}, and then C{certificates} may be C{None}: plain TCP is
    accepted (C{--client}).  With C{reuse_port} a C{tcp:} or C{tcp6:}
    C{listen} (or C{haproxy:} over one) is bound with C{SO_REUSEPORT}, so
    that several processes share its port; with C{steer_clients} too (not
    behind C{haproxy:}), each client address goes to one of that many
    processes (L{tlsproxy.steer}).

    @raise ConfigError: C{reuse_port} with another kind of C{listen}, or
        C{steer_clients} without C{reuse_port} or behind C{haproxy:}.
    """

    listen: str
    connect: str
    certificates: Certificates | None
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    service: str = "tlsproxy"
    header: HeaderEncoder = no_header
    limits: Limits = attrs.field(factory=Limits)
    allow: AllowList = ANY_CERTIFICATE
    backend_tls: BackendTLS | None = None
    reuse_port: bool = attrs.field(default=False)
    steer_clients: int = attrs.field(default=0)

    @reuse_port.validator
    def _tcp_only(self, attribute: object, reuse: bool) -> None:
        if reuse and binds(self.listen)[0] != "tcp":
            raise ConfigError(
                f"--reuse-port: not with --listen {self.listen}"
                " (only tcp:, tcp6: and haproxy: over them)"
            )

    @steer_clients.validator
    def _steered(self, attribute: object, processes: int) -> None:
        balanced = self.listen.lower().startswith(BALANCED)
        if processes and (balanced or not self.reuse_port):
            raise ConfigError(
                f"--steer-clients {processes}: needs --reuse-port, and not"
                " --listen haproxy:... (every client would be the balancer)"
            )


class _ReusePort:
    """
    A reactor for C{tcp:} and C{tcp6:} server endpoints (which call only
    C{listenTCP}): C{reactor}, but binding with C{SO_REUSEPORT} beside
    Twisted's C{SO_REUSEADDR}.  On Linux the processes that share a port
    must all set it and have the same effective uid when they bind (root,
    under twistd); the kernel spreads new connections among them by a hash
    of the addresses and ports, or with C{steer_clients} by the program of
    L{tlsproxy.steer}.
    """

    def __init__(self, reactor: typing.Any, steer_clients: int) -> None:
        self._reactor = typing.cast(IReactorTCP2, reactor)  # (26.10: takes a binding)
        self._steer_clients = steer_clients

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int, interface: str
    ) -> IListeningPort:
        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        listening = self._reactor.listenTCP(binding, factory, backlog, interface)
        if self._steer_clients:
            try:
                steer(typing.cast(Port, listening).socket, self._steer_clients)
            except OSError as e:
                raise CannotListenError(interface, port, e) from None
        return listening


class _BehindBalancer(ProtocolWrapper):
    """
    A connection from a front balancer: its PROXY header is read (and
    checked: L{tlsproxy.proxyheader.parse}) before any byte reaches the
    protocol above, and gives the client's address (L{Proxied}) and the
    destination's.  A connection whose first bytes are not a valid header
    is aborted.
    """

    _addresses: Addresses | None = None
    _header: bytes | None = b""  # what came so far; None once it is read

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._header is None:
            self.wrappedProtocol.dataReceived(data)
            return
        self._header += data
        try:
            parsed = parse(self._header)
        except ValueError:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if parsed is not None:
            length, self._addresses = parsed
            rest, self._header = self._header[length:], None
            if rest:
                self.wrappedProtocol.dataReceived(rest)

    @override
    def getPeer(self) -> IAddress:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        if self._header is not None:
            return Proxied(None, peer)
        return Proxied(peer if self._addresses is None else self._addresses[0], peer)

    @override
    def getHost(self) -> IAddress:
        if self._addresses is None:
            return self.transport.getHost()  # type: ignore[union-attr]
        return self._addresses[1]


def behind_balancer(factory: IProtocolFactory) -> WrappingFactory[ProtocolWrapper]:
    """C{factory}, each of its connections read from after a PROXY header."""
    wrapping = WrappingFactory(factory)
    wrapping.protocol = _BehindBalancer
    return wrapping


class Reloadable(typing.Protocol):
    def reload(self) -> None: ...


class SharedLimit:
    """
    At most C{total} live connections across all the listening factories
    that share this limit (the services of one process).
    """

    def __init__(self, total: float = math.inf) -> None:
        self.total = total
        self.factories: list[LimitedTLSFactory] = []

    def full(self) -> bool:
        """Whether the factories have C{total} live connections between them."""
        return sum(len(f.protocols) for f in self.factories) >= self.total


class _Refused(Protocol):
    """A connection over a limit: closed at once, before any TLS byte."""

    @override
    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class LimitedTLSFactory(TLSMemoryBIOFactory):
    """
    Twisted's TLS factory, counting its live connections: past C{total}
    live connections, or C{per_client} from one address, or C{shared}'s
    total across services, a new connection is accepted and closed at once;
    the refusals are counted and logged once per C{report} seconds at most.
    """

    protocol = TLSProtocol

    def __init__(
        self,
        certificates: Certificates,
        relay: RelayFactory,
        clock: IReactorTime,
        limits: Limits,
        shared: SharedLimit | None = None,
    ) -> None:
        super().__init__(ServerTLS(certificates), False, relay, clock)
        self._limit(limits, shared)

    def _limit(self, limits: Limits, shared: SharedLimit | None) -> None:
        self._limits = limits
        self._service = typing.cast(RelayFactory, self.wrappedFactory).service
        self._shared = shared or SharedLimit()
        self._shared.factories.append(self)
        self._hosts: dict[IProtocol, str | None] = {}
        self._per_client: Counter[str | None] = Counter()
        self.accepted = 0
        self.refused = 0
        self._unreported = 0

    @override
    def buildProtocol(self, addr: IAddress | None) -> IProtocol:  # type: ignore[override]
        # (Twisted's ports take any protocol, not only TLS ones.)
        host = host_port(addr)[0]
        if (
            len(self.protocols) >= self._limits.total
            or self._per_client[host] >= self._limits.per_client
            or self._shared.full()
        ):
            self.refused += 1
            self._unreported += 1
            if self._unreported == 1:
                self._clock.callLater(self._limits.report, self._report)
            return _Refused()
        self.accepted += 1
        protocol = super().buildProtocol(addr)
        self._hosts[protocol] = host
        self._per_client[host] += 1
        return protocol

    @override
    def unregisterProtocol(self, protocol: IProtocol) -> None:
        super().unregisterProtocol(protocol)  # type: ignore[no-untyped-call]
        host = self._hosts.pop(protocol)
        self._per_client[host] -= 1
        if not self._per_client[host]:
            del self._per_client[host]

    @override
    def logPrefix(self) -> str:
        """The service's name: twistd logs "web (TLS) starting on 443"."""
        return f"{self._service} (TLS)"

    def _report(self) -> None:
        _log.warn(
            "[{service}] refused {count} connection(s) over the limits in"
            " {seconds} s ({live} live now)",
            service=self._service,
            count=self._unreported,
            seconds=self._limits.report,
            live=len(self.protocols),
        )
        self._unreported = 0


class LimitedPlainFactory(LimitedTLSFactory):
    """
    The limits and the drain of L{LimitedTLSFactory} for clients that speak
    plain TCP (C{--client}): a bare L{ProtocolWrapper}, no TLS, keeps count.
    """

    protocol = ProtocolWrapper  # type: ignore[assignment]
    logPrefix = WrappingFactory.logPrefix  # (not "... (TLS)")

    def __init__(
        self,
        relay: RelayFactory,
        clock: IReactorTime,
        limits: Limits,
        shared: SharedLimit | None = None,
    ) -> None:
        # (Past TLSMemoryBIOFactory's __init__, which wants a TLS context.)
        super(TLSMemoryBIOFactory, self).__init__(relay)  # type: ignore[no-untyped-call]
        self._clock = clock
        self._limit(limits, shared)


# How long session ticket keys live (and so the sessions they resume).
TICKET_KEY_LIFETIME = 3600.0

# How often live connections give back their empty TLS buffers.
SHED_INTERVAL = 10.0


class ProxyService(MultiService):
    """
    The listening service; new session ticket keys every
    L{TICKET_KEY_LIFETIME} seconds; every L{SHED_INTERVAL} seconds each
    connection's empty TLS buffers given back (L{ServerConnection.shed});
    certificates read again on L{reload};
    and on stop a drain: stop accepting, let live connections finish for
    C{drain} seconds, then abort the rest.
    """

    def __init__(
        self,
        listening: IService,
        tls: LimitedTLSFactory,
        clock: IReactorTime,
        config: ProxyConfig,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        listening.setServiceParent(self)
        self.tls = tls
        self.reload_failures = 0
        self.config = config
        self._clock = clock
        self._rotation = LoopingCall(self._rotate)
        self._rotation.clock = clock
        self._shedding = LoopingCall(self._shed)
        self._shedding.clock = clock
        # What a reload reads again: the certificates, the backend's CAs.
        self._files: list[Reloadable] = [
            files
            for files in (config.certificates, config.backend_tls)
            if files is not None
        ]

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.config.certificates is not None:  # (--client: plain TCP, no TLS)
            self._rotation.start(TICKET_KEY_LIFETIME, now=False)
            self._shedding.start(SHED_INTERVAL, now=False)

    def _rotate(self) -> None:
        typing.cast(Certificates, self.config.certificates).rotate()

    def _shed(self) -> None:
        for protocol in self.tls.protocols:
            typing.cast(ServerConnection, protocol.getHandle()).shed()

    def reload(self) -> None:
        """
        Read the certificate, key and CA files again, for new connections;
        a file that is now missing or bad keeps the old ones (of the server
        or of the backend), with one line in the log.
        """
        failed = False
        for files in self._files:
            try:
                files.reload()
            except ConfigError as e:
                failed = True
                _log.error(
                    "{service}: reload failed, the old certificates stay: {error}",
                    service=self.config.service,
                    error=str(e),
                )
        self.reload_failures += failed
        if not failed:
            _log.info("{service}: certificates reloaded", service=self.config.service)

    @override
    def stopService(self) -> Deferred[None]:
        if self._rotation.running:  # (not under --client, or before it started)
            self._rotation.stop()
            self._shedding.stop()
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._drained(stopped))

    async def _drained(self, stopped: Deferred[object]) -> None:
        await stopped
        deadline = self._clock.seconds() + self.config.limits.drain
        while self.tls.protocols and self._clock.seconds() < deadline:
            await deferLater(self._clock, 0.05, lambda: None)
        for protocol in list(self.tls.protocols):
            typing.cast(ClientSide, protocol.wrappedProtocol).abort("drain timeout")
        # Aborted connections end at the next turn, writing their records.
        while self.tls.protocols and self._clock.seconds() < deadline + 1:
            await deferLater(self._clock, 0.01, lambda: None)


def proxy_service(
    config: ProxyConfig,
    reactor: IReactorCore,
    observe: RecordObserver = log_close,
    shared: SharedLimit | None = None,
) -> ProxyService:
    """
    The service for C{config}: it binds its port in C{privilegedStartService}
    (as root, under twistd) and raises there if it cannot.

    @param reactor: the reactor to listen, connect and time with.
    @param observe: called with each connection record.
    @param shared: a limit on live connections shared with other services.

    @raise ValueError: an endpoint string is not understood.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    at_once = AtOnce(reactor)  # (for TCP endpoints: see tlsproxy.eager)
    relay = RelayFactory(
        connect=backend_endpoint(at_once, config.connect, config.backend_tls),
        clock=clock,
        observe=observe,
        timeouts=config.timeouts,
        service=config.service,
        header=config.header,
        allow=config.allow,
    )
    tls = _client_factory(config, relay, clock, shared)
    reuse = config.reuse_port
    listener = _ReusePort(at_once, config.steer_clients) if reuse else at_once
    listen, factory = config.listen, typing.cast(IProtocolFactory, tls)
    if listen.lower().startswith(BALANCED):
        listen, factory = listen[len(BALANCED) :], behind_balancer(tls)
    listening = strports.service(
        listen, factory, reactor=typing.cast(IReactorCore, listener)
    )
    return ProxyService(listening, tls, clock, config)


def _client_factory(
    config: ProxyConfig,
    relay: RelayFactory,
    clock: IReactorTime,
    shared: SharedLimit | None,
) -> LimitedTLSFactory:
    """The factory for the clients' connections: TLS, or plain (C{--client})."""
    if config.certificates is None:
        return LimitedPlainFactory(relay, clock, config.limits, shared)
    return LimitedTLSFactory(config.certificates, relay, clock, config.limits, shared)
