"""
A real Apache behind the real C{twistd tlsproxy}, with real curl clients
from several loopback source addresses: the access log joined with the
connection log names each request's true source, and with the PROXY
protocol Apache's C{%a} does by itself.

Each test writes its own minimal C{apache2.conf} (no part of the
distribution's configuration), runs C{apache2 -DFOREGROUND} on a free
127.0.0.1 port and stops it with SIGTERM when it ends.  The tests skip when
Apache is not installed; CI installs it (C{.ci/run}).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .harness import (
    HOST,
    TIMEOUT,
    Certificates,
    TwistdProxy,
    bound_socket,
    client_context,
    curl_ok,
    make_certificates,
    port_of,
    read_http_head,
    start_proxy,
    temp_dir,
    wait_until,
)

MODULES = Path("/usr/lib/apache2/modules")
"""Where Debian's apache2 package puts the loadable modules."""

SOURCES = [f"127.0.0.{n}" for n in range(2, 6)]
"""The loopback addresses the clients connect from (127.0.0.0/8 is local)."""

BODY = b"hello from Apache\n"
"""The content of C{/hello.txt} on every test Apache."""

JOIN_FORMAT = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i" %{remote}p'
"""The LogFormat tlsproxy-logjoin reads by default: Combined, then the port."""

REMOTEIP_FORMAT = '%a %{c}a %{remote}p "%r" %>s'
"""
With C{RemoteIPProxyProtocol On}: the client the PROXY header names and its
port, and between them the peer of the TCP connection (the proxy).
"""

SNIPPET = Path(__file__).resolve().parent.parent / "etc" / "apache-remoteip.conf"
"""The Apache configuration snippet the project ships for --proxy-protocol."""

_STARTED = "AH00489"
"""The code of Apache's "resuming normal operations": its ports are bound."""


# --- Apache -----------------------------------------------------------------


def _apache_binary() -> str:
    """
    Return the path of C{apache2}, or skip the test if it is not installed.
    """
    found = shutil.which("apache2") or shutil.which("apache2", path="/usr/sbin")
    if found is None:
        raise unittest.SkipTest("apache2 is not installed (apt-get install apache2)")
    for module in ("mod_mpm_event.so", "mod_authz_core.so", "mod_remoteip.so"):
        if not (MODULES / module).exists():
            raise unittest.SkipTest(f"Apache module {MODULES / module} is missing")
    return found


def _apache_version(binary: str) -> tuple[int, ...]:
    """
    Return the version of the Apache at C{binary}, from C{apache2 -v}.
    """
    result = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    found = re.search(r"Apache/(\d+)\.(\d+)\.(\d+)", result.stdout)
    if found is None:
        raise AssertionError(f"no version in apache2 -v: {result.stdout!r}")
    return tuple(int(part) for part in found.groups())


def _require_sources() -> None:
    """
    Skip the test unless the client addresses in L{SOURCES} can be bound.
    """
    for source in SOURCES:
        with socket.socket() as sock:
            try:
                sock.bind((source, 0))
            except OSError as e:
                raise unittest.SkipTest(f"cannot bind {source}: {e}") from None


def _document_root(case: unittest.TestCase) -> Path:
    """
    Return a new directory holding C{hello.txt} that Apache's unprivileged
    workers can read whatever the path of the checkout (it is in the system's
    temporary directory); C{case} removes it when it ends.
    """
    path = Path(tempfile.mkdtemp(prefix="tlsproxy-apache-"))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    path.chmod(0o755)
    (path / "hello.txt").write_bytes(BODY)
    (path / "hello.txt").chmod(0o644)
    return path


