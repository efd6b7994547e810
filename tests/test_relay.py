"""
Unit tests for the proxy pair, in memory: real TLS handshakes, a fake clock.
"""

from __future__ import annotations

import gc
import weakref

from OpenSSL import SSL
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.flow import Throttle
from tlsproxy.relay import _no_delay, describe
from tlsproxy.values import Timeouts

from .memory import DEFAULTS, Pair, Transport


class RelayTests(SynchronousTestCase):
    """Bytes go both ways, in order, once the backend is there."""

    def test_backend_after_handshake(self) -> None:
        """The backend is connected only once the TLS handshake completes."""
        pair = Pair()
        self.assertEqual(pair.endpoint.attempts, [])
        pair.pump.pump()  # ClientHello in, ServerHello out: not done yet
        self.assertEqual(pair.endpoint.attempts, [])
        pair.flush()
        self.assertEqual(len(pair.endpoint.attempts), 1)

    def test_relays_both_ways(self) -> None:
        """Client bytes reach the backend and backend bytes the client."""
        pair = Pair()
        pair.flush()
        pair.connect_backend()
        pair.client_tls.write(b"ping")
        pair.flush()
        pair.backend.transport.write(b"pong")
        pair.flush()
        self.assertEqual(pair.backend.data, b"ping")
        self.assertEqual(pair.client.data, b"pong")

    def test_early_bytes_wait_for_backend(self) -> None:
        """
        Bytes the client sends before the backend is connected arrive first,
        in order, and the client is not read meanwhile.
        """
        pair = Pair()
        pair.flush()
        pair.client_tls.write(b"early ")
        pair.client_tls.write(b"bytes")
        pair.flush()
        self.assertTrue(pair.server_io.paused)
        pair.connect_backend()
        pair.client_tls.write(b" later")
        pair.flush()
        self.assertFalse(pair.server_io.paused)
        self.assertEqual(pair.backend.data, b"early bytes later")

    def test_open_record(self) -> None:
        """
        The open record, published when the backend connects, names both
        connections' addresses and the TLS facts.
        """
        pair = Pair()
        pair.flush()
        pair.connect_backend()
        [record] = pair.records
        self.assertEqual(record.event, "open")
        self.assertEqual(record.service, "test")
        self.assertEqual(len(record.id), 32)
        self.assertEqual((record.client_host, record.client_port), ("192.0.2.7", 50123))
        self.assertEqual((record.listen_host, record.listen_port), ("127.0.0.1", 8443))
        self.assertEqual(
            (record.backend_local_host, record.backend_local_port),
            ("127.0.0.2", 40001),
        )
        self.assertEqual(
            (record.backend_host, record.backend_port), ("127.0.0.3", 8080)
        )
        self.assertEqual(record.tls_version, "TLSv1.3")
        self.assertEqual(record.cipher, "TLS_AES_256_GCM_SHA384")
        self.assertEqual(record.sni, "localhost")
        self.assertIsNone(record.alpn)
        self.assertIsNone(record.closed)
        self.assertIsNone(record.reason)

    def test_no_delay(self) -> None:
        """Both TCP connections send small writes at once (no Nagle)."""
        pair = Pair()
        pair.flush()
        pair.connect_backend()
        self.assertTrue(pair.server_io.no_delay)
        self.assertTrue(pair.backend_io.no_delay)
        self.assertFalse(pair.client_tls.transport.no_delay)
        _no_delay(object())  # not TCP (a UNIX socket): nothing to set

    def test_latencies(self) -> None:
        """
        The records carry how long the handshake took, from the accept, and
        how long the backend took to connect, from the handshake.
        """
        pair = Pair()
        pair.pump.pump()
        pair.clock.advance(0.5)
        pair.flush()
        pair.clock.advance(0.25)
        pair.connect_backend()
        [record] = pair.records
        self.assertEqual((record.handshake_time, record.connect_time), (0.5, 0.25))

    def test_each_connection_has_its_own_id(self) -> None:
        """Two connections get different record ids."""
        ids = set()
        for _ in range(2):
            pair = Pair()
            pair.flush()
            pair.connect_backend()
            ids.add(pair.records[0].id)
        self.assertEqual(len(ids), 2)

    def test_throttle_stops_nothing(self) -> None:
        """
        The flow-control shim passes pausing and resuming through but not
        stopping: closing is the close path's work.
        """
        io = Transport(None, True)
        throttle = Throttle(io)
        throttle.pauseProducing()
        self.assertTrue(io.paused)
        throttle.resumeProducing()
        self.assertFalse(io.paused)
        throttle.stopProducing()
        self.assertFalse(io.disconnecting)

    def test_flow_control_both_ways(self) -> None:
        """
        Each side's transport can pause the other side's reading, through
        producers registered when the backend connects.
        """
        pair = Pair()
        pair.flush()
        pair.connect_backend()
        pair.backend_io.producer.pauseProducing()
        self.assertTrue(pair.server_io.paused)
        pair.backend_io.producer.resumeProducing()
        self.assertFalse(pair.server_io.paused)
        pair.server_io.producer.pauseProducing()
        self.assertTrue(pair.backend_io.paused)


