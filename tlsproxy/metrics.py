"""
Prometheus metrics, made by prometheus_client from the connection records
and the services' live counts, served over HTTP on their own endpoint.
"""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .endpoints import binds
from .record import ConnectionRecord

_log = Logger(namespace="tlsproxy")


class Watched(typing.Protocol):
    """A service's counts, read when scraped (L{tlsproxy.service.ProxyService})."""

    reload_failures: int

    @property
    def tls(self) -> bool: ...  # whether its clients speak TLS

    @property
    def live(self) -> int: ...

    @property
    def accepted(self) -> int: ...

    @property
    def refused(self) -> int: ...


PATH = [b"metrics"]  # /metrics, as the request's path segments

_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def reason_kind(reason: str | None) -> str:
    """A close reason without its detail: "backend connect failed", say."""
    return (reason or "").split(":")[0]


class Metrics:
    """
    The metrics of one process: a record observer (L{observe}) and the live
    counts and reload failures of each service (L{watch}).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._services: dict[str, Watched] = {}
        self.registry.register(_Counts(self._services))
        self._closed = Counter(
            "tlsproxy_connections_closed",
            "Connections ended, by service and close reason.",
            ["service", "reason"],
            registry=self.registry,
        )
        self._handshake_failures = Counter(
            "tlsproxy_handshake_failures",
            "Connections that ended before their TLS handshake completed.",
            ["service", "reason"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "tlsproxy_bytes",
            "Bytes relayed, counted when a connection ends.",
            ["service", "direction"],
            registry=self.registry,
        )
        self._handshake = Histogram(
            "tlsproxy_handshake_seconds",
            "TLS handshake time, from the accept.",
            ["service"],
            buckets=_LATENCY,
            registry=self.registry,
        )
        self._connect = Histogram(
            "tlsproxy_backend_connect_seconds",
            "Backend connection time, from the end of the handshake.",
            ["service"],
            buckets=_LATENCY,
            registry=self.registry,
        )

    def watch(self, name: str, service: Watched) -> None:
        """Report C{service}'s connections and failed reloads, as C{name}."""
        self._services[name] = service

    def observe(self, record: ConnectionRecord) -> None:
        """Count a connection record."""
        service = record.service
        if record.event == "open":
            self._connect.labels(service).observe(record.connect_time or 0.0)
            return
        kind = reason_kind(record.reason)
        self._closed.labels(service, kind).inc()
        self._bytes.labels(service, "from_client").inc(record.bytes_from_client)
        self._bytes.labels(service, "to_client").inc(record.bytes_to_client)
        watched = self._services.get(service)
        if record.handshake_time is not None:
            self._handshake.labels(service).observe(record.handshake_time)
        elif watched is None or watched.tls:
            # (Under --client there is no handshake to fail.)
            self._handshake_failures.labels(service, kind).inc()

    def page(self) -> Resource:
        """The HTTP resource that serves the metrics on L{PATH}, and only there."""
        return _Page(self.registry)

    def service(self, endpoint: str, reactor: object) -> IService:
        """
        The service of L{page} on C{endpoint}, with a warning if it listens
        beyond loopback (the page names the services and their counts).
        """
        kind, _, interface = binds(endpoint)
        if kind == "tcp" and not _loopback(interface):
            _log.warn(
                "--metrics {endpoint}: listening beyond loopback; anyone who"
                " reaches it sees the services and their counts",
                endpoint=endpoint,
            )
        return strports.service(
            endpoint, Site(self.page()), typing.cast(IReactorCore, reactor)
        )


def _loopback(interface: str) -> bool:
    """Whether C{interface} (an IP address, or empty: all) is a loopback one."""
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


class _Counts(Collector):
    """Live, accepted and refused connections and failed reloads, when scraped."""

    def __init__(self, services: dict[str, Watched]) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily(
            "tlsproxy_connections_live", "Connections open now.", labels=["service"]
        )
        accepted = CounterMetricFamily(
            "tlsproxy_connections_accepted",
            "Connections accepted (not refused).",
            labels=["service"],
        )
        refused = CounterMetricFamily(
            "tlsproxy_connections_refused",
            "Connections closed at once: over a limit.",
            labels=["service"],
        )
        reloads = CounterMetricFamily(
            "tlsproxy_reload_failures",
            "Reloads (SIGHUP) that kept the old certificates: a file was bad.",
            labels=["service"],
        )
        for name, service in self._services.items():
            live.add_metric([name], service.live)
            accepted.add_metric([name], service.accepted)
            refused.add_metric([name], service.refused)
            reloads.add_metric([name], service.reload_failures)
        yield from (live, accepted, refused, reloads)


class _Page(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        if request.postpath != PATH:
            request.setResponseCode(404)
            return b"Not found: the metrics are at /metrics\n"
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return generate_latest(self._registry)
