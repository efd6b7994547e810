"""Prometheus metrics of the records and services' counts, served at /metrics."""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .endpoints import binds
from .record import ConnectionRecord

if typing.TYPE_CHECKING:
    from .service import ProxyService

_log = Logger(namespace="tlsproxy")
_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The counts read from each service when scraped.
_COUNTS: list[tuple[str, Callable[[ProxyService], int], str]] = [
    ("connections_live", lambda s: len(s.relay.live), "Connections open now."),
    ("connections_accepted", lambda s: s.relay.admission.accepted, "Not refused."),
    ("connections_refused", lambda s: s.relay.admission.refused, "Over a limit."),
    (
        "reload_failures",
        lambda s: s.reload_failures,
        "Reloads that kept the old files.",
    ),
]


def reason_kind(reason: str | None) -> str:
    """A close reason without its detail: "backend connect failed", say."""
    return (reason or "").split(":")[0]


class Metrics:
    """A process's metrics: L{observe} counts records, L{watch} adds a service."""

    def __init__(self) -> None:
        self._services: dict[str, ProxyService] = {}
        self.registry = reg = CollectorRegistry()
        reg.register(self)
        self._closed, self._failures, self._bytes = (
            Counter(f"tlsproxy_{name}", text, ["service", label], registry=reg)
            for name, label, text in [
                ("connections_closed", "reason", "Connections ended."),
                ("handshake_failures", "reason", "Ended before the TLS handshake."),
                ("bytes", "direction", "Bytes relayed, counted when connections end."),
            ]
        )
        self._handshake, self._connect = (
            Histogram(
                f"tlsproxy_{name}", text, ["service"], buckets=_LATENCY, registry=reg
            )
            for name, text in [
                ("handshake_seconds", "TLS handshake time, from the accept."),
                (
                    "backend_connect_seconds",
                    "Backend connect time, from the handshake.",
                ),
            ]
        )

    def watch(self, name: str, service: ProxyService) -> None:
        """Report C{service}'s counts, labelled C{name}."""
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
        elif watched is None or watched.relay.tls:  # (--client: no handshake to fail)
            self._failures.labels(service, kind).inc()

    def collect(self) -> Iterator[Metric]:
        """The services' counts, as the registry reads them when scraped."""
        for name, count, text in _COUNTS:
            kind = GaugeMetricFamily if name.endswith("live") else CounterMetricFamily
            family = kind(f"tlsproxy_{name}", text, labels=["service"])
            for service, counts in self._services.items():
                family.add_metric([service], count(counts))
            yield family

    def service(self, endpoint: str, reactor: object) -> IService:
        """The page's service on C{endpoint}, warned of if beyond loopback."""
        kind, _, interface = binds(endpoint)
        if kind == "tcp" and not _loopback(interface):
            _log.warn(
                "--metrics {endpoint}: listening beyond loopback; anyone who"
                " reaches it sees the services and their counts",
                endpoint=endpoint,
            )
        page = Site(Page(self.registry))
        return strports.service(endpoint, page, typing.cast(IReactorCore, reactor))


def _loopback(interface: str) -> bool:
    """Whether C{interface} (an IP address, or empty: all) is a loopback one."""
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


class Page(Resource):
    """The registry's metrics at C{/metrics}; any other path is not found."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        if request.postpath != [b"metrics"]:
            request.setResponseCode(404)
            return b"Not found: the metrics are at /metrics\n"
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return generate_latest(self._registry)
