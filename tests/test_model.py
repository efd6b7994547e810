"""
The connection's life checked against a model: a hypothesis state machine
drives one connection through the shipped factories and protocols (the TLS
factory over the relay, the backend's endpoint, the service's drain), its
client and backend in memory (tests/network.py: every read, end and reset
is a step), and after every step checks the relay's contract.

The client is a TLS client of the system's libssl (tests/keyupdate.py):
TLS 1.3 or 1.2, it sends bytes, KeyUpdates, a renegotiation request, bytes
that are not TLS, close_notify, a FIN or a reset, and it may stop reading.
The backend is plain TCP or TLS (1.3 or 1.2, its certificate for the
backend's name or not): it sends bytes, KeyUpdates, a renegotiation request
(a HelloRequest), close_notify, a FIN or a reset, and it may stop reading.
Its connection attempt succeeds, fails or hangs; the clock runs to the next
timer or by a moment; SIGTERM drains.

Settings: CI runs the examples of a fixed seed (derandomize); a developer
runs more, from random seeds, with

    TLSPROXY_MODEL=long .venv/bin/trial tests.test_model

(trial shows no falsifying example: C{.venv/bin/python -m unittest -v
tests.test_model} shows it, step by step).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)
from OpenSSL._util import ffi
from OpenSSL._util import lib as openssl
from twisted.application.service import Service
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.backend import Backend, BackendTLS
from tlsproxy.flow import TLSProtocol
from tlsproxy.listen import Admission, SharedLimit, accepting
from tlsproxy.record import ConnectionRecord
from tlsproxy.relay import ClientSide, RelayFactory, _Connecting
from tlsproxy.service import ProxyService
from tlsproxy.values import Limits, ProxyConfig, Timeouts

from .keyupdate import TLS1_2_VERSION, TLS1_3_VERSION, MemoryTLS
from .memory import CA, Endpoint, Pair, leaf_certificates
from .network import Connection, End, turn

BOUND = 300 * 1024  # what README.rst promises per connection
TIMEOUTS = Timeouts(handshake=5, connect=7, idle=11)
LIMITS = Limits(drain=3)
GARBAGE = b"GET / HTTP/1.0\r\n\r\n"  # not TLS: OpenSSL fails at its 5th byte
_random = random.Random(17)
STREAMS = {"client": _random.randbytes(2**22), "backend": _random.randbytes(2**22)}
SIZES = st.one_of(
    st.integers(1, 100),
    st.integers(1000, 20_000),
    st.integers(60_000, 200_000),
    st.integers(200_000, 400_000),  # (past the bound, if nothing holds it back)
)

SIDES = st.sampled_from(["client", "backend"])
ACTIONS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "network": st.tuples(
        st.just("network"),
        st.sampled_from(
            [
                "everything",
                "backend accepts",
                "everything",
                "backend accepts",
                "to proxy",
                "to client",
                "from backend",
                "to backend",
            ]
        ),
    ),
    "send": st.tuples(st.just("send"), SIDES, SIZES),
    "hold": st.tuples(st.just("hold"), SIDES, st.booleans()),
    "tls": st.tuples(
        st.just("tls_traffic"), SIDES, st.sampled_from([1, 2500, 12_000, 40_000])
    ),
    "ends": st.tuples(
        st.just("something_ends"),
        st.sampled_from(
            [
                "client close_notify",
                "backend close",
                "backend close",
                "next timer",
                "client FIN",
                "client reset",
                "client not TLS",
                "backend reset",
                "backend refuses",
                "SIGTERM",
            ]
        ),
    ),
    "time": st.tuples(st.just("time_passes"), st.sampled_from([0.05, 1.0])),
}
STEPS = st.sampled_from(
    ["network"] * 6 + ["send"] * 3 + ["hold"] * 2 + ["tls", "ends", "ends", "time"]
).flatmap(ACTIONS.__getitem__)

# What may first end a connection (the model's causes), and the reasons the
# close record may give for each (their beginnings).
REASONS = {
    "client closed": ("client closed",),  # its close_notify
    "client TLS error": ("TLS error: ",),
    "client end": ("client error: ", "TLS error: "),  # a FIN, no close_notify
    "client reset": ("client error: ", "TLS error: "),
    "backend closed": ("backend closed",),  # its close_notify, or a plain FIN
    "backend end": ("backend error: ",),  # (TLS:) a FIN, no close_notify
    "backend reset": ("backend error: ",),
    "backend TLS error": ("backend TLS error: ",),
    "unverified": ("backend connect failed: ", "backend TLS error: "),
    "connect failed": ("backend connect failed: ",),
    "timer": ("handshake timeout", "backend connect timeout", "idle timeout"),
    "drain": ("drain timeout",),
}


class Peer(Protocol):
    """
    The client or the backend, as the model drives it: what it sent and
    received (application bytes), and the causes its bytes carry (C{marks}:
    the wire offset where each is complete).
    """

    def __init__(self, side: str, tls: MemoryTLS | None) -> None:
        self.side, self.tls = side, tls
        self.sent, self.received = bytearray(), bytearray()
        self.waiting = bytearray()  # sent before its handshake was done
        self.ended: Failure | None = None
        self.notified = False  # it sent close_notify
        self.told = False  # close_notify came to it before it sent its own
        self.broken = False  # it sent bytes that are not TLS
        self.marks: list[tuple[int, str]] = []
        self.out = 0  # bytes it wrote to its transport
        self.flights = 0  # of its handshake's bytes it has sent
        self.hello_sent = 0  # where its handshake's bytes end
        self.hello_done = False  # its (first) handshake is done

    @property
    def end(self) -> End:
        return self.transport  # type: ignore[return-value]

    def connectionMade(self) -> None:
        if self.tls is not None:
            self.tls.handshake()
            self._hello()

    def _hello(self) -> None:
        """Send what its handshake wrote, counted as a flight."""
        before = self.out
        self._flush()
        if self.out > before and not self.hello_done:
            self.flights += 1
            self.hello_sent = self.out
        self.hello_done = self.hello_done or self.tls.done  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason

    def _flush(self, cause: str | None = None) -> None:
        assert self.tls is not None
        data = self.tls.output()
        if data:
            self.end.write(data)
            self.out += len(data)
        if cause is not None:
            self.marks.append((self.out, cause))

    def dataReceived(self, data: bytes) -> None:
        if self.tls is None:
            self.received += data
            return
        tls = self.tls
        tls.feed(data)
        if not tls.done:
            tls.handshake()
            self._hello()
            if tls.done and self.waiting:
                tls.write(bytes(self.waiting))
                del self.waiting[:]
        if tls.done and not tls.failed:
            self.received += tls.read()
            self.told = self.told or (tls.closed and not self.notified)
        if tls.failed:
            if not self.end.disconnecting:
                self._flush(f"{self.side} TLS error")  # its alert
                self.end.loseConnection()
            return
        self._flush()
        if self.side == "backend" and tls.closed and not self.notified:
            self.close_notify()  # (a backend answers it, as Twisted's TLS does)
        if self.side == "backend" and tls.closed and self.notified:
            self.end.loseConnection()

    @property
    def speaking(self) -> bool:
        """Whether it can still send (TLS or not)."""
        end = self.end
        return end.connected and not end.disconnecting and not end.aborting

    @property
    def can_send(self) -> bool:
        """Whether it can still send application bytes."""
        tls_ok = self.tls is None or not (self.tls.failed or self.broken)
        return self.speaking and tls_ok and not self.notified

    def send(self, data: bytes) -> None:
        self.sent += data
        if self.tls is None:
            self.end.write(data)
        elif not self.tls.done:
            self.waiting += data
        else:
            self.tls.write(data)
            self._flush()

    def close_notify(self) -> None:
        assert self.tls is not None
        before = self.out
        self.tls.shutdown()
        self._flush()
        if self.out > before:  # (not while a handshake goes on)
            self.notified = True
            self.marks.append((self.out, f"{self.side} closed"))

    def key_updates(self, count: int) -> None:
        assert self.tls is not None
        self.tls.key_update(count)
        self._flush()

    def renegotiate(self) -> None:
        assert self.tls is not None
        self.tls.renegotiate()
        self._flush()

    def garbage(self) -> None:
        self.broken = True
        self.end.write(GARBAGE)
        self.marks.append((self.out + 5, f"{self.side} TLS error"))
        self.out += len(GARBAGE)


class Files:
    """The backend's certificates (for its name, and not), in PEM files."""

    def __init__(self, directory: str) -> None:
        self.ca = os.path.join(directory, "ca.pem")
        CA.cert_pem.write_to_path(self.ca)
        self.certificates: dict[bool, tuple[str, str]] = {}
        for good, name in [(True, "backend.example"), (False, "other.example")]:
            leaf = CA.issue_cert(name)
            paths = (os.path.join(directory, f"{name}.pem"), f"{directory}/{name}.key")
            leaf.cert_chain_pems[0].write_to_path(paths[0])
            leaf.private_key_pem.write_to_path(paths[1])
            self.certificates[good] = paths
        self.proxy = leaf_certificates()
        self.backend_tls = BackendTLS("backend.example", self.ca)


