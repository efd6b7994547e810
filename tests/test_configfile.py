"""
Integration tests of C{twistd -n tlsproxy --config FILE}: several services
in one real process, on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import textwrap
from pathlib import Path
from unittest import TestCase

from tests.harness import (
    HELLO,
    HOST,
    HttpReply,
    TwistdProxy,
    curl_ok,
    run_s_client,
    run_startup_error,
    start_http_backend,
    start_raw_backend,
    temp_dir,
    wait_until,
)
from tests.test_operations import assert_closed_at_once, fetch, tls_from
from tests.test_twistd import certificates


def start_services(
    case: TestCase, directory: Path, text: str, *args: str
) -> tuple[TwistdProxy, dict[str, int]]:
    """
    Start twistd with C{text} (dedented) as its --config file and C{args};
    return it and the port of each service, by name.
    """
    path = directory / "tlsproxy.conf"
    path.write_text(textwrap.dedent(text))
    proxy = TwistdProxy(directory, ["--config", str(path), *args])
    case.addCleanup(proxy.stop)
    count = text.count("\n[") - text.count("\n[DEFAULT]")
    found = proxy.wait_for_log(r"(\S+) \(TLS\) starting on (\d+)", count)
    return proxy, {m.group(1): int(m.group(2)) for m in found}


class ServicesTests(TestCase):
    """Each section of the file is a service of its own."""

    def test_two_services(self) -> None:
        """
        Two services on two ports relay to their own backends (curl through
        one, openssl s_client through the other), and each connection
        record names its service; SIGTERM stops both, exit status 0.
        """
        directory = temp_dir(self)
        certs = certificates(self)
        web = start_http_backend(self)
        raw = start_raw_backend(self, HttpReply(b"from the raw backend\n"))
        log = directory / "connections.log"
        proxy, ports = start_services(
            self,
            directory,
            f"""
            [DEFAULT]
            listen = tcp:0:interface={HOST}
            cert = {certs.cert}
            key = {certs.key}
            connection-log = {log}

            [web]
            connect = tcp:{HOST}:{web.port}

            [raw]
            connect = tcp:{HOST}:{raw.port}
            """,
        )
        self.assertEqual(sorted(ports), ["raw", "web"])
        body = curl_ok(
            "--cacert",
            str(certs.ca),
            "--resolve",
            f"localhost:{ports['web']}:{HOST}",
            f"https://localhost:{ports['web']}/",
        )
        self.assertEqual(body, HELLO)
        result = run_s_client(
            ports["raw"],
            "-CAfile",
            str(certs.ca),
            "-verify_return_error",
            "-ign_eof",
            stdin=b"GET / HTTP/1.0\r\n\r\n",
        )
        self.assertIn(b"from the raw backend", result.stdout, result.stderr)
        proxy.wait_for_closes(2)
        closes = {}
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "close":
                closes[record["service"]] = record["listen_port"]
        self.assertEqual(closes, ports)
        self.assertEqual(len(raw.connections()), 1)
        self.assertEqual(len(web.peers()), 1)
        text = proxy.log_text()
        self.assertIn("[web] ", text)
        self.assertIn("[raw] ", text)
        proxy.terminate()
        self.assertEqual(proxy.wait_for_exit(), 0)

    def test_total_limit(self) -> None:
        """
        --max-connections-total caps the connections of all services
        together, while a service's own --max-connections still applies.
        """
        backend = start_http_backend(self)
        proxy, ports = start_services(
            self,
            temp_dir(self),
            f"""
            [DEFAULT]
            listen = tcp:0:interface={HOST}
            connect = tcp:{HOST}:{backend.port}
            self-signed = localhost

            [a]
            max-connections = 1

            [b]
            """,
            "--max-connections-total",
            "3",
        )
        held: list[ssl.SSLSocket] = []

        def hold(port: int) -> None:
            sock = tls_from(port, HOST)
            self.addCleanup(sock.close)
            self.assertEqual(fetch(sock), HELLO)
            held.append(sock)

        hold(ports["a"])
        assert_closed_at_once(self, ports["a"])  # a's own limit
        hold(ports["b"])
        hold(ports["b"])
        assert_closed_at_once(self, ports["b"])  # the total
        held[0].close()
        wait_until(lambda: len(proxy.close_lines()) == 1, "the first to close")
        hold(ports["b"])

    def test_sigterm_drains_all(self) -> None:
        """
        SIGTERM drains every service: a live connection on each is aborted
        when its --drain-timeout runs out, recorded, and the exit is 0.
        """
        directory = temp_dir(self)
        backend = start_http_backend(self)
        log = directory / "connections.log"
        proxy, ports = start_services(
            self,
            directory,
            f"""
            [DEFAULT]
            listen = tcp:0:interface={HOST}
            connect = tcp:{HOST}:{backend.port}
            self-signed = localhost
            connection-log = {log}
            drain-timeout = 1
            [a]
            [b]
            """,
        )
        for port in ports.values():
            sock = tls_from(port, HOST)
            self.addCleanup(sock.close)
            self.assertEqual(fetch(sock), HELLO)
        proxy.terminate()
        self.assertEqual(proxy.wait_for_exit(), 0)
        reasons = {
            record["service"]: record["reason"]
            for record in map(json.loads, log.read_text().splitlines())
            if record["event"] == "close"
        }
        self.assertEqual(reasons, {"a": "drain timeout", "b": "drain timeout"})

    def test_sighup_reloads_each(self) -> None:
        """
        SIGHUP reloads every service: one whose file is now bad keeps its
        certificate, with one line naming it; the other takes its new one.
        """
        directory = temp_dir(self)
        backend = start_http_backend(self)
        good, bad = certificates(self), certificates(self)
        proxy, ports = start_services(
            self,
            directory,
            f"""
            [DEFAULT]
            listen = tcp:0:interface={HOST}
            connect = tcp:{HOST}:{backend.port}
            [good]
            cert = {good.cert}
            key = {good.key}
            [bad]
            cert = {bad.cert}
            key = {bad.key}
            """,
        )
        served = {name: served_der(port) for name, port in ports.items()}
        fresh = certificates(self)
        good.cert.write_bytes(fresh.cert.read_bytes())
        good.key.write_bytes(fresh.key.read_bytes())
        bad.key.write_bytes(b"junk")
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log("good: certificates reloaded")
        proxy.wait_for_log(
            rf"bad: reload failed, the old certificates stay: --key {bad.key}: "
        )
        self.assertNotEqual(served_der(ports["good"]), served["good"])
        self.assertEqual(served_der(ports["bad"]), served["bad"])


def served_der(port: int) -> bytes:
    """The certificate a client is served on C{port}, in DER."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(
        socket.create_connection((HOST, port)), server_hostname="localhost"
    ) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


