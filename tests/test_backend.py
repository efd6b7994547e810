"""
TLS toward the backend (C{--connect tls:...}, C{--backend-ca}) and client
mode (C{--client}), in memory: real TLS handshakes both ways, one clock.
"""

from __future__ import annotations

from pathlib import Path

import trustme
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import tap
from tlsproxy.backend import Backend, BackendTLS
from tlsproxy.context import DEFAULT_POLICY, Certificates
from tlsproxy.endpoints import client_from_string, reaches
from tlsproxy.listen import Admission, SharedLimit, accepting
from tlsproxy.proxyheader import v1
from tlsproxy.record import ConnectionRecord
from tlsproxy.relay import RelayFactory
from tlsproxy.service import proxy_service
from tlsproxy.values import (
    ConfigError,
    Limits,
    ProxyConfig,
    Timeouts,
    TLSPolicy,
)

from .memory import (
    CA,
    DEFAULTS,
    Endpoint,
    Pair,
    Recorder,
    Transport,
    connect,
    flush,
    leaf_certificates,
)

OTHER_CA = trustme.CA()


def context_for(
    cert: trustme.LeafCert, policy: TLSPolicy = DEFAULT_POLICY
) -> Certificates:
    """A server's certificates: a trustme leaf certificate."""
    return leaf_certificates(policy, leaves=(cert,))


GOOD = context_for(CA.issue_cert("backend.example", "127.0.0.1"))
STRANGER = context_for(OTHER_CA.issue_cert("backend.example"))


def pem_file(case: SynchronousTestCase, *cas: trustme.CA) -> str:
    """A PEM file of the certificates of C{cas}."""
    path = Path(case.mktemp())
    path.write_bytes(b"".join(ca.cert_pem.bytes() for ca in cas))
    return str(path)


class TLSBackend:
    """
    The proxy's backend connection in memory, under a TLS server with
    C{context}: C{backend} records what it decrypts.
    """

    def __init__(self, clock: Clock, context: Certificates) -> None:
        self.backend = Recorder()
        self._factory = TLSMemoryBIOFactory(
            context, False, Factory.forProtocol(lambda: self.backend), clock
        )
        self._clock = clock

    def connect(self, endpoint: Endpoint, index: int = 0) -> iosim.IOPump:
        """Complete the proxy's backend attempt C{index} at the TCP level."""
        factory, attempt = endpoint.attempts[index]
        proxy_side = factory.buildProtocol(Pair.BACKEND)
        assert proxy_side is not None
        self.server = self._factory.buildProtocol(Pair.BACKEND_LOCAL)
        pump = connect(
            self.server, proxy_side, self._clock, Pair.BACKEND, Pair.BACKEND_LOCAL
        )
        attempt.callback(proxy_side)
        return pump


class TLSPair(Pair):
    """A L{Pair} whose backend speaks TLS, verified by C{tls}."""

    def __init__(self, tls: BackendTLS, context: Certificates = GOOD, **kw: object):
        super().__init__(**kw)  # type: ignore[arg-type]
        relay = self.server.factory.wrappedFactory
        relay.connect = Backend(self.endpoint, tls, self.clock)
        self.tls_backend = TLSBackend(self.clock, context)

    def connect_backend(self) -> None:
        self.backend_pump = self.tls_backend.connect(self.endpoint)
        self.backend = self.tls_backend.backend


