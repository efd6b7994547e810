"""
The service: connection limits, and the drain on stop.
"""

from __future__ import annotations

import math
import os
import signal

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorCore, IReactorThreads, ITCPTransport
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer, providedBy

from tlsproxy import tap
from tlsproxy.backend import Backend, BackendTLS
from tlsproxy.context import Certificates
from tlsproxy.credentials import Credentials
from tlsproxy.flow import TLSProtocol
from tlsproxy.listen import Admission, SharedLimit, accepting
from tlsproxy.process import Process
from tlsproxy.relay import RelayFactory
from tlsproxy.service import TICKET_KEY_LIFETIME, ProxyService
from tlsproxy.values import ConfigError, Limits, ProxyConfig

from .memory import CA, Endpoint, Transport, leaf_certificates


def address(host: str, port: int = 50000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class Accepting:
    """The shipped TLS factory over a relay, and the transports it accepted."""

    def __init__(
        self, limits: Limits, shared: SharedLimit | None = None, name: str = "test"
    ) -> None:
        self.clock = Clock()
        self.records: list[object] = []
        certificates = leaf_certificates()
        config = ProxyConfig(
            listen="tcp:0", connect="tcp:h:1", certificates=certificates, service=name
        )
        self.admission = Admission(name, limits, shared or SharedLimit(), self.clock)
        self.relay = RelayFactory(
            config,
            Backend(Endpoint(), None, self.clock),
            self.admission,
            self.clock,
            self.records.append,
        )
        self.factory = accepting(self.relay, certificates, self.clock)

    def service(self, config: ProxyConfig) -> ProxyService:
        """A proxy service of C{config} around what this accepts."""
        return ProxyService(config, Service(), self.relay, self.clock)

    def accept(self, host: str, port: int = 50000) -> Transport:
        """Accept a connection from C{host}; return its transport."""
        protocol = self.factory.buildProtocol(address(host, port))
        transport = Transport(
            protocol, True, address("127.0.0.1", 443), address(host, port)
        )
        transport.peer = Transport(None, False)
        protocol.makeConnection(transport)
        return transport

    def close(self, transport: Transport) -> None:
        """The connection behind C{transport} is lost."""
        transport.reportDisconnect()


class ProtocolTests(SynchronousTestCase):
    """The TLS protocol each accepted connection gets."""

    def test_shipped_protocol(self) -> None:
        """
        It is Twisted's buffering TLS transport (small writes aggregated),
        with the answers' flow control (L{TLSProtocol}); it provides what its
        transport provides; the relay is connected and the handshake awaits
        the client's hello.
        """
        accepting = Accepting(Limits())
        transport = accepting.accept("192.0.2.1")
        protocol = transport.protocol
        self.assertIsInstance(protocol, TLSProtocol)
        self.assertIsInstance(protocol, BufferingTLSTransport)
        self.assertTrue(ITCPTransport.providedBy(protocol))
        self.assertLessEqual(set(providedBy(transport)), set(providedBy(protocol)))
        self.assertIs(protocol.wrappedProtocol.transport, protocol)
        self.assertEqual(transport.stream, [])  # (a server speaks second)
        self.assertEqual(list(accepting.factory.protocols), [protocol])


class LimitTests(SynchronousTestCase):
    """Past a limit a connection is accepted and closed at once."""

    def test_total(self) -> None:
        """Past --max-connections live connections, new ones are closed."""
        accepting = Accepting(Limits(total=2))
        first = accepting.accept("192.0.2.1")
        accepting.accept("192.0.2.2")
        refused = accepting.accept("192.0.2.3")
        self.assertTrue(refused.aborted)
        self.assertFalse(first.aborted)
        self.assertEqual(accepting.admission.refused, 1)
        accepting.close(first)
        self.assertFalse(accepting.accept("192.0.2.3").aborted)

    def test_no_limits(self) -> None:
        """By default nothing is refused; closed connections are not counted."""
        accepting = Accepting(Limits())
        transports = [accepting.accept("192.0.2.1", n) for n in range(50)]
        self.assertFalse(any(t.aborted for t in transports))
        self.assertEqual(accepting.admission.live, 50)
        for transport in transports:
            accepting.close(transport)
        self.assertEqual(accepting.admission.live, 0)

    def test_report(self) -> None:
        """Refusals are logged once per report interval, with their count."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        accepting = Accepting(Limits(total=1, report=10))
        accepting.accept("192.0.2.1")
        for _ in range(3):
            accepting.accept("192.0.2.2")
        self.assertEqual([e for e in events if "count" in e], [])
        accepting.clock.advance(10)
        [event] = [e for e in events if "count" in e]
        self.assertEqual((event["count"], event["live"]), (3, 1))
        accepting.accept("192.0.2.2")
        accepting.clock.advance(10)
        self.assertEqual([e["count"] for e in events if "count" in e], [3, 1])
        self.assertEqual(event["service"], "test")

    def test_shared(self) -> None:
        """
        Past the shared total across services (--max-connections-total), a
        new connection to any of them is refused, and counted by the one
        refusing it; each service's own limits still apply.
        """
        shared = SharedLimit(3)
        web = Accepting(Limits(total=1), shared, "web")
        mail = Accepting(Limits(), shared, "mail")
        first = web.accept("192.0.2.1")
        self.assertTrue(web.accept("192.0.2.2").aborted)
        mail.accept("192.0.2.3")
        mail.accept("192.0.2.4")
        self.assertTrue(mail.accept("192.0.2.5").aborted)
        self.assertEqual((web.admission.refused, mail.admission.refused), (1, 1))
        web.close(first)
        self.assertFalse(mail.accept("192.0.2.5").aborted)

    def test_log_prefix(self) -> None:
        """twistd's lines about the port name the service."""
        self.assertEqual(
            Accepting(Limits(), name="web").factory.logPrefix(), "web (TLS)"
        )


class DrainTests(SynchronousTestCase):
    """On stop: stop listening, let live connections finish, then abort."""

    def setUp(self) -> None:
        self.accepting = Accepting(Limits())
        self.listening = Service()
        self.service = ProxyService(
            ProxyConfig(
                listen="tcp:0",
                connect="tcp:127.0.0.1:1",
                certificates=leaf_certificates(),
                limits=Limits(drain=5),
            ),
            self.listening,
            self.accepting.relay,
            self.accepting.clock,
        )
        self.service.startService()

    def stop(self) -> list[object]:
        stopped: list[object] = []
        self.service.stopService().addCallback(stopped.append)
        return stopped

    def test_nothing_live(self) -> None:
        """With no live connection the stop is immediate."""
        self.assertEqual(self.stop(), [None])
        self.assertFalse(self.listening.running)

    def test_finish_in_time(self) -> None:
        """A connection that ends within the drain time ends on its own."""
        transport = self.accepting.accept("192.0.2.1")
        stopped = self.stop()
        self.assertFalse(self.listening.running)
        self.accepting.clock.advance(1)
        self.assertEqual(stopped, [])
        self.accepting.close(transport)
        self.accepting.clock.advance(0.05)
        self.assertEqual(stopped, [None])
        self.assertFalse(transport.aborted)

    def test_drain_timeout(self) -> None:
        """A connection still live after the drain time is aborted, with its reason."""
        transport = self.accepting.accept("192.0.2.1")
        stopped = self.stop()
        self.accepting.clock.pump([0.05] * 99)
        self.assertFalse(transport.aborted)
        self.accepting.clock.pump([0.05] * 2)
        self.assertTrue(transport.aborted)
        self.accepting.close(transport)
        self.accepting.clock.advance(0.01)
        self.assertEqual(stopped, [None])
        [record] = self.accepting.records
        self.assertEqual(record.reason, "drain timeout")  # type: ignore[attr-defined]

    def test_bounded_after_abort(self) -> None:
        """Even a connection that never reports its end does not hold the stop."""
        self.accepting.accept("192.0.2.1")
        stopped = self.stop()
        self.accepting.clock.pump([0.05] * 101 + [0.01] * 101)
        self.assertEqual(stopped, [None])


class OptionTests(SynchronousTestCase):
    """--max-connections, --drain-timeout."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--connect", "tcp:h:1", "--self-signed", "x", *args])
        return options

    def test_defaults(self) -> None:
        """No limits by default, and ten seconds to drain."""
        limits = self.parse().config.limits
        self.assertEqual(limits.total, math.inf)
        self.assertEqual(limits.drain, 10)

    def test_values(self) -> None:
        """Each option reaches the limits."""
        limits = self.parse(
            "--max-connections", "1000", "--drain-timeout", "2.5"
        ).config.limits
        self.assertEqual((limits.total, limits.drain), (1000, 2.5))

    def test_bad_values(self) -> None:
        """A limit is a positive whole number."""
        for value in ("0", "00", "-1", "1.5", "many", "²", "9" * 19):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse("--max-connections", value)
            self.assertEqual(
                str(caught.exception),
                f"--max-connections {value}: must be a positive whole number",
            )


@implementer(IReactorCore, IReactorThreads)
class FakeReactor:
    """What Process asks of the reactor, recorded."""

    def __init__(self, running: bool = True) -> None:
        self.when_running: list[object] = []
        self.from_thread: list[object] = []
        self.stops = 0
        self.running = running

    def callWhenRunning(self, f: object) -> None:
        self.when_running.append(f)

    def callFromThread(self, f: object) -> None:
        self.from_thread.append(f)

    def stop(self) -> None:
        self.stops += 1
        if not self.running:
            raise ReactorNotRunning()
        self.running = False


class SigtermTests(SynchronousTestCase):
    """Under twistd, SIGTERM stops the reactor (drained), and the exit is 0."""

    def test_sigterm_stops(self) -> None:
        """
        Once the reactor runs, SIGTERM asks it to stop from the main loop;
        a second SIGTERM while stopping is harmless.
        """
        previous = signal.getsignal(signal.SIGTERM)
        self.addCleanup(signal.signal, signal.SIGTERM, previous)
        reactor = FakeReactor()
        service = Process(reactor)
        service.add(Service(), "--listen tcp:0")
        service.startService()
        [take] = reactor.when_running
        take()  # type: ignore[operator]
        os.kill(os.getpid(), signal.SIGTERM)
        [stop] = reactor.from_thread
        stop()  # type: ignore[operator]
        stop()  # type: ignore[operator]
        self.assertEqual(reactor.stops, 2)
        self.assertFalse(reactor.running)


class Reloaded(Service):
    """A stand-in for a proxy service: counts its reloads."""

    reloads = 0

    def reload(self) -> None:
        self.reloads += 1


class SighupTests(SynchronousTestCase):
    """Under twistd, SIGHUP reloads every service; stopping restores SIGHUP."""

    def test_sighup_reloads(self) -> None:
        """SIGHUP asks for a reload from the main loop; stop restores it."""
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.addCleanup(signal.signal, signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        reactor = FakeReactor()
        proxy = Reloaded()
        service = Process(reactor)
        service.add(proxy, "--listen tcp:0")
        service.proxies.append(proxy)  # type: ignore[arg-type]
        service.startService()
        [take] = reactor.when_running
        take()  # type: ignore[operator]
        os.kill(os.getpid(), signal.SIGHUP)
        [reload] = reactor.from_thread
        self.assertEqual(proxy.reloads, 0)
        reload()  # type: ignore[operator]
        self.assertEqual(proxy.reloads, 1)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)


class ReloadTests(SynchronousTestCase):
    """A proxy service reloads its certificates, and rotates ticket keys."""

    def setUp(self) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.accepting = Accepting(Limits())
        self.certificates = leaf_certificates()
        self.service = self.accepting.service(
            ProxyConfig(
                listen="tcp:0",
                connect="tcp:127.0.0.1:1",
                certificates=self.certificates,
                service="web",
            )
        )

    def messages(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("service") == "web"]

    def test_reload(self) -> None:
        """A good reload is used and logged."""
        old = self.certificates.context
        self.service.reload()
        self.assertIsNot(self.certificates.context, old)
        self.assertEqual(self.messages(), ["web: certificates reloaded"])

    def test_failed_reload(self) -> None:
        """A failed reload keeps the old certificates, with one line."""
        old = self.certificates.context

        def fail() -> Credentials:
            raise ConfigError("--cert /x.pem: No such file or directory")

        self.certificates.read = fail
        self.service.reload()
        self.assertIs(self.certificates.context, old)
        self.assertEqual(
            self.messages(),
            [
                "web: reload failed, the old certificates stay:"
                " --cert /x.pem: No such file or directory"
            ],
        )

    def test_rotation(self) -> None:
        """Ticket keys are new each TICKET_KEY_LIFETIME while running."""
        contexts = [self.certificates.context]
        self.service.startService()
        self.accepting.clock.advance(TICKET_KEY_LIFETIME - 1)
        self.assertIs(self.certificates.context, contexts[0])
        for _ in range(2):
            self.accepting.clock.advance(1)
            self.assertNotIn(self.certificates.context, contexts)
            contexts.append(self.certificates.context)
            self.accepting.clock.advance(TICKET_KEY_LIFETIME - 1)
        self.service.stopService()
        self.accepting.clock.advance(TICKET_KEY_LIFETIME)
        self.assertIs(self.certificates.context, contexts[-1])


class BackendReloadTests(SynchronousTestCase):
    """A reload reads the backend's CA file too; --client has no ticket keys."""

    def setUp(self) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.ca = self.mktemp()
        CA.cert_pem.write_to_path(self.ca)
        self.backend_tls = BackendTLS("backend.example", self.ca)
        self.accepting = Accepting(Limits())

    def service(self, certificates: Certificates | None) -> ProxyService:
        return self.accepting.service(
            ProxyConfig(
                listen="tcp:0",
                connect="tls:backend.example:443",
                certificates=certificates,
                backend_tls=self.backend_tls,
                service="web",
            )
        )

    def messages(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("service") == "web"]

    def test_each_file_kept_or_taken(self) -> None:
        """A bad backend CA file is kept, named; the certificates still reload."""
        certificates = leaf_certificates()
        old = certificates.context
        service = self.service(certificates)
        os.remove(self.ca)
        service.reload()
        self.assertIsNot(certificates.context, old)
        self.assertEqual(
            self.messages(),
            [
                "web: reload failed, the old certificates stay:"
                f" --backend-ca {self.ca}: No such file or directory"
            ],
        )

    def test_client_mode(self) -> None:
        """
        Without certificates (--client), reload and rotation are harmless.
        """
        service = self.service(None)
        self.accepting.accept("192.0.2.1")
        service.startService()
        self.accepting.clock.advance(TICKET_KEY_LIFETIME)
        service.reload()
        self.assertEqual(self.messages(), ["web: certificates reloaded"])
        service.stopService()