class ConnectionModel(RuleBasedStateMachine):
    """One connection's life, any interleaving of its peers' events."""

    files: Files  # (set by the test)

    def __init__(self) -> None:
        super().__init__()
        self.clock, self.service_clock = Clock(), Clock()
        self.records: list[ConnectionRecord] = []
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._log)
        self.endpoint = Endpoint()
        self.backend: Peer | None = None
        self.backend_link: Connection | None = None
        self.ready: Any = None  # the backend side's (BackendSide.ready)
        self.cause: str | None = None  # the first, as the model saw it
        self.early: list[str] = []  # TLS's causes delivered before the first cause
        self.delivered: list[str] = []  # TLS's causes the proxy was sent, in order
        self.lost: dict[str, str] = {}  # how a side's TCP ended: end, reset
        self.ended: set[str] = set()  # the sides whose end the relay has seen
        self.moved: str | None = None  # the side where the event carried something
        self.disturbed = False  # an event happened that may abort the connection
        self.stopped: list[object] | None = None  # the service's stop, once SIGTERM
        self.drain_deadline = 0.0
        self.failing = False  # an event raised or a check failed

    def _log(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.logged.append(event)

    # Setting up.

    @initialize(
        version=st.sampled_from([TLS1_3_VERSION, TLS1_2_VERSION]),
        backend=st.sampled_from(
            ["tcp", "tls", "tcp", "tls 1.2", "tcp", "tls", "tls, not its name"]
        ),
    )
    def start(self, version: int, backend: str) -> None:
        """The proxy accepts a client's connection."""
        files = self.files
        self.backend_mode = backend
        backend_tls = None if backend == "tcp" else files.backend_tls
        config = ProxyConfig(
            listen="tcp:0",
            connect="tcp:h:1" if backend_tls is None else "tls:h:1",
            certificates=files.proxy,
            backend_tls=backend_tls,
            timeouts=TIMEOUTS,
            limits=LIMITS,
            service="model",
        )
        self.admission = Admission("model", Limits(), SharedLimit(), self.clock)
        self.relay = RelayFactory(
            config,
            Backend(self.endpoint, backend_tls, self.clock),
            self.admission,
            self.clock,
            self.records.append,
        )
        factory = accepting(self.relay, files.proxy, self.clock)
        self.service = ProxyService(config, Service(), self.relay, self.service_clock)
        self.server: TLSProtocol = factory.buildProtocol(Pair.CLIENT)  # type: ignore[assignment]
        self.side: ClientSide = self.server.wrappedProtocol  # type: ignore[assignment]
        self.client = Peer("client", MemoryTLS(version=version, sni=b"localhost"))
        self.event(
            lambda: setattr(
                self,
                "link",
                Connection(self.server, self.client, Pair.LISTEN, Pair.CLIENT),
            )
        )

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self._log)
        try:
            if not self.failing and hasattr(self, "link"):
                self.finish()
        finally:
            for peer in [getattr(self, "client", None), self.backend]:
                if peer is not None and peer.tls is not None:
                    peer.tls.free()

    # The ends.

    @property
    def client_end(self) -> End:
        return self.link.connecting

    @property
    def proxy_end(self) -> End:
        return self.link.accepting

    @property
    def backend_end(self) -> End | None:
        return None if self.backend_link is None else self.backend_link.accepting

    @property
    def proxy_backend_end(self) -> End | None:
        return None if self.backend_link is None else self.backend_link.connecting

    def ends(self) -> list[End]:
        ends = [self.proxy_end, self.client_end]
        if self.backend_link is not None:
            ends += [self.backend_link.connecting, self.backend_link.accepting]
        return ends

    # Events: each, then the reactor's turn, then the checks.

    def event(
        self,
        action: Callable[[], Any],
        explain: Callable[[Any], object] | None = None,
    ) -> Any:
        """
        Run C{action}, the reactor's turn, then C{explain} (given what the
        action returned: the model's causes), then the checks.
        """
        self.failing = True
        try:
            result = action()
            turn(self.clock, self.ends() if hasattr(self, "link") else [])
        except Exception as e:
            raise AssertionError(f"an exception escaped to the reactor: {e!r}") from e
        if explain is not None:
            explain(result)
        if hasattr(self, "link"):
            self.explain_ends()
        self.moved = None
        self.check()
        self.failing = False
        return result

    def carry(self, source: End) -> bool:
        """One thing from C{source} to the other end: a read, an end, a reset."""
        before = source.read
        return (
            self.event(
                lambda: Connection.carry(source),
                lambda what: self.explain(source, before, what),
            )
            is not None
        )

    def explain(self, source: End, before: int, what: str | None) -> None:
        """The model's causes in what moved from C{source} past C{before}."""
        self.moved = (
            "client" if source in (self.client_end, self.proxy_end) else "backend"
        )
        if what == "bounced":  # the proxy's bytes toward a closed peer: a reset
            self.lost["client" if source is self.proxy_end else "backend"] = "reset"
            return
        sender = {
            id(p.end): p for p in [self.client, self.backend] if p is not None
        }.get(id(source))
        if sender is None or what is None:
            return
        if what in ("end", "reset"):
            self.lost[sender.side] = what
        for offset, cause in sender.marks:
            if before < offset <= source.read:
                self.delivered.append(cause)
        if sender.side == "backend" and self.backend_mode == "tls, not its name":
            self.caused("backend TLS error")  # (its first bytes: its certificate)

    def explain_ends(self) -> None:
        """
        A side's loss, as the relay learns it: its TCP connection ends (TLS's
        own end, close_notify or an error, waits for TCP's close to flush).
        """
        sides = [("client", self.proxy_end), ("backend", self.proxy_backend_end)]
        # (The side where something moved first: the other's loss follows.)
        sides.sort(key=lambda side: side[0] != self.moved)
        for side, end in sides:
            if end is None or end.lost is None or side in self.ended:
                continue
            self.ended.add(side)
            tls = [c for c in self.delivered if c.startswith(side)]
            if tls:
                self.caused(tls[0])
            elif side in self.lost:
                clean = (
                    f"{side} {self.backend_mode} {self.lost[side]}" == "backend tcp end"
                )
                self.caused("backend closed" if clean else f"{side} {self.lost[side]}")
            else:  # (the proxy's doing: an abort only once disturbed)
                assert self.disturbed or not end.aborting, f"{side} aborted, ends clean"
                self.caused(f"{side} gone")

    def caused(self, cause: str) -> None:
        """One of the model's causes: the first ends the connection."""
        if cause.startswith("backend") and not self.opened:
            cause = "unverified"
        if self.cause is None:
            self.cause, self.early = cause, list(self.delivered)
        if cause not in ("client closed", "backend closed"):
            self.disturbed = True

    @property
    def opened(self) -> bool:
        return any(r.event == "open" for r in self.records)

    def settle(self) -> None:
        """Carry everything that can move, the clock standing still."""
        for _ in range(10_000):
            moved = False
            for end in self.ends():
                moved = self.carry(end) or moved
            if not moved:
                return
        raise AssertionError("the connection never settles")

    # The checks, after every event.

    def check(self) -> None:
        client, backend = self.client, self.backend
        # Bytes: in order, nothing lost or made up, each side's a prefix.
        backend_received = backend.received if backend is not None else b""
        backend_sent = backend.sent if backend is not None else b""
        assert client.sent.startswith(backend_received), (
            "the backend got bytes out of order or made up"
        )
        assert backend_sent.startswith(client.received), (
            "the client got bytes out of order or made up"
        )
        # A clean end is a complete one, after the other side's clean end.
        if client.told:
            assert "backend closed" in self.delivered or (
                self.backend_mode == "tcp" and self.lost.get("backend") == "end"
            ), "close_notify to the client, the backend not closed"
            assert client.received == backend_sent, "close_notify before every byte"
        if backend is not None and self.backend_heard_end():
            assert "client closed" in self.delivered, (
                "a clean end to the backend, without the client's close_notify"
            )
            assert backend_received == client.sent, (
                "a clean end to the backend before every byte"
            )
        # The backend only after the handshake.
        if self.endpoint.attempts:  # (its Finished is in its second flight)
            assert client.flights >= 2 and self.client_end.read >= client.hello_sent, (
                "the backend was connected before the handshake"
            )
        # Memory.
        held = self.held()
        assert held <= BOUND, f"the proxy holds {held} bytes"
        # No write to a side that is gone; no misuse of a transport.
        for end in self.ends():
            assert not end.misuse, end.misuse
        assert not self.logged, self.logged
        ready = self.ready
        if ready is not None and ready.called:
            assert not isinstance(ready.result, Failure), ready.result
        # Records.
        events = [r.event for r in self.records]
        assert events in ([], ["open"], ["close"], ["open", "close"]), events
        gone = self.both_gone()
        if "close" in events:
            record = self.records[-1]
            assert gone, "a close record before both sides were gone"
            assert self.cause is not None, f"closed ({record.reason}) without a cause"
            reasons = REASONS.get(self.cause, ())
            assert record.reason is not None and record.reason.startswith(reasons), (
                record.reason,
                self.cause,
            )
            if events[0] == "open":
                assert record.id == self.records[0].id
            assert len(backend_received) <= record.bytes_from_client <= len(client.sent)
            assert len(client.received) <= record.bytes_to_client <= len(backend_sent)
            assert self.clock.getDelayedCalls() == [], "a timer left after the close"
            assert self.relay.live == set() and self.admission.live == 0
        else:
            assert not gone, "both sides gone, and no close record"

    def backend_heard_end(self) -> bool:
        """Whether the proxy ended the backend cleanly."""
        backend, end = self.backend, self.backend_end
        assert backend is not None and end is not None
        if backend.tls is not None:
            return backend.told
        return (
            end.lost is not None
            and end.lost.check(ConnectionDone) is not None
            and not end.fin
        )

    def both_gone(self) -> bool:
        """Whether the proxy's protocols know both sides are gone."""
        if self.proxy_end.lost is None:
            return False
        if not self.endpoint.attempts:
            return True
        proxy_backend = self.proxy_backend_end
        if proxy_backend is None:
            return self.endpoint.attempts[0][1].called  # failed or cancelled
        return proxy_backend.lost is not None or (
            self.ready.called and not self.opened and proxy_backend.aborting
        )

    def held(self) -> int:
        """
        What the proxy holds for the connection: its transports' buffers, its
        TLS layers' (Twisted's buffers, OpenSSL's memory buffers: private
        attributes, as no public call tells), the client's bytes that wait
        for the backend.
        """
        total = 0
        for end in [self.proxy_end, self.proxy_backend_end]:
            if end is None:
                continue
            total += len(end.buffer)
            tls = end.protocol
            if isinstance(tls, TLSProtocol):
                total += sum(map(len, getattr(tls._aggregator, "_buffer", [])))  # type: ignore[attr-defined]
                total += sum(map(len, tls._appSendBuffer))  # type: ignore[attr-defined]
                connection = tls.getHandle()  # type: ignore[no-untyped-call]
                if connection is not None:  # (None once lost)
                    for bio in (connection._from_ssl, connection._into_ssl):
                        total += openssl.BIO_get_mem_data(bio, ffi.new("char **"))
        pending = self.side._backend
        if isinstance(pending, _Connecting):
            total += sum(map(len, pending.chunks))
        return total

    # The steps.  (One rule, its actions drawn with weights: hypothesis
    # would leave some of several rules out of each example, the network's
    # too, and draws each rule as often as any other.)

    @rule(action=STEPS)
    def step(self, action: tuple[Any, ...]) -> None:
        """One event: the network's, a peer's, the clock's, twistd's."""
        getattr(self, action[0])(*action[1:])

    def network(self, what: str) -> None:
        """
        Everything that can move moves, or one read, end or reset moves one
        way, or the backend's TCP connection is made.
        """
        if what == "everything":
            self.settle()
        elif what == "backend accepts":
            if self.attempt() is not None and not self.attempt().called:
                self.event(self.connect_backend)
        else:
            source = {
                "to proxy": self.client_end,
                "to client": self.proxy_end,
                "from backend": self.backend_end,
                "to backend": self.proxy_backend_end,
            }[what]
            if source is not None:
                self.carry(source)

    def hold(self, side: str, held: bool) -> None:
        """A peer stops reading, or reads again."""
        end = self.client_end if side == "client" else self.backend_end
        if end is not None:
            self.event(lambda: setattr(end, "held", held))

    def send(self, side: str, size: int) -> None:
        """A peer sends bytes (the client's held back until its handshake is done)."""
        peer = self.client if side == "client" else self.backend
        if peer is not None and peer.can_send:
            stream = STREAMS[side]
            data = stream[len(peer.sent) : len(peer.sent) + size]
            self.event(lambda: peer.send(data))

    def tls_traffic(self, side: str, count: int) -> None:
        """TLS 1.3: KeyUpdates that ask for one back; 1.2: a renegotiation asked."""
        peer = self.client if side == "client" else self.backend
        if peer is None or peer.tls is None or not (peer.can_send and peer.hello_done):
            return
        if peer.tls.version == TLS1_3_VERSION:
            self.event(lambda: peer.key_updates(count))
        else:
            self.disturbed = True  # (refused: a TLS error)
            self.event(peer.renegotiate)

    def attempt(self) -> Any:
        """The backend's connection attempt, until the test completes it."""
        attempts = self.endpoint.attempts
        return attempts[0][1] if attempts and self.backend is None else None

    def connect_backend(self) -> None:
        factory, attempt = self.endpoint.attempts[0]
        tls = None
        if self.backend_mode != "tcp":
            good = self.backend_mode != "tls, not its name"
            cert, key = self.files.certificates[good]
            self.disturbed = self.disturbed or not good
            version = TLS1_2_VERSION if "1.2" in self.backend_mode else TLS1_3_VERSION
            tls = MemoryTLS(cert, key, version)
        self.backend = Peer("backend", tls)
        proxy_side = factory.buildProtocol(Pair.BACKEND)
        self.ready = getattr(proxy_side, "wrappedProtocol", proxy_side).ready
        self.backend_link = Connection(
            self.backend, proxy_side, Pair.BACKEND, Pair.BACKEND_LOCAL
        )
        attempt.callback(proxy_side)

    # Rules: what may end the connection, time, SIGTERM.

    def something_ends(self, what: str) -> None:
        """
        A peer closes (client: close_notify, FIN, reset, bytes not TLS;
        backend: close_notify if TLS, else a FIN; reset; the connection
        refused), the clock runs to the next timer, or SIGTERM.
        """
        client, backend = self.client, self.backend
        if what == "SIGTERM":
            if self.stopped is None:
                self.sigterm()
        elif what == "next timer":
            timers = self.clock.getDelayedCalls() + self.service_clock.getDelayedCalls()
            if timers:
                self.run_clocks(min(t.getTime() for t in timers))
        elif what == "backend refuses":
            if self.attempt() is not None and not self.attempt().called:
                self.disturbed = True
                self.event(
                    lambda: self.attempt().errback(Failure(ConnectionRefusedError())),
                    lambda _: self.caused("connect failed"),
                )
        elif what == "client close_notify":
            if client.can_send and client.hello_done:
                self.event(client.close_notify)
        elif what.startswith("client"):
            if client.speaking:
                self.disturbed = True
                end = client.end
                actions = {
                    "client FIN": end.loseConnection,
                    "client reset": end.abortConnection,
                }
                self.event(actions.get(what, client.garbage))
        elif backend is None or not backend.speaking:
            return
        elif what == "backend reset":
            self.disturbed = True
            self.event(backend.end.abortConnection)
        elif backend.tls is None:
            self.event(backend.end.loseConnection)
        elif backend.hello_done and not backend.notified:
            self.event(backend.close_notify)

    def time_passes(self, seconds: float) -> None:
        """The clock runs by a moment."""
        self.run_clocks(self.clock.seconds() + seconds)

    def run_clocks(self, target: float) -> None:
        """Both clocks to C{target}, a stop at each timer on the way."""
        while True:
            timers = self.clock.getDelayedCalls() + self.service_clock.getDelayedCalls()
            when = min(
                [t.getTime() for t in timers if t.getTime() <= target] or [target]
            )
            ours = list(self.clock.getDelayedCalls())
            drains = (
                self.stopped is not None
                and bool(self.relay.live)
                and when >= self.drain_deadline
                and any(
                    t.getTime() <= when for t in self.service_clock.getDelayedCalls()
                )
            )

            def explain(
                _: object, ours: list[Any] = ours, drains: bool = drains
            ) -> None:
                if any(t.called for t in ours):
                    self.caused("timer")
                if drains:
                    self.caused("drain")

            self.event(lambda when=when: self.advance(when), explain)
            if when >= target:
                return

    def advance(self, when: float) -> None:
        for clock in (self.clock, self.service_clock):
            clock.advance(when - clock.seconds())

    def sigterm(self) -> None:
        """twistd stops the service: it lets the connection drain, then aborts it."""
        stopped: list[object] = []
        self.stopped = stopped
        self.drain_deadline = self.service_clock.seconds() + LIMITS.drain
        self.event(lambda: self.service.stopService().addBoth(stopped.append))

    # The end of an example: the connection ends.

    def finish(self) -> None:
        """
        Undisturbed, the connection ends cleanly without a timer: every byte
        delivered.  In any case it ends once the timers have run, with one
        close record.
        """
        self.settle()
        if not self.disturbed:
            for end in self.ends():
                end.held = False
            for _ in range(2):  # (before the client's close_notify, and after)
                self.settle()
                if self.attempt() is not None and not self.attempt().called:
                    self.event(self.connect_backend)
                self.settle()
                if self.client.can_send and self.client.tls.done:  # type: ignore[union-attr]
                    self.event(self.client.close_notify)
            if not self.disturbed:
                assert self.both_gone(), "a clean end left the connection open"
                assert self.cause in ("client closed", "backend closed"), self.cause
                if self.cause == "client closed" and self.backend is not None:
                    assert self.backend.received == self.client.sent
                    assert heard_close(self.backend), "the backend got no clean end"
                # (No half-close, as README.rst says: once the client's
                # close_notify has come, the backend's last bytes may not.)
                if self.cause == "backend closed" and "client closed" not in self.early:
                    assert self.client.received == self.backend.sent  # type: ignore[union-attr]
                if self.cause == "backend closed":
                    assert heard_close(self.client), "the client got no close_notify"
        # A trusted backend reads, in the end; a client need not.
        if self.backend_end is not None:
            self.backend_end.held = False
        for _ in range(100):
            self.settle()
            timers = self.clock.getDelayedCalls() + self.service_clock.getDelayedCalls()
            if not timers:
                break
            self.run_clocks(min(t.getTime() for t in timers))
        if self.attempt() is not None and not self.attempt().called:
            self.event(  # the endpoint's own timeout
                lambda: self.attempt().errback(Failure(TimeoutError())),
                lambda _: self.caused("connect failed"),
            )
            self.settle()
        assert self.both_gone(), "the connection never ended"
        if self.stopped is not None:
            assert self.stopped == [None], "the drain never ended"
        assert not self.logged, self.logged


def heard_close(peer: Peer) -> bool:
    """Whether C{peer} got a clean end: close_notify, or (plain TCP) a FIN."""
    if peer.tls is not None:
        return peer.tls.closed
    return peer.end.lost is not None and peer.end.lost.check(ConnectionDone) is not None


def _settings(name: str) -> settings:
    """The model's settings: C{ci} (a fixed seed), or C{long} (random seeds)."""
    common: dict[str, Any] = dict(
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        report_multiple_bugs=False,
    )
    if name == "long":
        return settings(max_examples=5000, stateful_step_count=100, **common)
    return settings(
        max_examples=500, stateful_step_count=50, derandomize=True, **common
    )


class ModelTests(SynchronousTestCase):
    """The relay's contract holds in every interleaving the model tries."""

    def test_model(self) -> None:
        """Any sequence of peers', network and timer events keeps the contract."""
        directory = self.mktemp()
        os.mkdir(directory)
        ConnectionModel.files = Files(directory)
        run_state_machine_as_test(
            ConnectionModel, settings=_settings(os.environ.get("TLSPROXY_MODEL", "ci"))
        )
