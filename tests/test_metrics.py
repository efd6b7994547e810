"""
Prometheus metrics: from records and live counts, in memory; and scraped
from the real twistd.
"""

from __future__ import annotations

import unittest

import attrs
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tlsproxy import tap
from tlsproxy.metrics import Metrics, Page, reason_kind
from tlsproxy.record import ConnectionRecord
from tlsproxy.service import ProxyService
from tlsproxy.values import Limits, ProxyConfig

from .harness import (
    curl_ok,
    make_certificates,
    start_http_backend,
    start_proxy,
    temp_dir,
)
from .memory import leaf_certificates
from .test_service import Accepting

LEAVES = leaf_certificates()

OPEN = ConnectionRecord(
    event="open",
    id="1",
    service="https",
    opened=100.0,
    handshake_time=0.02,
    connect_time=0.003,
    tls_version="TLSv1.3",
)
CLOSE = attrs.evolve(
    OPEN,
    event="close",
    bytes_from_client=10,
    bytes_to_client=2000,
    reason="backend closed",
)
FAILED = ConnectionRecord(
    event="close",
    id="2",
    service="https",
    opened=100.0,
    reason="TLS error: wrong version number",
)


def watched(accepting: Accepting, tls: bool = True) -> ProxyService:
    """A service around what C{accepting} accepts, for the metrics to watch."""
    accepting.relay.tls = tls
    config = ProxyConfig(listen="tcp:0", connect="tcp:h:1", certificates=LEAVES)
    return accepting.service(config)


class MetricsTests(SynchronousTestCase):
    """What each record and each service adds."""

    def setUp(self) -> None:
        self.metrics = Metrics()

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_reason_kind(self) -> None:
        """A reason's kind drops its detail, which would make labels unbounded."""
        self.assertEqual(
            reason_kind("backend connect failed: refused"), "backend connect failed"
        )
        self.assertEqual(reason_kind("client closed"), "client closed")
        self.assertEqual(reason_kind(None), "")

    def test_connection(self) -> None:
        """A relayed connection counts its close reason, bytes and latencies."""
        self.metrics.observe(OPEN)
        self.metrics.observe(CLOSE)
        self.assertEqual(
            self.sample(
                "tlsproxy_connections_closed_total",
                service="https",
                reason="backend closed",
            ),
            1,
        )
        self.assertEqual(
            self.sample("tlsproxy_bytes_total", service="https", direction="to_client"),
            2000,
        )
        self.assertEqual(
            self.sample(
                "tlsproxy_bytes_total", service="https", direction="from_client"
            ),
            10,
        )
        self.assertEqual(
            self.sample("tlsproxy_handshake_seconds_sum", service="https"), 0.02
        )
        self.assertEqual(
            self.sample(
                "tlsproxy_backend_connect_seconds_bucket", service="https", le="0.005"
            ),
            1,
        )
        self.assertIsNone(
            self.sample(
                "tlsproxy_handshake_failures_total", service="https", reason="TLS error"
            )
        )

    def test_handshake_failure(self) -> None:
        """A connection that never completed its handshake is a failure, by kind."""
        self.metrics.observe(FAILED)
        self.assertEqual(
            self.sample(
                "tlsproxy_handshake_failures_total", service="https", reason="TLS error"
            ),
            1,
        )
        self.assertEqual(
            self.sample("tlsproxy_handshake_seconds_count", service="https"), None
        )

    def test_plain_clients(self) -> None:
        """Under --client there is no handshake to fail."""
        self.metrics.watch("https", watched(Accepting(Limits()), tls=False))
        self.metrics.observe(FAILED)
        self.assertIsNone(
            self.sample(
                "tlsproxy_handshake_failures_total", service="https", reason="TLS error"
            )
        )
        self.assertEqual(
            self.sample(
                "tlsproxy_connections_closed_total", service="https", reason="TLS error"
            ),
            1,
        )

    def test_live_counts(self) -> None:
        """Live, accepted and refused connections are read when scraped."""
        accepting = Accepting(Limits(total=1))
        self.metrics.watch("https", watched(accepting))
        first = accepting.accept("192.0.2.1")
        accepting.accept("192.0.2.2")
        self.assertEqual(self.sample("tlsproxy_connections_live", service="https"), 1)
        self.assertEqual(
            self.sample("tlsproxy_connections_accepted_total", service="https"), 1
        )
        self.assertEqual(
            self.sample("tlsproxy_connections_refused_total", service="https"), 1
        )
        accepting.close(first)
        self.assertEqual(self.sample("tlsproxy_connections_live", service="https"), 0)

    def test_reload_failures(self) -> None:
        """Each reload that kept the old certificates is counted."""
        service = watched(Accepting(Limits()))
        self.metrics.watch("https", service)
        name = "tlsproxy_reload_failures_total"
        self.assertEqual(self.sample(name, service="https"), 0)
        service.reload_failures += 2
        self.assertEqual(self.sample(name, service="https"), 2)

    def test_only_its_path(self) -> None:
        """Any other path than /metrics is not found, and shows nothing."""
        self.metrics.observe(CLOSE)
        for path in [[b""], [b"metrics", b""], [b"x"], [b"metrics", b"x"]]:
            request = DummyRequest(path)
            body = Page(self.metrics.registry).render(request)
            self.assertEqual(request.responseCode, 404)
            self.assertNotIn(b"tlsproxy_", body)

    def test_page(self) -> None:
        """The page is Prometheus' text format."""
        self.metrics.observe(CLOSE)
        request = DummyRequest([b"metrics"])
        body = Page(self.metrics.registry).render(request)
        self.assertIn(b"tlsproxy_connections_closed_total{", body)
        self.assertTrue(
            request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
                b"text/plain"
            )
        )


