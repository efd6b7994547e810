"""
--reuse-port: several processes share one listening port (SO_REUSEPORT),
one per core.
"""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.tcp import makeBinding
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import (
    HELLO,
    HOST,
    TIMEOUT,
    TwistdProxy,
    client_context,
    run_startup_error,
    start_http_backend,
    temp_dir,
    wait_until,
)
from tlsproxy import tap
from tlsproxy.service import proxy_service
from tlsproxy.values import ConfigError, ProxyConfig

from .memory import leaf_certificates


def config(listen: str, reuse_port: bool = True) -> ProxyConfig:
    return ProxyConfig(
        listen=listen,
        connect="tcp:127.0.0.1:80",
        certificates=leaf_certificates(),
        reuse_port=reuse_port,
    )


def listened(listen: str, reuse_port: bool = True) -> tuple[object, str]:
    """What C{listenTCP} was given for C{listen}: the port and the interface."""
    memory = MemoryReactorClock()
    proxy_service(config(listen, reuse_port), memory).privilegedStartService()
    [(port, _, _, interface)] = memory.tcpServers
    return port, interface


class ReusePortTests(SynchronousTestCase):
    """A tcp: or tcp6: --listen with --reuse-port binds with SO_REUSEPORT."""

    def test_tcp(self) -> None:
        """A tcp: port is bound with SO_REUSEPORT and SO_REUSEADDR."""
        self.assertEqual(
            listened("tcp:8443:interface=127.0.0.1"),
            (makeBinding("127.0.0.1", 8443, True, True), "127.0.0.1"),
        )

    def test_tcp6(self) -> None:
        """A tcp6: port too, on its IPv6 interface."""
        self.assertEqual(
            listened("tcp6:8443:interface=\\:\\:1"),
            (makeBinding("::1", 8443, True, True), "::1"),
        )

    def test_haproxy(self) -> None:
        """A tcp: port behind haproxy: too (any case of the prefixes)."""
        self.assertEqual(
            listened("HAProxy:tcp:8443"), (makeBinding("", 8443, True, True), "")
        )

    def test_without(self) -> None:
        """Without it, Twisted's own binding: a port number."""
        self.assertEqual(listened("tcp:8443", reuse_port=False), (8443, ""))

    def test_not_bound_here(self) -> None:
        """
        An endpoint that tlsproxy does not bind as TCP is refused with one
        line, also in an embedding's ProxyConfig.
        """
        for listen in ("unix:/run/x.sock", "systemd:domain=INET:index=0", "ssl:443"):
            with self.assertRaises(ConfigError) as caught:
                config(listen)
            self.assertEqual(
                str(caught.exception),
                f"--reuse-port: not with --listen {listen}"
                " (only tcp:, tcp6: and haproxy: over them)",
            )
        config("unix:/run/x.sock", reuse_port=False)  # (no error)


class OptionTests(SynchronousTestCase):
    """--reuse-port on the command line, and as a key of --config files."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--connect", "tcp:h:1", "--self-signed", "x", *args])
        return options

    def test_flag(self) -> None:
        """Off by default; --reuse-port turns it on."""
        self.assertFalse(self.parse().config.reuse_port)
        self.assertTrue(self.parse("--reuse-port").config.reuse_port)

    def test_refused(self) -> None:
        """With a unix: --listen it is one line of usage error."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--reuse-port", "--listen", "unix:/run/x.sock")
        self.assertEqual(
            str(caught.exception),
            "--reuse-port: not with --listen unix:/run/x.sock"
            " (only tcp:, tcp6: and haproxy: over them)",
        )

    def test_config_file(self) -> None:
        """In a --config file: reuse-port = yes, per section or in [DEFAULT]."""
        path = Path(self.mktemp())
        path.write_text(
            "[DEFAULT]\nconnect = tcp:h:1\nself-signed = x\nreuse-port = yes\n"
            "[a]\nlisten = tcp:1\n[b]\nlisten = tcp:2\nreuse-port = no\n"
        )
        options = tap.Options()
        options.parseOptions(["--config", str(path)])
        reused = [one.config.reuse_port for one in options.services]
        self.assertEqual(reused, [True, False])


class SharedPortTests(TestCase):
    """Real sockets, in this process: two services on one port."""

    def start(self, port: int, reuse_port: bool) -> IService:
        """A service listening on 127.0.0.1:C{port}, stopped at the end."""
        service = proxy_service(
            config(f"tcp:{port}:interface={HOST}", reuse_port),
            reactor,  # type: ignore[arg-type]
        )
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        return service

    def test_shared(self) -> None:
        """With reuse_port on both, two services bind the same port."""
        port = free_port()
        self.start(port, True)
        self.start(port, True)

    def test_not_shared(self) -> None:
        """Without it on the second, its bind fails."""
        port = free_port()
        self.start(port, True)
        with self.assertRaises(CannotListenError):
            self.start(port, False)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- two real twistd processes -------------------------------------------


def get(port: int, source: str = HOST) -> bytes:
    """The reply to GET / over TLS to C{port}, connecting from C{source}."""
    raw = socket.create_connection((HOST, port), TIMEOUT, (source, 0))
    with client_context().wrap_socket(raw) as tls:
        tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        return b"".join(iter(lambda: tls.recv(65536), b""))


class TwoProcessesTests(TestCase):
    """Two twistd processes share one port with --reuse-port."""

    def start(self, port: int, *args: str) -> TwistdProxy:
        proxy = TwistdProxy(
            temp_dir(self),
            ["--listen", f"tcp:{port}:interface={HOST}", *args],
        )
        self.addCleanup(proxy.stop)
        return proxy

    def test_both_accept(self) -> None:
        """
        Of 40 connections to the shared port, each process relays some (the
        kernel spreads them by a hash of the client's port: all 40 going to
        one of two would happen once in 2**39 runs).
        """
        backend = start_http_backend(self)
        port = free_port()
        args = ["--connect", f"tcp:{HOST}:{backend.port}", "--self-signed", "localhost"]
        proxies = [self.start(port, "--reuse-port", *args) for _ in range(2)]
        for _ in range(40):
            self.assertIn(HELLO, get(port))
        wait_until(
            lambda: sum(len(proxy.close_lines()) for proxy in proxies) == 40,
            "40 connections logged as closed",
        )
        closes = [len(proxy.close_lines()) for proxy in proxies]
        self.assertTrue(all(closes), closes)

    def test_second_without(self) -> None:
        """
        A second process without --reuse-port cannot bind the port: its
        start-up ends with a non-zero status and one line, no traceback.
        """
        port = free_port()
        args = ["--connect", f"tcp:{HOST}:1", "--self-signed", "localhost"]
        self.start(port, "--reuse-port", *args)
        listen = f"tcp:{port}:interface={HOST}"
        failure = run_startup_error(self, ["--listen", listen, *args])
        self.assertNotEqual(failure.exit_code, 0, failure.output)
        self.assertNotIn("Traceback", failure.output + failure.log)
        lines = [failure.last_line, *failure.log.splitlines()]
        self.assertTrue(
            any(f"--listen {listen}: " in line for line in lines),
            failure.output + failure.log,
        )
