"""
Unit tests for the command line: one validated model, one-line errors.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys

from OpenSSL import SSL
from twisted.application.service import IService
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tlsproxy import tap
from tlsproxy.process import StartupError, one_line
from tlsproxy.values import Timeouts

from .memory import CA


def handshake(
    server_context: SSL.Context, client_context: SSL.Context
) -> SSL.Connection:
    """A TLS handshake between two contexts in memory; the client's end."""
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    for _ in range(4):
        for this, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                this.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(this.bio_read(1 << 16))
    return client


class OptionsTests(SynchronousTestCase):
    """Every option is checked in postOptions, before twistd chroots."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def error(self, *args: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*args)
        return str(caught.exception)

    def test_defaults(self) -> None:
        """Only --connect and a certificate are needed; the rest defaults."""
        options = self.parse("--connect", "tcp:127.0.0.1:80", "--self-signed", "x")
        config = options.config
        self.assertEqual(config.listen, "tcp:443")
        self.assertEqual(config.connect, "tcp:127.0.0.1:80")
        self.assertEqual(config.timeouts, Timeouts(handshake=30, connect=30, idle=3600))
        self.assertEqual(config.service, "tlsproxy")
        assert options.fingerprint is not None

    def test_all_options(self) -> None:
        """Each option reaches the configuration."""
        directory = self.mktemp()
        os.mkdir(directory)
        leaf = CA.issue_cert("localhost")
        cert = os.path.join(directory, "cert.pem")
        key = os.path.join(directory, "key.pem")
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        options = self.parse(
            "--listen=tcp:8443:interface=127.0.0.1",
            "--connect=tcp:10.0.0.2:80:bindAddress=10.0.0.3",
            f"--cert={cert}",
            f"--key={key}",
            "--handshake-timeout=1.5",
            "--connect-timeout=2",
            "--idle-timeout=60",
        )
        config = options.config
        self.assertEqual(config.listen, "tcp:8443:interface=127.0.0.1")
        self.assertEqual(config.connect, "tcp:10.0.0.2:80:bindAddress=10.0.0.3")
        self.assertEqual(config.timeouts, Timeouts(handshake=1.5, connect=2, idle=60))
        self.assertIsNone(options.fingerprint)

    def test_connect_required(self) -> None:
        """Without --connect there is nothing to do."""
        self.assertEqual(
            self.error("--self-signed", "x"),
            "--connect is required (for example tcp:127.0.0.1:80)",
        )

    def test_connect_port(self) -> None:
        """A TCP backend's port is 1 to 65535 (Twisted takes any integer)."""
        for connect in ("tcp:h:0", "tcp:h:65536", "tls:host=h:port=-1"):
            self.assertEqual(
                self.error("--connect", connect, "--self-signed", "x"),
                f"--connect {connect}: not a port",
            )
        self.parse("--connect", "tcp:h:65535", "--self-signed", "x")

    def test_certificate_required(self) -> None:
        """Without --cert or --self-signed there is no certificate."""
        self.assertEqual(
            self.error("--connect", "tcp:h:1", "--key", "k.pem"),
            "--cert FILE (or --self-signed NAME) is required",
        )

    def test_self_signed_alone(self) -> None:
        """--self-signed does not mix with --cert or --key."""
        self.assertEqual(
            self.error("--connect", "tcp:h:1", "--self-signed", "x", "--key", "k"),
            "--self-signed x: not with --cert or --key",
        )

    def test_unknown_endpoint(self) -> None:
        """An endpoint string Twisted does not know is named."""
        self.assertEqual(
            self.error("--connect", "bogus:1", "--self-signed", "x"),
            "--connect bogus:1: Unknown endpoint type: 'bogus'",
        )
        self.assertEqual(
            self.error(
                "--listen", "bogus:1", "--connect", "tcp:h:1", "--self-signed", "x"
            ),
            "--listen bogus:1: Unknown endpoint type: 'bogus'",
        )

    def test_incomplete_endpoint(self) -> None:
        """An endpoint string missing its port is named."""
        self.assertTrue(
            self.error("--connect", "tcp:host", "--self-signed", "x").startswith(
                "--connect tcp:host: "
            )
        )

    def test_bad_file(self) -> None:
        """A certificate problem is the option, the value and the reason."""
        self.assertEqual(
            self.error("--connect", "tcp:h:1", "--cert", "/nonexistent.pem"),
            "--cert /nonexistent.pem: No such file or directory",
        )

    def test_odd_endpoint_errors(self) -> None:
        """
        Whatever an endpoint parser raises (here a StopIteration turned
        RuntimeError, and an error without a message) is one line.
        """
        self.assertEqual(
            self.error("--connect", "tcp:h:1\\", "--self-signed", "x"),
            "--connect tcp:h:1\\: generator raised StopIteration",
        )
        message = self.error(
            "--connect", "ssl:h:443:caCertsDir=/nonexistent", "--self-signed", "x"
        )
        self.assertEqual(
            message, "--connect ssl:h:443:caCertsDir=/nonexistent: UnlistableError"
        )

    def test_control_characters_escaped(self) -> None:
        """A value with a line break still gives a one-line error."""
        self.assertEqual(
            self.error(
                "--connect", "tcp:h:1", "--self-signed", "x", "--idle-timeout", "a\nb"
            ),
            "--idle-timeout a\\nb: not a number of seconds",
        )

    def test_tls_policy(self) -> None:
        """--alpn, --tls-min and --ciphers are checked and reach the context."""
        base = ("--connect", "tcp:h:1", "--self-signed", "x")
        options = self.parse(*base, "--alpn", "h2,http/1.1", "--tls-min", "1.3")
        client = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client.set_alpn_protos([b"http/1.1"])
        self.assertEqual(
            handshake(
                options.config.certificates.context, client
            ).get_alpn_proto_negotiated(),
            b"http/1.1",
        )
        old_client = SSL.Context(SSL.TLS_CLIENT_METHOD)
        old_client.set_max_proto_version(SSL.TLS1_2_VERSION)
        with self.assertRaises(SSL.Error):
            handshake(options.config.certificates.context, old_client)
        for args, message in [
            (("--alpn", "h2,,x"), "--alpn h2,,x: names are 1 to 255"),
            (("--alpn", "é"), "--alpn é: names are 1 to 255"),
            (("--tls-min", "1.1"), "--tls-min 1.1: must be 1.2 or 1.3"),
            (("--ciphers", "NOTHING"), "--ciphers NOTHING: no cipher matches"),
            (("--ciphers", "é"), "--ciphers é: no cipher matches"),
        ]:
            self.assertTrue(self.error(*base, *args).startswith(message), args)

    def test_client_certificates(self) -> None:
        """--client-ca and --allow-* (repeatable) make the allow list."""
        directory = self.mktemp()
        os.mkdir(directory)
        ca = os.path.join(directory, "ca.pem")
        CA.cert_pem.write_to_path(ca)
        base = ("--connect", "tcp:h:1", "--self-signed", "x")
        options = self.parse(
            *base,
            "--client-ca",
            ca,
            "--allow-cn",
            "a",
            "--allow-cn",
            "b",
            "--allow-ou",
            "ops",
            "--allow-dns",
            "c.example",
            "--allow-uri",
            "spiffe://x",
        )
        allow = options.config.allow
        self.assertEqual(allow.cn, frozenset({"a", "b"}))
        self.assertEqual(
            (allow.ou, allow.dns, allow.uri),
            (frozenset({"ops"}), frozenset({"c.example"}), frozenset({"spiffe://x"})),
        )
        self.assertEqual(
            self.error(*base, "--allow-cn", "a"),
            "--allow-cn, -ou, -dns and -uri need --client-ca",
        )
        self.assertEqual(
            self.error(*base, "--client-ca", directory),
            f"--client-ca {directory}: Is a directory",
        )

    def test_several_certificates(self) -> None:
        """--cert and --key repeat, in pairs; --sni-strict reaches the config."""
        directory = self.mktemp()
        os.mkdir(directory)
        paths = []
        for name in ("a.test", "b.test"):
            leaf = CA.issue_cert(name)
            cert, key = (os.path.join(directory, f"{name}.{x}") for x in "ck")
            leaf.cert_chain_pems[0].write_to_path(cert)
            leaf.private_key_pem.write_to_path(key)
            paths += [cert, key]
        a, a_key, b, b_key = paths
        options = self.parse(
            "--connect", "tcp:h:1", "--cert", a, "--key", a_key, "--cert", b,
            "--key", b_key, "--sni-strict",
        )  # fmt: skip
        certificates = options.config.certificates
        self.assertEqual(
            [i.where for i in certificates.credentials.identities],
            [f"--cert {a} --key {a_key}", f"--cert {b} --key {b_key}"],
        )
        self.assertTrue(certificates.strict)
        options = self.parse("--connect", "tcp:h:1", "--cert", a, "--key", a_key)
        self.assertFalse(options.config.certificates.strict)
        self.assertEqual(
            self.error("--connect", "tcp:h:1", "--cert", a, "--cert", b, "--key", b),
            "--key: 1 given for 2 --cert: give one per --cert, or none"
            " (each --cert file then holds its key)",
        )

    def test_timeouts(self) -> None:
        """Timeouts are positive, finite numbers of seconds."""
        base = ("--connect", "tcp:h:1", "--self-signed", "x")
        self.assertEqual(
            self.error(*base, "--idle-timeout", "abc"),
            "--idle-timeout abc: not a number of seconds",
        )
        for value in ("0", "-1", "inf", "nan"):
            self.assertEqual(
                self.error(*base, "--handshake-timeout", value),
                f"--handshake-timeout {value}: must be a positive number of seconds",
            )