def _quoted(text: str) -> str:
    """
    Return C{text} as a double-quoted Apache configuration argument.
    """
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def apache_config(
    directory: Path, documents: Path, port: int, log_format: str, proxy_protocol: bool
) -> str:
    """
    Return a minimal C{apache2.conf}: everything it writes goes in
    C{directory}, it serves C{documents} on 127.0.0.1:C{port} and logs each
    request in C{access.log} with C{log_format}; with C{proxy_protocol}, every
    connection must begin with a PROXY header (mod_remoteip).
    """
    lines = [
        f"ServerRoot {directory}",
        f"DefaultRuntimeDir {directory}",
        f"PidFile {directory / 'apache2.pid'}",
        "ServerName localhost",
        f"Listen {HOST}:{port}",
        f"LoadModule mpm_event_module {MODULES / 'mod_mpm_event.so'}",
        f"LoadModule authz_core_module {MODULES / 'mod_authz_core.so'}",
        f"LoadModule remoteip_module {MODULES / 'mod_remoteip.so'}",
        # Debian builds these two in; other builds load them.
        "<IfModule !log_config_module>",
        f"    LoadModule log_config_module {MODULES / 'mod_log_config.so'}",
        "</IfModule>",
        "<IfModule !unixd_module>",
        f"    LoadModule unixd_module {MODULES / 'mod_unixd.so'}",
        "</IfModule>",
        "StartServers 1",
        f"ErrorLog {directory / 'error.log'}",
        "LogLevel notice",
        f"DocumentRoot {documents}",
        f"<Directory {documents}>",
        "    Require all granted",
        "</Directory>",
        f"LogFormat {_quoted(log_format)} test",
        f"CustomLog {directory / 'access.log'} test",
    ]
    if os.geteuid() == 0:
        # As root, Apache's workers need a user; nobody's group has no name
        # that every distribution shares.
        nobody = pwd.getpwnam("nobody")
        lines += ["User nobody", f"Group #{nobody.pw_gid}"]
    if proxy_protocol:
        lines.append("RemoteIPProxyProtocol On")
    return "\n".join(lines) + "\n"


class Apache:
    """
    A running C{apache2 -DFOREGROUND}, its own process group.

    @ivar port: the port it listens on (127.0.0.1).
    @ivar config: the text of its configuration file.
    @ivar access_log: the file it logs requests in.
    """

    def __init__(self, binary: str, directory: Path, config: str, port: int) -> None:
        """
        Start Apache with C{config}; wait until it has bound its port.
        """
        self.port = port
        self.config = config
        self._directory = directory
        self.access_log = directory / "access.log"
        self._error_log = directory / "error.log"
        config_file = directory / "apache2.conf"
        config_file.write_text(config)
        with (directory / "apache2.out").open("wb") as output:
            self._process = subprocess.Popen(
                [binary, "-f", str(config_file), "-DFOREGROUND"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._started, f"Apache to listen on port {port}")
        except BaseException:
            self.stop()
            raise

    def _started(self) -> bool:
        if self._process.poll() is not None:
            raise AssertionError(
                f"apache2 exited {self._process.returncode}:\n{self.diagnostics()}"
            )
        return _STARTED in self.error_log()

    def error_log(self) -> str:
        """
        Return Apache's error log so far.
        """
        return _read(self._error_log)

    def diagnostics(self) -> str:
        """
        Return Apache's configuration, output and error log, for a failure.
        """
        output = _read(self._directory / "apache2.out")
        return f"config:\n{self.config}output:\n{output}error log:\n{self.error_log()}"

    def access_lines(self, count: int) -> list[str]:
        """
        Wait until the access log has C{count} whole lines; return them,
        failing if there are more.
        """
        wait_until(
            lambda: _read(self.access_log).count("\n") >= count,
            f"{count} access log line(s)",
        )
        lines = _read(self.access_log).splitlines()
        if len(lines) != count:
            raise AssertionError(f"{len(lines)} access log lines, not {count}")
        return lines

    def stop(self) -> None:
        """
        Send SIGTERM and wait for the exit; kill the whole group if it hangs.
        """
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(TIMEOUT)
            raise AssertionError("apache2 ignored SIGTERM") from None


def start_apache(
    case: unittest.TestCase, log_format: str, proxy_protocol: bool = False
) -> Apache:
    """
    Start an L{Apache} serving C{/hello.txt} with C{log_format} on a free
    port; C{case} stops it when it ends.
    """
    binary = _apache_binary()
    if proxy_protocol and _apache_version(binary) < (2, 4, 31):
        raise unittest.SkipTest("RemoteIPProxyProtocol needs Apache 2.4.31 or later")
    directory = temp_dir(case)
    documents = _document_root(case)
    # Apache cannot take a bound socket: find a free port, then let it bind.
    with bound_socket() as probe:
        port = port_of(probe)
    config = apache_config(directory, documents, port, log_format, proxy_protocol)
    apache = Apache(binary, directory, config, port)
    case.addCleanup(apache.stop)
    return apache


# --- the proxy and its clients ------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _proxy(
    case: unittest.TestCase, apache: Apache, certificates: Certificates, *args: str
) -> TwistdProxy:
    """
    Start tlsproxy (extra options C{args}) in front of C{apache}.
    """
    return start_proxy(
        case,
        "--connect",
        f"tcp:{HOST}:{apache.port}",
        "--cert",
        str(certificates.cert),
        "--key",
        str(certificates.key),
        *args,
    )