class BackendTLSTests(SynchronousTestCase):
    """The trust that verifies a TLS backend: loaded at start-up, reloadable."""

    def pair(self, tls: BackendTLS, context: Certificates = GOOD) -> TLSPair:
        pair = TLSPair(tls, context)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        return pair

    def test_missing_file(self) -> None:
        """A --backend-ca that cannot be read is one line naming it."""
        with self.assertRaises(ConfigError) as e:
            BackendTLS("h", "/nonexistent/ca.pem")
        self.assertEqual(
            str(e.exception),
            "--backend-ca /nonexistent/ca.pem: No such file or directory",
        )

    def test_no_certificate(self) -> None:
        """A --backend-ca without a PEM certificate is one line naming it."""
        path = Path(self.mktemp())
        path.write_bytes(b"no PEM here\n")
        with self.assertRaises(ConfigError) as e:
            BackendTLS("h", str(path))
        self.assertEqual(
            str(e.exception), f"--backend-ca {path}: no PEM certificate found"
        )

    def test_several_certificates(self) -> None:
        """Every CA of a --backend-ca file is trusted."""
        tls = BackendTLS("backend.example", pem_file(self, CA, OTHER_CA))
        pair = self.pair(tls, STRANGER)
        self.assertEqual(len(pair.records), 1)

    def test_platform_trust(self) -> None:
        """Without --backend-ca, the platform's CAs (not the test CA) verify."""
        pair = self.pair(BackendTLS("backend.example"))
        [record] = pair.records
        self.assertEqual(record.reason, "backend TLS error: certificate verify failed")

    def test_reload(self) -> None:
        """
        reload() re-reads --backend-ca for new connections; a file gone bad
        raises ConfigError and the trust in use stays.
        """
        path = pem_file(self, OTHER_CA)
        tls = BackendTLS("backend.example", path)
        self.assertIsNotNone(self.pair(tls).records[-1].reason)
        Path(path).write_bytes(CA.cert_pem.bytes())
        tls.reload()
        self.assertEqual(self.pair(tls).records[-1].event, "open")
        Path(path).write_bytes(b"")
        self.assertRaises(ConfigError, tls.reload)
        self.assertEqual(self.pair(tls).records[-1].event, "open")

    def test_reload_platform_trust(self) -> None:
        """reload() without --backend-ca keeps the platform's CAs as read."""
        tls = BackendTLS("backend.example")
        tls.reload()
        [record] = self.pair(tls).records
        self.assertEqual(record.reason, "backend TLS error: certificate verify failed")

    def test_reaches(self) -> None:
        """The host to verify is read as Twisted reads the endpoint string."""
        self.assertEqual(
            reaches("tls:backend.example:443"), ("backend.example", 443, False)
        )
        self.assertEqual(
            reaches("tls:host=10.0.0.2:port=443"), ("10.0.0.2", 443, False)
        )
        self.assertEqual(
            reaches("tcp:\\:\\:1:443:bindAddress=\\:\\:1"), ("::1", 443, True)
        )
        self.assertEqual(reaches("unix:/run/www.sock"), ("/run/www.sock", None, False))

    def test_endpoints(self) -> None:
        """
        A tls: endpoint is TCP (its options kept), with TLS on top; a
        backend_tls goes with a tls: endpoint and only with it.
        """
        reactor = MemoryReactorClock()
        tls = BackendTLS("h", pem_file(self, CA))
        plain = client_from_string(reactor, "tls:h:443:bindAddress=10.0.0.3")
        self.assertIsInstance(plain, TCP4ClientEndpoint)
        for backend, backend_tls in [("tls:h:443", None), ("tcp:h:443", tls)]:
            with self.assertRaises(ConfigError):
                ProxyConfig(
                    listen="tcp:0",
                    connect=backend,
                    certificates=None,
                    backend_tls=backend_tls,
                )