class ConfigErrorTests(TestCase):
    """A bad file ends start-up with one line naming file, section and key."""

    def test_missing_cert(self) -> None:
        """
        A section whose cert file is missing: the last line names the
        file, the section, the key and the value; exit status 1.
        """
        directory = temp_dir(self)
        path = directory / "tlsproxy.conf"
        missing = directory / "missing.pem"
        path.write_text(
            f"[ok]\nconnect = tcp:{HOST}:1\nself-signed = x\n"
            f"[web]\nconnect = tcp:{HOST}:1\ncert = {missing}\n"
        )
        failure = run_startup_error(self, ["--config", str(path)])
        self.assertEqual(failure.exit_code, 1, failure.output)
        self.assertNotIn("Traceback", failure.output)
        self.assertTrue(
            failure.last_line.endswith(
                f": {path} [web] --cert {missing}: No such file or directory"
            ),
            failure.output,
        )

    def test_port_in_use(self) -> None:
        """
        Two services on one port: the second cannot bind, and start-up ends
        with a line naming it and the endpoint.
        """
        directory = temp_dir(self)
        taken = directory / "tlsproxy.conf"
        probe = start_raw_backend(self, HttpReply())
        listen = f"tcp:{probe.port}:interface={HOST}"
        taken.write_text(
            f"[DEFAULT]\nconnect = tcp:{HOST}:1\nself-signed = x\n"
            f"[a]\nlisten = tcp:0:interface={HOST}\n[b]\nlisten = {listen}\n"
        )
        failure = run_startup_error(self, ["--config", str(taken)])
        self.assertNotEqual(failure.exit_code, 0, failure.output)
        self.assertNotIn("Traceback", failure.output + failure.log)
        expected = f"tlsproxy: {taken} [b] listen: {listen}: "
        lines = [failure.last_line, *failure.log.splitlines()]
        self.assertTrue(
            any(expected in line for line in lines), failure.output + failure.log
        )
