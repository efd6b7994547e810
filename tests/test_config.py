"""
Unit tests of --config FILE: sections are services, validated by the same
code as the command line, and every error names the file, section and key.
"""

from __future__ import annotations

import math
import os
import resource
import socket
import sys
import textwrap

from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tlsproxy import config, tap
from tlsproxy.endpoints import overlap
from tlsproxy.process import StartupError
from tlsproxy.record import ConnectionLog

from .memory import CA, LEAF

TOP = os.path.join(os.path.dirname(__file__), "..")
SAMPLE = os.path.join(TOP, "etc", "tlsproxy.conf.sample")


class Files:
    """A directory for a test's INI files and PEM files."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.directory = case.mktemp()
        os.mkdir(self.directory)
        self.ca = self.path("ca.pem")
        CA.cert_pem.write_to_path(self.ca)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def ini(self, text: str, name: str = "tlsproxy.conf") -> str:
        """Write C{text} (dedented) to an INI file; return its path."""
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class ReadTests(SynchronousTestCase):
    """Sections become services; keys are the long options."""

    def setUp(self) -> None:
        self.files = Files(self)

    def error(self, *args: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            parse(*args)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_two_services(self) -> None:
        """
        Each section is a service named by the section, with [DEFAULT]'s
        values under its own, and the options' defaults under both.
        """
        path = self.files.ini(
            """
            [DEFAULT]
            self-signed = localhost
            idle-timeout = 60

            [web]
            listen = tcp:8443
            connect = tcp:127.0.0.1:80
            idle-timeout = 5

            [mail]
            listen = tcp:8465
            connect = tcp:127.0.0.1:25
            """
        )
        options = parse("--config", path)
        [web, mail] = [one.config for one in options.services]
        self.assertEqual((web.service, mail.service), ("web", "mail"))
        self.assertEqual((web.listen, mail.listen), ("tcp:8443", "tcp:8465"))
        self.assertEqual(web.connect, "tcp:127.0.0.1:80")
        self.assertEqual((web.timeouts.idle, mail.timeouts.idle), (5, 60))
        self.assertEqual(mail.timeouts.handshake, 30)
        self.assertEqual(mail.limits.total, math.inf)
        self.assertIsNone(options.metrics)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(options.total, (soft - 64) // 2)

    def test_shared_listen(self) -> None:
        """
        Two services on one port are a one-line error at start-up, with
        C{reuse-port} too (which would let both bind, and spread clients
        over a public service and one that requires certificates).
        """
        for extra, first, second in [
            ("", "tcp:8443", "tcp:8443"),
            ("reuse-port = yes", "tcp:8443", "tcp:port=8443"),
            ("reuse-port = yes", "tcp:8443:interface=127.0.0.1", "tcp6:8443"),
            ("", "tcp:8443:interface=\\:\\:1", "haproxy:tcp:8443:interface=\\:\\:1"),
            ("", "unix:/run/a.sock", "unix:address=/run/a.sock"),
        ]:
            path = self.files.ini(
                f"""
                [DEFAULT]
                connect = tcp:127.0.0.1:1
                self-signed = x
                {extra}
                [a]
                listen = {first}
                [b]
                listen = {second}
                """
            )
            self.assertEqual(
                self.error("--config", path),
                f"{path} [b] listen: {second}: the port of [a] ({first})",
            )

    def test_distinct_listens(self) -> None:
        """Other ports, other interfaces, free ports (0) and paths are fine."""
        for first, second in [
            ("tcp:8443", "tcp:8444"),
            ("tcp:8443:interface=127.0.0.1", "tcp:8443:interface=127.0.0.2"),
            ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),
            ("unix:/run/a.sock", "unix:/run/b.sock"),
        ]:
            self.assertFalse(overlap(first, second), (first, second))

    def test_command_line_is_one_service(self) -> None:
        """Without --config the command line is one service, "tlsproxy"."""
        options = parse("--connect", "tcp:h:1", "--self-signed", "x")
        self.assertEqual(options.services, [options])
        self.assertEqual(options.config.service, "tlsproxy")

    def test_repeatable_keys(self) -> None:
        """A repeatable option takes one value per line."""
        path = self.files.ini(
            f"""
            [web]
            connect = tcp:127.0.0.1:80
            self-signed = localhost
            client-ca = {self.files.ca}
            allow-cn =
                alice
                bob
            allow-ou = ops
            """
        )
        [web] = parse("--config", path).services
        self.assertEqual(web.config.allow.cn, frozenset({"alice", "bob"}))
        self.assertEqual(web.config.allow.ou, frozenset({"ops"}))

    def test_one_value_only(self) -> None:
        """A key that is not repeatable refuses a second line."""
        path = self.files.ini(
            """
            [web]
            connect = tcp:127.0.0.1:80
                tcp:127.0.0.1:81
            """
        )
        self.assertEqual(
            self.error("--config", path),
            f"{path} [web] connect: one value only, not 2",
        )

    def test_errors_name_file_section_and_key(self) -> None:
        """The command line's checks apply, their messages after the section."""
        for text, message in [
            (
                "connect = tcp:h:1\ncert = /x.pem",
                "--cert /x.pem: No such file or directory",
            ),
            ("self-signed = x", "--connect is required (for example tcp:127.0.0.1:80)"),
            ("connect = tcp:h:1", "--cert FILE (or --self-signed NAME) is required"),
            ("connect = bogus:1", "--connect bogus:1: Unknown endpoint type: 'bogus'"),
            (
                "self-signed = x\nconnect = tcp:h:1\nallow-cn = a",
                "--allow-cn, -ou, -dns and -uri need --client-ca",
            ),
            (
                "self-signed = x\nconnect = tcp:h:1\nalpn = --x,",
                "--alpn --x,: names are 1 to 255 printable ASCII bytes",
            ),
        ]:
            path = self.files.ini(f"[web]\n{text}\n")
            self.assertEqual(self.error("--config", path), f"{path} [web] {message}")

    def test_unknown_key(self) -> None:
        """A key that is no option is refused, in a section or in [DEFAULT]."""
        path = self.files.ini("[web]\nconect = tcp:h:1\n")
        self.assertEqual(
            self.error("--config", path), f"{path} [web] conect: unknown key"
        )
        path = self.files.ini("[DEFAULT]\nhelp = yes\n[web]\nconnect = tcp:h:1\n")
        self.assertEqual(
            self.error("--config", path), f"{path} [DEFAULT] help: unknown key"
        )

    def test_process_wide_keys(self) -> None:
        """--metrics, --max-connections-total and --config are not keys."""
        for key in ("metrics", "max-connections-total", "config"):
            path = self.files.ini(f"[DEFAULT]\n{key} = 1\n[web]\nconnect = tcp:h:1\n")
            self.assertEqual(
                self.error("--config", path),
                f"{path} [DEFAULT] {key}: process-wide: give --{key} instead",
            )
        path = self.files.ini("[web]\nmetrics = tcp:9100\n")
        self.assertIn("[web] metrics: process-wide", self.error("--config", path))

    def test_unreadable_files(self) -> None:
        """A file that cannot be read is one line naming --config and it."""
        missing = self.files.path("missing.conf")
        self.assertEqual(
            self.error("--config", missing),
            f"--config {missing}: No such file or directory",
        )
        directory = self.files.directory
        self.assertEqual(
            self.error("--config", directory), f"--config {directory}: Is a directory"
        )

    def test_not_ini(self) -> None:
        """A file that is not INI, or has no section, is one line too."""
        for text, reason in [
            ("connect = tcp:h:1\n", "File contains no section headers."),
            ("[web]\nnonsense\n", "Source contains parsing errors"),
            ("[web]\n[web]\n", "section 'web' already exists"),
            ("[web]\nlisten = a\nlisten = b\n", "option 'listen' in section 'web'"),
            ("[DEFAULT]\nconnect = tcp:h:1\n", "no service (a section such as"),
        ]:
            path = self.files.ini(text)
            message = self.error("--config", path)
            self.assertTrue(message.startswith(f"--config {path}: "), message)
            self.assertIn(reason, message)
        path = self.files.path("binary.conf")
        with open(path, "wb") as f:
            f.write(b"[web]\nconnect = \xff\n")
        self.assertIn("can't decode byte 0xff", self.error("--config", path))

    def test_section_names(self) -> None:
        """A service's name is letters, digits, '.', '_' and '-'."""
        path = self.files.ini("[web server]\nconnect = tcp:h:1\n")
        self.assertEqual(
            self.error("--config", path),
            f"{path} [web server]: a name of letters, digits, '.', '_', '-'",
        )

    def test_service_options_beside_config(self) -> None:
        """
        With --config, a service option on the command line (abbreviated
        or repeatable too) is refused; the process-wide ones are taken.
        """
        path = self.files.ini("[web]\nconnect = tcp:h:1\nself-signed = x\n")
        for args, name in [
            (["--listen", "tcp:1"], "listen"),
            (["--idle=5"], "idle-timeout"),
            (["--allow-cn", "a"], "allow-cn"),
        ]:
            self.assertEqual(
                self.error("--config", path, *args),
                f"--{name}: with --config, set it in {path}",
            )
        options = parse(
            "--config", path, "--metrics", "tcp:0", "--max-connections-total", "3"
        )
        self.assertEqual(options.total, 3)
        assert options.metrics is not None
        [web] = options.services
        self.assertEqual(web.observers[-1], options.metrics.observe)
        self.assertIsNone(web.metrics)

    def test_process_wide_values_checked(self) -> None:
        """--metrics and --max-connections-total are checked with --config."""
        path = self.files.ini("[web]\nconnect = tcp:h:1\nself-signed = x\n")
        self.assertEqual(
            self.error("--config", path, "--metrics", "bogus:1"),
            "--metrics bogus:1: Unknown endpoint type: 'bogus'",
        )
        self.assertEqual(
            self.error("--config", path, "--max-connections-total", "0"),
            "--max-connections-total 0: must be a positive whole number",
        )

    def test_getopt_errors_left_to_usage(self) -> None:
        """
        An option that does not exist is reported by usage.Options, as
        before; without arguments, parseOptions reads sys.argv.
        """
        with self.assertRaises(usage.UsageError) as caught:
            parse("--bogus")
        self.assertIn("bogus", str(caught.exception))
        self.patch(sys, "argv", ["tlsproxy", "--connect=tcp:h:1", "--self-signed=x"])
        options = tap.Options()
        options.parseOptions()
        self.assertEqual(options["connect"], "tcp:h:1")

    def test_connection_logs(self) -> None:
        """Each service has its own connection log."""
        path = self.files.ini(
            f"""
            [DEFAULT]
            connect = tcp:h:1
            self-signed = x
            [a]
            listen = tcp:1
            connection-log = {self.files.path("a.log")}
            [b]
            listen = tcp:2
            """
        )
        [a, b] = parse("--config", path).services
        [log] = [o for o in a.observers if isinstance(o, ConnectionLog)]
        log.close()
        self.assertEqual([o for o in b.observers if isinstance(o, ConnectionLog)], [])


