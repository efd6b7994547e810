"""
Listening: the factories that accept each client (with TLS, or plain under
C{--client}) within the connection limits, a front balancer's PROXY header
read before anything else (C{--listen haproxy:...}), and the port bound with
C{SO_REUSEPORT} when several processes share it.
"""

from __future__ import annotations

import math
import typing
from collections import Counter

from twisted.application import strports
from twisted.application.service import IService
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
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from typing_extensions import override

from .context import Certificates, ServerTLS
from .endpoints import behind_balancer
from .flow import TLSProtocol
from .peer import Proxied, host_port
from .proxyheader import Addresses, parse
from .values import Limits

_log = Logger(namespace="tlsproxy")


class SharedLimit:
    """At most C{total} live connections across the factories that share it."""

    def __init__(self, total: float = math.inf) -> None:
        self.total = total
        self.factories: list[WrappingFactory[typing.Any]] = []

    def full(self) -> bool:
        """Whether the factories have C{total} live connections between them."""
        return sum(len(f.protocols) for f in self.factories) >= self.total


class _Refused(Protocol):
    """A connection over a limit: closed at once, before any TLS byte."""

    @override
    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class _Limiting(WrappingFactory[typing.Any]):
    """
    A wrapping factory counting its live connections (L{protocols}): past
    C{limits.total}, or C{limits.per_client} from one address, or
    C{shared}'s total, a new connection is accepted and closed at once; the
    refusals are counted, and logged once per C{limits.report} seconds.
    """

    def _limit(self, clock: IReactorTime, limits: Limits, shared: SharedLimit) -> None:
        self._timer, self._limits, self._shared = clock, limits, shared
        shared.factories.append(self)
        self._hosts: dict[IProtocol, str | None] = {}
        self._per_client: Counter[str | None] = Counter()
        self.accepted = self.refused = self._unreported = 0

    @override
    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:
        host = host_port(addr)[0]
        if (
            len(self.protocols) >= self._limits.total
            or self._per_client[host] >= self._limits.per_client
            or self._shared.full()
        ):
            self.refused += 1
            self._unreported += 1
            if self._unreported == 1:
                self._timer.callLater(self._limits.report, self._report)
            return _Refused()
        self.accepted += 1
        protocol: IProtocol = super().buildProtocol(addr)
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
            "[{service}] refused {count} connection(s) over the limits in"
            " {seconds} s ({live} live now)",
            service=self.wrappedFactory.logPrefix(),
            count=self._unreported,
            seconds=self._limits.report,
            live=len(self.protocols),
        )
        self._unreported = 0


class LimitedTLSFactory(_Limiting, TLSMemoryBIOFactory):
    """TLS toward the clients, with the limits of L{_Limiting}."""

    protocol = TLSProtocol

    def __init__(
        self,
        certificates: Certificates,
        relay: ServerFactory,
        clock: IReactorTime,
        limits: Limits,
        shared: SharedLimit,
    ) -> None:
        TLSMemoryBIOFactory.__init__(self, ServerTLS(certificates), False, relay, clock)
        self._limit(clock, limits, shared)


class LimitedPlainFactory(_Limiting):
    """Plain TCP clients (C{--client}), with the limits of L{_Limiting}."""

    def __init__(
        self,
        relay: ServerFactory,
        clock: IReactorTime,
        limits: Limits,
        shared: SharedLimit,
    ) -> None:
        super().__init__(relay)  # type: ignore[no-untyped-call]
        self._limit(clock, limits, shared)


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


def behind_balancer_factory(
    factory: IProtocolFactory,
) -> WrappingFactory[ProtocolWrapper]:
    """C{factory}, each of its connections read from after a PROXY header."""
    wrapping = WrappingFactory(factory)
    wrapping.protocol = _BehindBalancer
    return wrapping


class _ReusePort:
    """
    A reactor for C{tcp:} and C{tcp6:} endpoints (which call only
    C{listenTCP}) that binds with C{SO_REUSEPORT} too.  On Linux the
    processes sharing a port must all set it and have the same effective
    uid when they bind (root, under twistd); the kernel spreads new
    connections among them by a hash of the addresses and ports.
    """

    def __init__(self, reactor: object) -> None:
        self._reactor = typing.cast(IReactorTCP2, reactor)  # (26.10: a binding)

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int, interface: str
    ) -> IListeningPort:
        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        return self._reactor.listenTCP(binding, factory, backlog, interface)


def listening(
    listen: str, factory: IProtocolFactory, reactor: object, reuse_port: bool
) -> IService:
    """
    The service that listens on C{listen} for C{factory}: it binds in
    C{privilegedStartService}, and raises there if it cannot.
    """
    balanced, endpoint = behind_balancer(listen)
    if balanced:
        factory = behind_balancer_factory(factory)
    binder = _ReusePort(reactor) if reuse_port else reactor
    return strports.service(endpoint, factory, typing.cast(IReactorCore, binder))