def _curl_from(
    source: str,
    proxy: TwistdProxy,
    certificates: Certificates,
    paths: list[str],
    *options: str,
) -> bytes:
    """
    Fetch C{paths} from the proxy with one curl (and C{options}) from
    C{source}, over one connection kept alive for all of them; return what
    curl wrote.
    """
    return curl_ok(
        "--interface",
        source,
        "--cacert",
        str(certificates.ca),
        # localhost, for SNI and the certificate, but never ::1.
        "--resolve",
        f"localhost:{proxy.port}:{HOST}",
        *options,
        *(f"https://localhost:{proxy.port}{path}" for path in paths),
    )


def _request_query(line: str) -> dict[str, str]:
    """
    Return the query parameters of the request line (C{"%r"}) in C{line}.
    """
    found = re.search(r'"GET (\S+) HTTP/1\.1"', line)
    if found is None:
        raise AssertionError(f"no request line in {line!r}")
    query = parse_qs(urlsplit(found.group(1)).query)
    return {name: values[0] for name, values in query.items()}


def _records(path: Path, closes: int) -> list[dict[str, Any]]:
    """
    Wait until the connection log at C{path} has C{closes} close records;
    return all its records.
    """

    def records() -> list[dict[str, Any]]:
        text = _read(path)
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    wait_until(
        lambda: sum(r["event"] == "close" for r in records()) >= closes,
        f"{closes} close record(s) in {path.name}",
    )
    return records()


# --- the tests ------------------------------------------------------------------


class LogJoinTests(unittest.TestCase):
    """
    Without the PROXY protocol Apache logs the proxy as the client;
    tlsproxy-logjoin rebuilds the log with the true sources.
    """

    def test_join(self) -> None:
        """
        Requests from four source addresses, several on kept-alive
        connections, come out of tlsproxy-logjoin as Apache's Combined log
        lines with each one's true source and without the port, all matched.
        """
        _require_sources()
        apache = start_apache(self, JOIN_FORMAT)
        directory = temp_dir(self)
        certificates = make_certificates(directory)
        connection_log = directory / "connections.log"
        proxy = _proxy(
            self, apache, certificates, "--connection-log", str(connection_log)
        )
        expected = set()
        for n, source in enumerate(SOURCES, 2):
            keep_alive = [f"/hello.txt?from={n}&i={i}" for i in range(3)]
            self.assertEqual(
                _curl_from(source, proxy, certificates, keep_alive), BODY * 3
            )
            alone = f"/hello.txt?from={n}&i=3"
            self.assertEqual(_curl_from(source, proxy, certificates, [alone]), BODY)
            expected |= {(source, str(i)) for i in range(4)}
        records = _records(connection_log, 2 * len(SOURCES))
        closes = [r for r in records if r["event"] == "close"]
        access = apache.access_lines(len(expected))
        self.assertEqual(sorted(r["client_host"] for r in closes), sorted(SOURCES * 2))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tlsproxy.logjoin",
                connection_log,
                apache.access_log,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        joined = result.stdout.splitlines()
        self.assertEqual(len(joined), len(access), result.stdout)
        seen = set()
        for line, out in zip(access, joined, strict=True):
            host, rest = line.split(" ", 1)
            combined, port = rest.rsplit(" ", 1)
            # What Apache saw: the proxy, from one of the recorded ports.
            self.assertEqual(host, HOST)
            self.assertIn(int(port), {r["backend_local_port"] for r in closes})
            query = _request_query(line)
            source = f"127.0.0.{query['from']}"
            self.assertEqual(out, f"{source} {combined}")
            seen.add((source, query["i"]))
        self.assertEqual(seen, expected)
        self.assertIn(
            f"matched {len(expected)}, unmatched 0, unparsable 0", result.stderr
        )


class RemoteIPTests(unittest.TestCase):
    """
    With --proxy-protocol, Apache's mod_remoteip (C{RemoteIPProxyProtocol On})
    logs the true source as C{%a}.
    """

    def check_sources(self, version: str) -> None:
        """
        Fetch a page through a proxy sending PROXY headers of C{version} from
        each address of L{SOURCES}; check that Apache logged each one as
        C{%a} with curl's own port, and the proxy as the TCP peer.
        """
        _require_sources()
        apache = start_apache(self, REMOTEIP_FORMAT, proxy_protocol=True)
        certificates = make_certificates(temp_dir(self))
        proxy = _proxy(self, apache, certificates, "--proxy-protocol", version)
        ports = {}
        for n, source in enumerate(SOURCES, 2):
            written = _curl_from(
                source,
                proxy,
                certificates,
                [f"/hello.txt?from={n}"],
                "--write-out",
                "\\n%{local_ip} %{local_port}",
            )
            body, _, local = written.rpartition(b"\n")
            self.assertEqual(body, BODY)
            local_ip, ports[source] = local.decode().split(" ")
            self.assertEqual(local_ip, source)
        lines = apache.access_lines(len(SOURCES))
        logged = [line.split(" ") for line in lines]
        self.assertEqual(
            [(a, c, p) for a, c, p, *_ in logged],
            [(source, HOST, ports[source]) for source in SOURCES],
            apache.diagnostics(),
        )
        for line, source in zip(lines, SOURCES, strict=True):
            self.assertEqual(_request_query(line)["from"], source.rsplit(".")[-1])
            self.assertTrue(line.endswith(" 200"), line)

    def test_v1(self) -> None:
        """
        With --proxy-protocol v1, Apache logs each request's true source
        address and port, whatever the source.
        """
        self.check_sources("v1")

    def test_v2(self) -> None:
        """
        With --proxy-protocol v2 (TLVs included), Apache logs each request's
        true source address and port, whatever the source.
        """
        self.check_sources("v2")


