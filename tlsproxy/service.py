"""
The service tree: a listening TLS endpoint whose connections are relayed to
one backend endpoint, with connection records sent to an observer.

This is the public way to embed tlsproxy in another Twisted application
(see README.rst, "Embedding").
"""

from __future__ import annotations

import math
import typing
from collections import Counter

import attrs
from OpenSSL import SSL
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocol, IReactorCore, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from typing_extensions import override

from .backend import BackendTLS, backend_endpoint
from .proxyheader import HeaderEncoder, no_header
from .record import RecordObserver, host_port, log_close
from .relay import ClientSide, RelayFactory, Timeouts
from .tls import ANY_CERTIFICATE, AllowList, ServerTLS

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


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """
    One proxy service: accept TLS on C{listen} (a server endpoint string),
    with C{context}, and relay each connection to C{connect} (a client
    endpoint string), after C{header} (a PROXY protocol header encoder from
    L{tlsproxy.proxyheader}, or none).  A C{tls:HOST:PORT} C{connect} needs
    C{backend_tls}, and then C{context} may be C{None}: plain TCP is
    accepted (C{--client}).
    """

    listen: str
    connect: str
    context: SSL.Context | None
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    service: str = "tlsproxy"
    header: HeaderEncoder = no_header
    limits: Limits = attrs.field(factory=Limits)
    allow: AllowList = ANY_CERTIFICATE
    backend_tls: BackendTLS | None = None


class _Refused(Protocol):
    """A connection over a limit: closed at once, before any TLS byte."""

    @override
    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class LimitedTLSFactory(TLSMemoryBIOFactory):
    """
    Twisted's TLS factory, counting its live connections: past C{total}
    live connections, or C{per_client} from one address, a new connection is
    accepted and closed at once; the refusals are counted and logged once
    per C{report} seconds at most.
    """

    def __init__(
        self,
        context: SSL.Context,
        relay: RelayFactory,
        clock: IReactorTime,
        limits: Limits,
    ) -> None:
        super().__init__(ServerTLS(context), False, relay, clock)
        self._limit(limits)

    def _limit(self, limits: Limits) -> None:
        self._limits = limits
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

    def _report(self) -> None:
        _log.warn(
            "refused {count} connection(s) over the limits in {seconds} s"
            " ({live} live now)",
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

    def __init__(self, relay: RelayFactory, clock: IReactorTime, limits: Limits):
        # (Past TLSMemoryBIOFactory's __init__, which wants a TLS context.)
        super(TLSMemoryBIOFactory, self).__init__(relay)  # type: ignore[no-untyped-call]
        self._clock = clock
        self._limit(limits)


class ProxyService(MultiService):
    """
    The listening service, and on stop a drain: stop accepting, let live
    connections finish for C{drain} seconds, then abort the rest.
    """

    def __init__(
        self,
        listening: IService,
        tls: LimitedTLSFactory,
        clock: IReactorTime,
        drain: float,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        listening.setServiceParent(self)
        self.tls = tls
        self._clock = clock
        self._drain = drain

    @override
    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._drained(stopped))

    async def _drained(self, stopped: Deferred[object]) -> None:
        await stopped
        deadline = self._clock.seconds() + self._drain
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
) -> ProxyService:
    """
    The service for C{config}: it binds its port in C{privilegedStartService}
    (as root, under twistd) and raises there if it cannot.

    @param reactor: the reactor to listen, connect and time with.
    @param observe: called with each connection record.

    @raise ValueError: an endpoint string is not understood.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    relay = RelayFactory(
        connect=backend_endpoint(reactor, config.connect, config.backend_tls),
        clock=clock,
        observe=observe,
        timeouts=config.timeouts,
        service=config.service,
        header=config.header,
        allow=config.allow,
    )
    tls = _client_factory(config, relay, clock)
    listening = strports.service(config.listen, tls, reactor=reactor)
    return ProxyService(listening, tls, clock, config.limits.drain)


def _client_factory(
    config: ProxyConfig, relay: RelayFactory, clock: IReactorTime
) -> LimitedTLSFactory:
    """The factory for the clients' connections: TLS, or plain with no context."""
    if config.context is None:
        return LimitedPlainFactory(relay, clock, config.limits)
    return LimitedTLSFactory(config.context, relay, clock, config.limits)