class OptionTests(SynchronousTestCase):
    """--metrics ENDPOINT."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--connect", "tcp:h:1", "--self-signed", "x", *args])
        return options

    def test_metrics(self) -> None:
        """--metrics makes the metrics an observer, and a service serves them."""
        options = self.parse("--metrics", "tcp:0:interface=127.0.0.1")
        assert options.metrics is not None
        self.assertIn(options.metrics.observe, options.observers)
        top = tap.makeService(options)
        self.assertEqual(len(list(top)), 2)  # type: ignore[call-overload]

    def test_beyond_loopback(self) -> None:
        """
        Metrics on every interface, or on one that is not loopback, are
        warned about at start-up; on loopback (or a UNIX socket), not.
        """
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for endpoint, warned in [
            ("tcp:9100", True),
            ("tcp:9100:interface=10.0.0.3", True),
            ("tcp:9100:interface=localhost", True),
            ("tcp:9100:interface=127.0.0.1", False),
            ("tcp6:9100:interface=\\:\\:1", False),
            ("unix:/run/metrics.sock", False),
        ]:
            del events[:]
            tap.makeService(self.parse("--metrics", endpoint))
            said = [e for e in events if e.get("endpoint") == endpoint]
            self.assertEqual(len(said), warned, endpoint)

    def test_none(self) -> None:
        """Without --metrics there are none."""
        options = self.parse()
        self.assertIsNone(options.metrics)
        self.assertEqual(len(list(tap.makeService(options))), 1)  # type: ignore[call-overload]

    def test_bad_endpoint(self) -> None:
        """A bad endpoint is a one-line error."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--metrics", "bogus:1")
        self.assertEqual(
            str(caught.exception), "--metrics bogus:1: Unknown endpoint type: 'bogus'"
        )


class ScrapeTests(unittest.TestCase):
    """The real twistd serves its metrics."""

    def test_scrape(self) -> None:
        """After one request, a scrape shows it accepted, closed and counted."""
        directory = temp_dir(self)
        certificates = make_certificates(directory)
        backend = start_http_backend(self)
        proxy = start_proxy(
            self,
            "--connect",
            f"tcp:127.0.0.1:{backend.port}",
            "--cert",
            str(certificates.cert),
            "--key",
            str(certificates.key),
            "--metrics",
            "tcp:0:interface=127.0.0.1",
        )
        [port] = [m.group(1) for m in proxy.wait_for_log(r"Site starting on (\d+)")]
        curl_ok("--cacert", str(certificates.ca), f"https://localhost:{proxy.port}/")
        proxy.wait_for_closes(1)
        page = curl_ok(f"http://127.0.0.1:{port}/metrics").decode()
        self.assertIn(
            'tlsproxy_connections_accepted_total{service="tlsproxy"} 1.0', page
        )
        self.assertRegex(
            page,
            r'tlsproxy_connections_closed_total\{reason="(client|backend) closed",'
            r'service="tlsproxy"\} 1\.0',
        )
        self.assertIn('tlsproxy_handshake_seconds_count{service="tlsproxy"} 1.0', page)