class CloseTests(SynchronousTestCase):
    """One close path: how each end is closed, and the one close record."""

    def connected(self, timeouts: Timeouts = DEFAULTS) -> Pair:
        pair = Pair(timeouts)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        return pair

    def test_backend_close_gives_close_notify(self) -> None:
        """
        When the backend sends its last bytes and closes, the client gets
        them all and then a TLS close_notify (a clean end).
        """
        pair = self.connected()
        pair.backend_io.producer.pauseProducing()  # the backend was slow
        pair.backend.transport.write(b"last bytes")
        pair.backend.transport.loseConnection()
        pair.flush()
        self.assertEqual(pair.client.data, b"last bytes")
        assert pair.client.ended is not None
        self.assertTrue(pair.client.ended.check(ConnectionDone))
        self.assertFalse(pair.server_io.aborted)
        self.assertFalse(pair.server_io.paused)

    def test_close_record(self) -> None:
        """
        The close record counts the bytes each way, the time, and the
        reason; it comes once, after the open record.
        """
        pair = self.connected()
        pair.client_tls.write(b"123")
        pair.flush()
        pair.clock.advance(2.5)
        pair.backend.transport.write(b"12345")
        pair.backend.transport.loseConnection()
        pair.flush()
        self.assertEqual([r.event for r in pair.records], ["open", "close"])
        close = pair.records[1]
        self.assertEqual(close.id, pair.records[0].id)
        self.assertEqual((close.bytes_from_client, close.bytes_to_client), (3, 5))
        self.assertEqual(close.duration, 2.5)
        self.assertEqual(close.closed, close.opened + 2.5)
        self.assertEqual(close.reason, "backend closed")
        self.assertEqual(close.backend_local_port, 40001)

    def test_client_close_gives_fin(self) -> None:
        """
        When the client closes cleanly, the backend gets every byte and then
        a FIN (a clean close, not an abort).
        """
        pair = self.connected()
        pair.client_tls.write(b"all of it")
        pair.client_tls.loseConnection()
        pair.flush()
        self.assertEqual(pair.backend.data, b"all of it")
        assert pair.backend.ended is not None
        self.assertTrue(pair.backend.ended.check(ConnectionDone))
        self.assertFalse(pair.backend_io.aborted)
        self.assertEqual(pair.records[-1].reason, "client closed")

    def test_reset_after_close_notify(self) -> None:
        """
        A client whose close_notify came has closed cleanly, even if its TCP
        connection then ends in a reset (curl's does, when a close_notify
        reaches it after it closed): the backend gets every byte and a FIN.
        """
        pair = self.connected()
        pair.client_tls.write(b"all of it")
        pair.client_tls.loseConnection()
        pair.pump.pump()  # its close_notify reaches the proxy
        pair.client_tls.transport.abortConnection()
        pair.flush()
        self.assertEqual(pair.backend.data, b"all of it")
        self.assertFalse(pair.backend_io.aborted)
        self.assertEqual(pair.records[-1].reason, "client closed")

    def test_fatal_alert_aborts_backend(self) -> None:
        """
        A client's fatal alert (here, as its renegotiation is refused) is a
        TLS error, not a clean close, though OpenSSL then counts the client
        shut down: the backend is aborted, not given a FIN after a cut-short
        request.  (tests/test_model.py found it.)
        """
        from twisted.internet.ssl import TLSVersion

        pair = Pair(
            extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2}
        )
        pair.flush()
        pair.connect_backend()
        pair.client_tls.write(b"cut short")
        pair.flush()
        tls = pair.client_tls.getHandle()
        tls.renegotiate()
        self.assertRaises(SSL.WantReadError, tls.do_handshake)
        pair.client_tls.transport.write(tls.bio_read(65536))  # its ClientHello
        pair.flush()
        self.assertEqual(pair.backend.data, b"cut short")
        self.assertTrue(pair.backend_io.aborted)
        reason = pair.records[-1].reason
        self.assertEqual(reason, "TLS error: tls alert handshake failure")

    def test_client_abort_aborts_backend(self) -> None:
        """A client connection lost without close_notify aborts the backend."""
        pair = self.connected()
        pair.client_tls.transport.abortConnection()
        pair.flush()
        self.assertTrue(pair.backend_io.aborted)
        self.assertEqual(pair.records[-1].event, "close")
        self.assertTrue(pair.records[-1].reason.startswith("client error: "))

    def test_backend_abort_aborts_client(self) -> None:
        """
        A backend connection that breaks aborts the client: no close_notify
        tells the client that it got everything.
        """
        pair = self.connected()
        pair.backend.transport.abortConnection()
        pair.flush()
        self.assertTrue(pair.server_io.aborted)
        assert pair.client.ended is not None
        self.assertFalse(pair.client.ended.check(ConnectionDone))
        self.assertTrue(pair.records[-1].reason.startswith("backend error: "))
        self.assertEqual(len(pair.records), 2)

    def test_client_closes_while_connecting(self) -> None:
        """
        A client that sends its bytes and closes cleanly before the backend
        is connected still has them delivered, then a FIN.
        """
        pair = Pair()
        pair.flush()
        pair.client_tls.write(b"request")
        pair.client_tls.loseConnection()
        pair.flush()
        self.assertEqual(pair.endpoint.cancelled, 0)
        pair.connect_backend()
        pair.flush()
        self.assertEqual(pair.backend.data, b"request")
        assert pair.backend.ended is not None
        self.assertTrue(pair.backend.ended.check(ConnectionDone))
        self.assertEqual([r.event for r in pair.records], ["open", "close"])
        self.assertEqual(pair.records[-1].reason, "client closed")

    def test_client_aborts_while_connecting(self) -> None:
        """A client lost while the backend is connected cancels the attempt."""
        pair = Pair()
        pair.flush()
        pair.client_tls.transport.abortConnection()
        pair.flush()
        self.assertEqual(pair.endpoint.cancelled, 1)
        [record] = pair.records
        self.assertEqual(record.event, "close")
        self.assertTrue(record.reason.startswith("client error: "))
        self.assertIsNone(record.backend_port)

    def test_connect_failure(self) -> None:
        """A backend that cannot be connected aborts the client."""
        pair = Pair()
        pair.flush()
        pair.endpoint.attempts[0][1].errback(ConnectionRefusedError())
        pair.flush()
        self.assertTrue(pair.server_io.aborted)
        [record] = pair.records
        self.assertEqual(
            record.reason,
            "backend connect failed: Connection was refused by other side.",
        )

    def test_tls_error(self) -> None:
        """A client that does not speak TLS is closed with the TLS error."""
        pair = Pair()
        pair.client_tls.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        pair.flush()
        [record] = pair.records
        self.assertTrue(record.reason.startswith("TLS error: "), record.reason)
        self.assertIsNone(record.tls_version)
        self.assertEqual(pair.endpoint.attempts, [])

    def test_old_tls_refused(self) -> None:
        """A client that offers at most TLS 1.1 fails the handshake."""
        from twisted.internet.ssl import TLSVersion

        pair = Pair(
            extraCertificateOptions={
                "insecurelyLowerMinimumTo": TLSVersion.TLSv1_0,
                "lowerMaximumSecurityTo": TLSVersion.TLSv1_1,
            }
        )
        pair.flush()
        self.assertTrue(pair.records[-1].reason.startswith("TLS error: "))

    def test_tls12_cipher(self) -> None:
        """A TLS 1.2 client gets a forward-secret AEAD suite."""
        from twisted.internet.ssl import TLSVersion

        pair = Pair(
            extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2}
        )
        pair.flush()
        pair.connect_backend()
        record = pair.records[0]
        self.assertEqual(record.tls_version, "TLSv1.2")
        self.assertEqual(record.cipher, "ECDHE-ECDSA-AES256-GCM-SHA384")