class TLSBackendRelayTests(SynchronousTestCase):
    """The relay toward a TLS backend keeps its contract."""

    def setUp(self) -> None:
        self.tls = BackendTLS("backend.example", pem_file(self, CA))

    def test_relays_both_ways(self) -> None:
        """
        Bytes go both ways, encrypted toward the backend; the open record
        comes once the backend is verified and has its TCP addresses.
        """
        pair = TLSPair(self.tls)
        pair.flush()
        pair.client_tls.write(b"early ")
        pair.flush()
        pair.connect_backend()
        self.assertEqual(pair.records, [])  # TCP only: not verified yet
        pair.flush()
        pair.client_tls.write(b"ping")
        pair.backend.transport.write(b"pong")
        pair.flush()
        self.assertEqual(pair.backend.data, b"early ping")
        self.assertEqual(pair.client.data, b"pong")
        raw = b"".join(pair.backend_io.stream)
        self.assertNotIn(b"ping", raw)
        [record] = pair.records
        self.assertEqual(
            (record.backend_local_host, record.backend_local_port),
            ("127.0.0.2", 40001),
        )
        self.assertEqual(
            (record.backend_host, record.backend_port), ("127.0.0.3", 8080)
        )
        self.assertFalse(pair.server_io.paused)

    def test_bytes_after_the_client_closed(self) -> None:
        """
        Bytes a TLS backend sends after the client closed cleanly (before it
        read the proxy's close_notify; TLS still reads on, for its own) are
        dropped: nothing raises, and the backend's close stays clean.
        (tests/test_model.py found it.)
        """
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.client_tls.write(b"request")
        pair.client_tls.loseConnection()
        flush(pair.pump, None)  # (the client's connection only)
        pair.backend.transport.write(b"late")
        pair.flush()
        self.assertEqual(pair.backend.data, b"request")
        assert pair.backend.ended is not None
        self.assertTrue(pair.backend.ended.check(ConnectionDone))
        close = pair.records[-1]
        self.assertEqual((close.event, close.reason), ("close", "client closed"))
        self.assertEqual(close.bytes_to_client, 0)

    def test_read_again_when_the_client_closed(self) -> None:
        """
        A client that closes cleanly while the backend is not read (the
        client's transport full) leaves a TLS backend read again, so that
        its close_notify can come and the close end.  (tests/test_model.py
        found it: the backend's connection stayed, unread, no record.)
        """
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.server_io.producer.pauseProducing()  # the client's transport is full
        self.assertTrue(pair.backend_io.paused)
        pair.client_tls.loseConnection()
        pair.flush()
        self.assertFalse(pair.backend_io.paused)
        self.assertEqual(pair.records[-1].reason, "client closed")

    def test_reset_after_close_notify(self) -> None:
        """
        A TLS backend that resets its connection after its close_notify
        (before reading the proxy's) has lost nothing: the client gets all
        it sent, then close_notify.  (tests/test_model.py found it.)
        """
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.backend.transport.write(b"response")
        pair.backend.transport.loseConnection()  # its close_notify
        assert pair.backend_pump is not None
        pair.backend_pump.pump()  # (to the proxy, not the proxy's back)
        pair.backend_pump.serverIO.abortConnection()
        pair.flush()
        self.assertEqual(pair.client.data, b"response")
        self.assertFalse(pair.server_io.aborted)
        self.assertEqual(pair.records[-1].reason, "backend closed")

    def test_ip_address(self) -> None:
        """A backend named by its IP address is verified against that address."""
        pair = TLSPair(BackendTLS("127.0.0.1", pem_file(self, CA)))
        pair.flush()
        pair.connect_backend()
        pair.flush()
        self.assertEqual([r.event for r in pair.records], ["open"])

    def assert_refused(self, pair: TLSPair, reason: str) -> None:
        """The client is aborted, with C{reason} in the only record."""
        pair.flush()
        pair.connect_backend()
        pair.flush()
        [record] = pair.records
        self.assertEqual(record.event, "close")
        self.assertEqual(record.reason, reason)
        self.assertTrue(pair.server_io.aborted)
        self.assertEqual(pair.backend.data, b"")

    def test_wrong_ca(self) -> None:
        """A backend certificate from another CA closes the connection."""
        self.assert_refused(
            TLSPair(self.tls, STRANGER), "backend TLS error: certificate verify failed"
        )

    def test_wrong_name(self) -> None:
        """A backend certificate for another name closes the connection."""
        tls = BackendTLS("other.example", pem_file(self, CA))
        self.assert_refused(
            TLSPair(tls), "backend TLS error: certificate is not for other.example"
        )

    def test_proxy_header_in_clear(self) -> None:
        """The PROXY header goes in clear, before the ClientHello."""
        pair = TLSPair(self.tls, header=v1)
        pair.flush()
        pair.connect_backend()
        raw = b"".join(pair.backend_io.stream)
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 50123 8443\r\n"
        self.assertEqual(raw[: len(header) + 1], header + b"\x16")  # a handshake
        pair.backend_io.stream = [raw[len(header) :]]  # as nginx takes it off
        pair.flush()
        pair.client_tls.write(b"ping")
        pair.flush()
        self.assertEqual(pair.backend.data, b"ping")

    def test_no_alpn(self) -> None:
        """The proxy offers the backend no ALPN, and TLS 1.3 is spoken."""
        context = context_for(
            CA.issue_cert("backend.example"), TLSPolicy(alpn=(b"h2", b"http/1.1"))
        )
        pair = TLSPair(self.tls, context)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        handle = pair.tls_backend.server.getHandle()
        self.assertIsNone(handle.get_alpn_proto_negotiated() or None)
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.3")

    def test_backend_close_notify(self) -> None:
        """A backend's close_notify gives the client every byte, then its own."""
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.backend.transport.write(b"bye")
        pair.backend.transport.loseConnection()
        pair.flush()
        self.assertEqual(pair.client.data, b"bye")
        assert pair.client.ended is not None
        self.assertTrue(pair.client.ended.check(ConnectionDone))
        self.assertEqual(pair.records[-1].reason, "backend closed")

    def test_late_client_bytes(self) -> None:
        """Client bytes that cross a backend's close are dropped."""
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.backend.transport.loseConnection()
        assert pair.backend_pump is not None
        pair.backend_pump.flush()  # the backend is gone, the client not told
        pair.client_tls.write(b"late")
        pair.flush()
        self.assertEqual(pair.backend.data, b"")
        self.assertEqual(pair.records[-1].bytes_from_client, 4)
        self.assertEqual(pair.records[-1].reason, "backend closed")

    def test_client_close_notify(self) -> None:
        """
        A client's close_notify gives the backend every byte, then a
        close_notify (the producer toward it unregistered first).
        """
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.client_tls.write(b"last")
        pair.client_tls.loseConnection()
        pair.flush()
        self.assertEqual(pair.backend.data, b"last")
        assert pair.backend.ended is not None
        self.assertTrue(pair.backend.ended.check(ConnectionDone))
        self.assertEqual(pair.records[-1].reason, "client closed")

    def test_backend_tls_error(self) -> None:
        """A backend that breaks TLS aborts the client, and says so."""
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        assert pair.backend_pump is not None
        pair.backend_pump.serverIO.write(b"not a TLS record" * 2)
        pair.flush()
        self.assertTrue(pair.server_io.aborted)
        reason = pair.records[-1].reason
        assert reason is not None
        self.assertTrue(reason.startswith("backend TLS error: "), reason)

    def test_timeout_in_backend_handshake(self) -> None:
        """The connect timeout covers the backend's handshake, and aborts it."""
        pair = TLSPair(self.tls, timeouts=Timeouts(connect=5))
        pair.flush()
        pair.connect_backend()  # TCP only: the handshake never moves
        pair.clock.advance(5)
        pair.flush()
        self.assertTrue(pair.backend_io.aborted)
        self.assertEqual(pair.records[-1].reason, "backend connect timeout")

    def test_lost_in_backend_handshake(self) -> None:
        """A backend lost during its handshake is a failed connect."""
        pair = TLSPair(self.tls)
        pair.flush()
        pair.connect_backend()
        pair.tls_backend.server.transport.abortConnection()
        pair.flush()
        self.assertTrue(pair.server_io.aborted)
        reason = pair.records[-1].reason
        assert reason is not None
        self.assertTrue(reason.startswith("backend connect failed: "), reason)

    def test_connect_failure(self) -> None:
        """A TCP connect failure is reported as before."""
        pair = TLSPair(self.tls)
        pair.flush()
        pair.endpoint.attempts[0][1].errback(ConnectionRefusedError())
        pair.flush()
        reason = pair.records[-1].reason
        assert reason is not None
        self.assertTrue(reason.startswith("backend connect failed: "), reason)

    def test_abort_before_tcp(self) -> None:
        """A client lost before the TCP connection cancels its attempt."""
        pair = TLSPair(self.tls)
        pair.flush()
        pair.client_tls.transport.abortConnection()
        pair.flush()
        self.assertEqual(pair.endpoint.cancelled, 1)
        self.assertEqual(len(pair.records), 1)


