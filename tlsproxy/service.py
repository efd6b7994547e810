"""
The service tree: a listening TLS endpoint whose connections are relayed to
one backend endpoint, with connection records sent to an observer.

This is the public way to embed tlsproxy in another Twisted application
(see README.rst, "Embedding").
"""

from __future__ import annotations

import attrs
from OpenSSL import SSL
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from .proxyheader import HeaderEncoder, no_header
from .record import RecordObserver, log_close
from .relay import RelayFactory, Timeouts
from .tls import ServerTLS


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """
    One proxy service: accept TLS on C{listen} (a server endpoint string),
    with C{context}, and relay each connection to C{connect} (a client
    endpoint string), after C{header} (a PROXY protocol header encoder from
    L{tlsproxy.proxyheader}, or none).
    """

    listen: str
    connect: str
    context: SSL.Context
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    service: str = "tlsproxy"
    header: HeaderEncoder = no_header


def proxy_service(
    config: ProxyConfig,
    reactor: IReactorCore,
    observe: RecordObserver = log_close,
) -> IService:
    """
    The service for C{config}: it binds its port in C{privilegedStartService}
    (as root, under twistd) and raises there if it cannot.

    @param reactor: the reactor to listen, connect and time with.
    @param observe: called with each connection record.

    @raise ValueError: an endpoint string is not understood.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    relay = RelayFactory(
        connect=clientFromString(reactor, config.connect),
        clock=clock,
        observe=observe,
        timeouts=config.timeouts,
        service=config.service,
        header=config.header,
    )
    tls = TLSMemoryBIOFactory(ServerTLS(config.context), False, relay, clock)
    return strports.service(config.listen, tls, reactor=reactor)