class SampleTests(SynchronousTestCase):
    """etc/tlsproxy.conf.sample is valid, its commented example too."""

    def test_sample(self) -> None:
        """
        The sample, with test certificates for its paths and its second
        service uncommented, is the essay's service and the example's.
        """
        files = Files(self)
        cert, key = files.path("server.crt"), files.path("server.key")
        LEAF.cert_chain_pems[0].write_to_path(cert)
        LEAF.private_key_pem.write_to_path(key)
        with open(SAMPLE, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("tlsproxy --config /usr/local/etc/tlsproxy.conf\n", text)
        essay, example = text.split("for example:\n")
        essay += "\n"
        example = "".join(line[1:] + "\n" for line in example.splitlines())
        text = (
            (essay + example)
            .replace("/usr/local/etc/ssl/server.crt", cert)
            .replace("/usr/local/etc/ssl/server.key", key)
            .replace("/usr/local/etc/ssl/clients-ca.pem", files.ca)
        )
        [https, imaps] = parse("--config", files.ini(text)).services
        self.assertEqual(https.config.service, "https")
        self.assertEqual(https.config.listen, "tcp:443:interface=10.0.0.3")
        self.assertEqual(https.config.connect, "tcp:10.0.0.2:80:bindAddress=10.0.0.3")
        self.assertEqual(imaps.config.service, "imaps")
        self.assertEqual(imaps.config.allow.cn, frozenset({"alice", "bob"}))

    def test_man_page_example(self) -> None:
        """tlsproxy.conf(5)'s example file, with test files for its paths, is valid."""
        files = Files(self)
        cert, key = files.path("server.crt"), files.path("server.key")
        LEAF.cert_chain_pems[0].write_to_path(cert)
        LEAF.private_key_pem.write_to_path(key)
        page = os.path.join(TOP, "docs", "man", "tlsproxy.conf.rst")
        with open(page, encoding="utf-8") as f:
            text = f.read()
        section = text.split("\nDescription\n", 1)[1]
        block = section.split("::\n\n", 1)[1].split("\n\n" + "run as", 1)[0]
        text = (
            textwrap.dedent(block)
            .replace("/usr/local/etc/ssl/server.crt", cert)
            .replace("/usr/local/etc/ssl/server.key", key)
            .replace("/usr/local/etc/ssl/clients-ca.pem", files.ca)
            .replace("/var/log/", files.directory + "/")
        )
        services = parse("--config", files.ini(text)).services
        self.assertEqual([s.config.service for s in services], ["https", "imaps"])
        self.assertEqual(services[1].config.limits.total, 100)
        for service in services:
            [log] = [o for o in service.observers if isinstance(o, ConnectionLog)]
            log.close()


class FlagTests(SynchronousTestCase):
    """A flag is any of yes/no, true/false, on/off, 1/0."""

    def read(self, value: str) -> tap.Options:
        path = Files(self).ini(
            f"[web]\nconnect = tcp:h:1\nself-signed = x\nsni-strict = {value}\n"
        )
        [(_, options)] = config.read_services(
            path, tap._parse, tap.KINDS, tap.PROCESS_WIDE
        )
        return options

    def test_flags(self) -> None:
        """Each spelling of yes and no sets the flag or leaves it unset."""
        for value in ("yes", "True", "on", "1"):
            self.assertTrue(self.read(value)["sni-strict"], value)
        for value in ("no", "false", "OFF", "0"):
            self.assertFalse(self.read(value)["sni-strict"], value)

    def test_bad_flag(self) -> None:
        """Anything else is refused, naming the key and the value."""
        with self.assertRaises(tap.ConfigError) as caught:
            self.read("maybe")
        self.assertTrue(
            str(caught.exception).endswith(
                " [web] sni-strict: maybe: not yes/no, true/false, on/off or 1/0"
            )
        )


class ServiceTests(TestCase):
    """makeService runs every section, under one top service."""

    def setUp(self) -> None:
        self.patch(sys, "excepthook", sys.excepthook)
        self.files = Files(self)

    def test_services_listed(self) -> None:
        """
        The top service lists each service and its configuration in order
        (for SIGHUP), and metrics watch each one.
        """
        path = self.files.ini(
            """
            [DEFAULT]
            connect = tcp:127.0.0.1:1
            self-signed = x
            [a]
            listen = tcp:0:interface=127.0.0.1
            [b]
            listen = tcp:0:interface=127.0.0.2
            """
        )
        options = parse("--config", path, "--metrics", "tcp:0:interface=127.0.0.1")
        top = tap.makeService(options)
        names = [proxy.config.service for proxy in top.proxies]  # type: ignore[attr-defined]
        self.assertEqual(names, ["a", "b"])
        assert options.metrics is not None
        self.assertEqual(sorted(options.metrics._services), ["a", "b"])

    def test_fingerprint_names_service(self) -> None:
        """A self-signed certificate's log line names its service."""
        path = self.files.ini("[web]\nconnect = tcp:127.0.0.1:1\nself-signed = x\n")
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tap.makeService(parse("--config", path))
        [event] = [e for e in events if "fingerprint" in e]
        self.assertEqual(event["service"], "web")

    def test_port_in_use(self) -> None:
        """A port that cannot be bound names the file, section and endpoint."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        path = self.files.ini(
            f"""
            [DEFAULT]
            connect = tcp:127.0.0.1:1
            self-signed = x
            [a]
            listen = tcp:0:interface=127.0.0.1
            [b]
            listen = {listen}
            """
        )
        service = tap.makeService(parse("--config", path))
        self.addCleanup(service.stopService)
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        message = str(caught.exception)
        self.assertTrue(
            message.startswith(f"tlsproxy: {path} [b] listen: {listen}: "), message
        )

    def test_metrics_port_in_use(self) -> None:
        """A metrics port that cannot be bound is named as --metrics."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        options = parse(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            "tcp:127.0.0.1:1",
            "--self-signed",
            "x",
            "--metrics",
            metrics,
        )
        service = tap.makeService(options)
        self.addCleanup(service.stopService)
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertTrue(
            str(caught.exception).startswith(f"tlsproxy: --metrics {metrics}: ")
        )
