"""
Accepting: the limits (refused before any TLS byte, logged now and then),
TLS over the relay, a balancer's PROXY header first, C{SO_REUSEPORT}.
"""

from __future__ import annotations

import math
import typing

from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
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

from .context import Certificates
from .endpoints import behind_balancer
from .flow import TLSProtocol
from .peer import Proxied
from .proxyheader import Addresses, parse
from .values import Limits

_log = Logger(namespace="tlsproxy")


class SharedLimit:
    """At most C{total} live connections across the admissions that share it."""

    def __init__(self, total: float = math.inf) -> None:
        self.total = total
        self.admissions: list[Admission] = []

    def full(self) -> bool:
        return sum(a.live for a in self.admissions) >= self.total


class Admission:
    """The live connections of C{service}, within C{limits}."""

    def __init__(
        self, service: str, limits: Limits, shared: SharedLimit, clock: IReactorTime
    ) -> None:
        self._service, self._limits, self._shared = service, limits, shared
        self._clock = clock
        shared.admissions.append(self)
        self.live = self.accepted = self.refused = self._unreported = 0

    def admit(self) -> bool:
        """Whether a new connection is let in (and counted)."""
        if self.live >= self._limits.total or self._shared.full():
            self.refused += 1
            self._unreported += 1
            if self._unreported == 1:
                self._clock.callLater(self._limits.report, self._report)
            return False
        self.accepted += 1
        self.live += 1
        return True

    def release(self) -> None:
        """An admitted connection has ended."""
        self.live -= 1

    def _report(self) -> None:
        _log.warn(
            "[{service}] refused {count} connection(s) over the limits in"
            " {seconds} s ({live} live now)",
            service=self._service,
            count=self._unreported,
            seconds=self._limits.report,
            live=self.live,
        )
        self._unreported = 0


class Refused(Protocol):
    """A connection not admitted: closed at once, before any TLS byte."""

    @override
    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class _BehindBalancer(ProtocolWrapper):
    """
    A connection from a balancer: a valid PROXY header first (else it is
    aborted), giving the client's and the destination's addresses.
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
    A reactor for C{tcp:} endpoints that binds with C{SO_REUSEPORT} (Linux:
    the sharers bind with one euid; the kernel hashes connections to them).
    """

    def __init__(self, reactor: object) -> None:
        self._reactor = typing.cast(IReactorTCP2, reactor)  # (26.10: a binding)

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int, interface: str
    ) -> IListeningPort:
        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        return self._reactor.listenTCP(binding, factory, backlog, interface)


def accepting(
    relay: IProtocolFactory, certificates: Certificates | None, clock: IReactorTime
) -> IProtocolFactory:
    """C{relay}'s factory under TLS with C{certificates} (C{None}: plain TCP)."""
    if certificates is None:
        return relay
    tls = TLSMemoryBIOFactory(certificates, False, relay, clock)
    tls.protocol = TLSProtocol
    return tls


def listening(
    listen: str, factory: IProtocolFactory, reactor: object, reuse_port: bool
) -> IService:
    """The service of C{factory} on C{listen}; it binds (or raises) when started."""
    balanced, endpoint = behind_balancer(listen)
    if balanced:
        factory = behind_balancer_factory(factory)
    binder = _ReusePort(reactor) if reuse_port else reactor
    return strports.service(endpoint, factory, typing.cast(IReactorCore, binder))