class StartupTests(TestCase):
    """
    What twistd does with the service, and how start-up failures read.
    (Trial's reactor runs here, so that a stopped port closes its socket.)
    """

    def options(self, listen: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(
            ["--listen", listen, "--connect", "tcp:127.0.0.1:1", "--self-signed", "x"]
        )
        return options

    def test_service_binds_when_privileged(self) -> None:
        """The port is bound in privilegedStartService, not before."""
        self.patch(sys, "excepthook", sys.excepthook)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        service = tap.makeService(self.options(f"tcp:{port}:interface=127.0.0.1"))
        self.assertTrue(IService.providedBy(service))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        socket.create_connection(("127.0.0.1", port)).close()

    def test_port_in_use(self) -> None:
        """A port that cannot be bound is a one-line StartupError."""
        self.patch(sys, "excepthook", sys.excepthook)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"tcp:{port}:interface=127.0.0.1"
        service = tap.makeService(self.options(listen))
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"tlsproxy: --listen {listen}: "), message)
        self.assertIn("Address already in use", message)

    def test_fingerprint_logged(self) -> None:
        """A self-signed certificate's fingerprint is logged at start-up."""
        from twisted.logger import globalLogPublisher

        self.patch(sys, "excepthook", sys.excepthook)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = self.options("tcp:0")
        tap.makeService(options)
        [event] = [e for e in events if "fingerprint" in e]
        self.assertEqual(event["fingerprint"], options.fingerprint)
        self.assertEqual(event["made"], "self-signed certificate for x, for trying out")

    def test_no_fingerprint_for_files(self) -> None:
        """A certificate from files logs no fingerprint line."""
        from twisted.logger import globalLogPublisher

        self.patch(sys, "excepthook", sys.excepthook)
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "both.pem")
        leaf = CA.issue_cert("localhost")
        with open(path, "wb") as f:
            f.write(leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes())
        options = tap.Options()
        options.parseOptions(["--connect", "tcp:127.0.0.1:1", "--cert", path])
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tap.makeService(options)
        self.assertEqual([e for e in events if "fingerprint" in e], [])

    def test_one_line_hook(self) -> None:
        """
        The exception hook prints a StartupError as its one line and hands
        anything else to the previous hook.
        """
        seen: list[object] = []
        hook = one_line(lambda *args: seen.append(args[0]))
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        hook(StartupError, StartupError("tlsproxy: broken"), None)
        self.assertEqual(stderr.getvalue(), "tlsproxy: broken\n")
        hook(ValueError, ValueError("x"), None)
        self.assertEqual(seen, [ValueError])