class FrontBalancerTests(unittest.TestCase):
    """
    Behind a front balancer (--listen haproxy:...), the client its PROXY
    header names goes on to Apache and into the connection log.
    """

    def setUp(self) -> None:
        self.apache = start_apache(self, REMOTEIP_FORMAT, proxy_protocol=True)
        directory = temp_dir(self)
        self.certificates = make_certificates(directory)
        self.connection_log = directory / "connections.log"
        self.proxy = _proxy(
            self,
            self.apache,
            self.certificates,
            "--listen",
            f"haproxy:tcp:0:interface={HOST}",
            "--proxy-protocol",
            "v2",
            "--connection-log",
            str(self.connection_log),
        )

    def connect(self, header: bytes) -> ssl.SSLSocket:
        """
        Connect to the proxy, send C{header}, then do a TLS handshake for
        localhost that verifies the certificate.
        """
        sock = socket.create_connection((HOST, self.proxy.port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(header)
        return client_context(self.certificates.ca).wrap_socket(
            sock, server_hostname="localhost", suppress_ragged_eofs=False
        )

    def test_client_from_header(self) -> None:
        """
        The client named by the balancer's PROXY header is Apache's C{%a} and
        the record's client, and the balancer is the record's balancer.
        """
        tls = self.connect(b"PROXY TCP4 203.0.113.9 127.0.0.1 4711 443\r\n")
        self.addCleanup(tls.close)
        balancer_port = tls.getsockname()[1]
        tls.sendall(
            b"GET /hello.txt?from=balancer HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n"
        )
        status, headers, _ = read_http_head(tls)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], str(len(BODY)))
        tls.close()

        [line] = self.apache.access_lines(1)
        self.assertEqual(
            line,
            f'203.0.113.9 {HOST} 4711 "GET /hello.txt?from=balancer HTTP/1.1" 200',
        )
        records = _records(self.connection_log, 1)
        [close] = [r for r in records if r["event"] == "close"]
        self.assertEqual(
            (
                close["client_host"],
                close["client_port"],
                close["balancer_host"],
                close["balancer_port"],
            ),
            ("203.0.113.9", 4711, HOST, balancer_port),
        )

    def test_no_header(self) -> None:
        """
        A connection that starts TLS without a PROXY header is closed before
        it reaches Apache, and its one record says why.
        """
        with self.assertRaises(OSError):
            self.connect(b"")
        [record] = _records(self.connection_log, 1)
        self.assertEqual(
            (record["event"], record["reason"], record["backend_local_port"]),
            ("close", "no valid PROXY header", None),
        )
        self.assertEqual(self.apache.access_lines(0), [])


class SnippetTests(unittest.TestCase):
    """etc/apache-remoteip.conf is configuration Apache accepts."""

    def test_syntax(self) -> None:
        """
        Included in a minimal configuration, the snippet (with its example
        exceptions line uncommented) passes C{apache2 -t}.
        """
        binary = _apache_binary()
        directory = temp_dir(self)
        snippet = SNIPPET.read_text()
        example = "# RemoteIPProxyProtocolExceptions "
        self.assertIn(example, snippet)
        included = directory / "snippet.conf"
        included.write_text(snippet.replace(example, example.lstrip("# ")))
        config = directory / "apache2.conf"
        with bound_socket() as probe:
            port = port_of(probe)
        config.write_text(
            apache_config(directory, directory, port, JOIN_FORMAT, False)
            + f"Define APACHE_LOG_DIR {directory}\nInclude {included}\n"
        )
        result = subprocess.run(
            [binary, "-t", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        self.assertEqual(
            (result.returncode, result.stderr.strip()), (0, "Syntax OK"), result
        )