class TimeoutTests(SynchronousTestCase):
    """One timer per connection: handshake, then connect, then idle."""

    timeouts = Timeouts(handshake=5, connect=7, idle=11)

    def test_handshake_timeout(self) -> None:
        """A client that never completes its handshake is aborted."""
        pair = Pair(self.timeouts)
        pair.clock.advance(4.9)
        self.assertFalse(pair.server_io.aborted)
        pair.clock.advance(0.1)
        self.assertTrue(pair.server_io.aborted)
        pair.flush()
        [record] = pair.records
        self.assertEqual(record.reason, "handshake timeout")
        self.assertEqual(pair.endpoint.attempts, [])

    def test_connect_timeout(self) -> None:
        """A backend that does not answer in time: attempt cancelled, client aborted."""
        pair = Pair(self.timeouts)
        pair.flush()
        pair.clock.advance(6.9)
        self.assertEqual(pair.endpoint.cancelled, 0)
        pair.clock.advance(0.1)
        self.assertEqual(pair.endpoint.cancelled, 1)
        self.assertTrue(pair.server_io.aborted)
        pair.flush()
        [record] = pair.records
        self.assertEqual(record.reason, "backend connect timeout")

    def test_idle_timeout(self) -> None:
        """
        A connection without traffic for the idle timeout is aborted both
        ways; traffic either way restarts the count.
        """
        pair = Pair(self.timeouts)
        pair.flush()
        pair.connect_backend()
        pair.flush()
        pair.clock.advance(10)
        pair.client_tls.write(b"x")
        pair.flush()
        pair.clock.advance(10)
        pair.backend.transport.write(b"y")
        pair.flush()
        pair.clock.advance(10)
        self.assertFalse(pair.server_io.aborted)
        pair.clock.advance(1)
        self.assertTrue(pair.server_io.aborted)
        self.assertTrue(pair.backend_io.aborted)
        pair.flush()
        self.assertEqual(pair.records[-1].reason, "idle timeout")
        self.assertEqual(len(pair.records), 2)

    def test_nothing_left(self) -> None:
        """
        A closed connection leaves nothing of the pair alive: no timer, no
        reference from the factories.
        """
        pair = Pair(self.timeouts)
        pair.flush()
        pair.connect_backend()
        client_side = weakref.ref(pair.server.wrappedProtocol)
        backend_side = weakref.ref(pair.backend_io.protocol)
        protocols = pair.server.factory.protocols
        pair.client_tls.write(b"x")
        pair.backend.transport.loseConnection()
        pair.flush()
        self.assertEqual(len(pair.records), 2)
        del pair
        gc.collect()
        self.assertIsNone(client_side())
        self.assertIsNone(backend_side())
        self.assertEqual(protocols, {})

    def test_no_timer_left(self) -> None:
        """A closed connection leaves no timer behind."""
        pair = Pair(self.timeouts)
        pair.flush()
        pair.connect_backend()
        pair.client_tls.loseConnection()
        pair.flush()
        self.assertEqual(pair.clock.getDelayedCalls(), [])


class DescribeTests(SynchronousTestCase):
    """Close reasons are short and say which side ended it."""

    def test_clean(self) -> None:
        """A clean close is "<side> closed"."""
        self.assertEqual(
            describe("backend", Failure(ConnectionDone())), "backend closed"
        )

    def test_tls(self) -> None:
        """A TLS failure says so."""
        error = SSL.Error([("SSL routines", "", "http request"), ("x", "", "more")])
        reason = describe("client", Failure(error))
        self.assertEqual(reason, "TLS error: http request, more")

    def test_tls_without_queue(self) -> None:
        """A TLS failure without OpenSSL's error queue is shown as it is."""
        reason = describe("client", Failure(SSL.SysCallError(104, "ECONNRESET")))
        self.assertEqual(reason, "TLS error: (104, 'ECONNRESET')")
        self.assertEqual(describe("client", Failure(SSL.Error())), "TLS error: ")

    def test_other(self) -> None:
        """Anything else is "<side> error: <message>"."""
        self.assertEqual(
            describe("client", Failure(ConnectionLost("reset"))),
            "client error: Connection to the other side was lost"
            " in a non-clean fashion: reset.",
        )