class ClientModeTests(SynchronousTestCase):
    """--client: plain TCP from the client, verified TLS to the backend."""

    CLIENT = IPv4Address("TCP", "192.0.2.7", 50123)
    LISTEN = IPv4Address("TCP", "127.0.0.1", 8080)

    def setUp(self, timeouts: Timeouts = DEFAULTS) -> None:
        self.clock = Clock()
        self.records: list[ConnectionRecord] = []
        self.endpoint = Endpoint()
        tls = BackendTLS("backend.example", pem_file(self, CA))
        config = ProxyConfig(
            listen="tcp:0",
            connect="tls:backend.example:443",
            certificates=None,
            backend_tls=tls,
            timeouts=timeouts,
            service="client",
        )
        self.relay = RelayFactory(
            config,
            Backend(self.endpoint, tls, self.clock),
            Admission("client", Limits(), SharedLimit(), self.clock),
            self.clock,
            self.records.append,
        )
        self.factory = accepting(self.relay, None, self.clock)
        self.server = self.factory.buildProtocol(self.CLIENT)
        self.client = Recorder()
        self.pump = connect(
            self.server, self.client, self.clock, self.LISTEN, self.CLIENT
        )
        self.tls_backend = TLSBackend(self.clock, GOOD)
        self.backend_pump: iosim.IOPump | None = None

    def flush(self) -> None:
        flush(self.pump, self.backend_pump)

    def connect_backend(self) -> Recorder:
        self.backend_pump = self.tls_backend.connect(self.endpoint)
        self.flush()
        return self.tls_backend.backend

    def test_connected_at_once(self) -> None:
        """
        The backend is connected as the client is accepted, the client paused
        meanwhile; then bytes go both ways and the record has no client TLS.
        """
        server_io: Transport = self.pump.serverIO
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertTrue(server_io.paused)
        self.assertEqual(len(self.relay.live), 1)
        backend = self.connect_backend()
        self.assertFalse(server_io.paused)
        self.client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        backend.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.flush()
        self.assertEqual(backend.data, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(self.client.data, b"HTTP/1.1 200 OK\r\n\r\n")
        [record] = self.records
        self.assertEqual((record.client_host, record.listen_port), ("192.0.2.7", 8080))
        self.assertIsNone(record.tls_version)
        self.assertIsNone(record.handshake_time)
        self.assertEqual(record.connect_time, 0.0)

    def test_no_handshake_timeout(self) -> None:
        """Only the connect timeout runs while the backend is connected."""
        self.setUp(Timeouts(handshake=1, connect=5))
        self.clock.advance(2)
        self.assertEqual(self.records, [])
        self.clock.advance(3)
        self.flush()
        self.assertEqual(self.records[-1].reason, "backend connect timeout")
        self.assertEqual(self.relay.live, set())

    def test_client_fin(self) -> None:
        """A client's FIN gives the backend every byte, then a close_notify."""
        backend = self.connect_backend()
        self.client.transport.write(b"last")
        self.client.transport.loseConnection()
        self.flush()
        self.assertEqual(backend.data, b"last")
        assert backend.ended is not None
        self.assertTrue(backend.ended.check(ConnectionDone))

    def test_backend_close(self) -> None:
        """A backend's close_notify gives the client every byte, then a FIN."""
        backend = self.connect_backend()
        backend.transport.write(b"bye")
        backend.transport.loseConnection()
        self.flush()
        self.assertEqual(self.client.data, b"bye")
        assert self.client.ended is not None
        self.assertTrue(self.client.ended.check(ConnectionDone))
        self.assertEqual(self.records[-1].reason, "backend closed")


class ServiceTests(SynchronousTestCase):
    """proxy_service puts the pieces together."""

    def test_client_mode_service(self) -> None:
        """No context: plain TCP from the clients, TLS toward the backend."""
        config = ProxyConfig(
            listen="tcp:0",
            connect="tls:127.0.0.1:443",
            certificates=None,
            backend_tls=BackendTLS("127.0.0.1", pem_file(self, CA)),
        )
        service = proxy_service(config, MemoryReactorClock())
        self.assertFalse(service.relay.tls)
        self.assertEqual(service.relay.logPrefix(), "tlsproxy")


class OptionTests(SynchronousTestCase):
    """--connect tls:..., --backend-ca and --client on the command line."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()  # type: ignore[no-untyped-call]
        options.parseOptions(list(args))  # type: ignore[no-untyped-call]
        return options

    def assert_error(self, message: str, *args: str) -> None:
        with self.assertRaises(usage.UsageError) as e:
            self.parse(*args)
        self.assertEqual(str(e.exception), message)

    def test_tls_connect(self) -> None:
        """--connect tls: verifies the backend with the --backend-ca CAs."""
        ca = pem_file(self, CA)
        config = self.parse(
            "--connect", "tls:backend.example:443", "--self-signed", "x",
            "--backend-ca", ca,
        ).config  # fmt: skip
        assert config.backend_tls is not None
        self.assertEqual(config.backend_tls.host, "backend.example")
        self.assertEqual(config.backend_tls.ca_path, ca)
        self.assertIsNotNone(config.certificates)

    def test_client(self) -> None:
        """--client has no server context."""
        config = self.parse("--client", "--connect", "tls:10.0.0.2:443").config
        self.assertIsNone(config.certificates)
        assert config.backend_tls is not None
        self.assertIsNone(config.backend_tls.ca_path)

    def test_errors(self) -> None:
        """Each mistake is one line naming the option."""
        self.assert_error(
            "--backend-ca ca.pem: needs --connect tls:HOST:PORT",
            "--connect", "tcp:h:1", "--self-signed", "x", "--backend-ca", "ca.pem",
        )  # fmt: skip
        self.assert_error(
            "--backend-ca /nope: No such file or directory",
            "--connect", "tls:h:1", "--self-signed", "x", "--backend-ca", "/nope",
        )  # fmt: skip
        self.assert_error(
            "--client needs --connect tls:HOST:PORT", "--client", "--connect", "tcp:h:1"
        )
        self.assert_error(
            "--client: not with --listen haproxy:tcp:80",
            "--client", "--connect", "tls:h:1", "--listen", "haproxy:tcp:80",
        )  # fmt: skip
        self.assert_error(
            "--client: not with --self-signed, --tls-min, --allow-cn",
            "--client", "--connect", "tls:h:1", "--self-signed", "x",
            "--tls-min", "1.3", "--allow-cn", "a",
        )  # fmt: skip
