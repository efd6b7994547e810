"""
Integration tests of SNI, reload and session resumption: the real twistd,
real C{openssl s_client} and Python TLS clients, on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
from pathlib import Path

import trustme
from twisted.trial.unittest import TestCase

from .harness import (
    HOST,
    TIMEOUT,
    TwistdProxy,
    _tool,
    client_context,
    curl_ok,
    start_http_backend,
    start_proxy,
    temp_dir,
    tls_connect,
)

REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def write_leaf(path: Path, leaf: trustme.LeafCert) -> None:
    """C{leaf}'s certificate, chain and key, in one PEM file."""
    path.write_bytes(
        b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        + leaf.private_key_pem.bytes()
    )


def s_client(
    port: int, *args: str, name: str | None = "localhost", request: bool = True
) -> str:
    """
    C{openssl s_client} against 127.0.0.1:C{port}, sending the SNI C{name}
    (none if C{None}) and (if C{request}) one HTTP request, reading to the
    end; its output.
    """
    command = [_tool("openssl"), "s_client", "-connect", f"{HOST}:{port}"]
    command += ["-noservername"] if name is None else ["-servername", name]
    command += ["-ign_eof", *args] if request else [*args]
    result = subprocess.run(
        command,
        input=REQUEST if request else b"",
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    return (result.stdout + result.stderr).decode(errors="replace")


def fingerprint(port: int, ca: Path) -> str:
    """The SHA-256 of the certificate served to a client for localhost."""
    with tls_connect(port, client_context(ca)) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


class SNITests(TestCase):
    """The certificate is chosen by the SNI name; --sni-strict refuses others."""

    def setUp(self) -> None:
        self.dir = temp_dir(self)
        ca = trustme.CA()
        self.ca = self.dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        certs = self.dir / "certs"
        certs.mkdir()
        write_leaf(certs / "00-default.pem", ca.issue_cert("localhost"))
        write_leaf(certs / "b.pem", ca.issue_cert("b.test"))
        write_leaf(self.dir / "wild.pem", ca.issue_cert("*.w.test"))
        self.backend = start_http_backend(self)
        self.args = [
            "--connect", f"tcp:{HOST}:{self.backend.port}",
            "--cert", str(certs), "--cert", str(self.dir / "wild.pem"),
            "--connection-log", str(self.dir / "connections.log"),
        ]  # fmt: skip

    def verified(self, port: int, name: str | None, expect: str) -> str:
        """s_client's output for C{name}, verifying the certificate for C{expect}."""
        return s_client(
            port,
            "-CAfile", str(self.ca), "-verify_return_error",
            "-verify_hostname", expect,
            name=name,
        )  # fmt: skip

    def test_choice(self) -> None:
        """Each name gets its certificate, verified; others get the default."""
        proxy = start_proxy(self, *self.args)
        for name, expect in [
            ("localhost", "localhost"),
            ("b.test", "b.test"),
            ("x.w.test", "x.w.test"),
            ("unknown.test", "localhost"),
            (None, "localhost"),
        ]:
            output = self.verified(proxy.port, name, expect)
            self.assertIn("Verify return code: 0 (ok)", output, name)
            self.assertIn(" 200 OK", output, name)
        self.assertEqual(len(proxy.wait_for_closes(5)), 5)
        # curl sends SNI too, with ALPN on.
        body = curl_ok(
            "--cacert", str(self.ca),
            "--resolve", f"b.test:{proxy.port}:{HOST}",
            f"https://b.test:{proxy.port}/",
        )  # fmt: skip
        self.assertTrue(body)

    def test_strict(self) -> None:
        """--sni-strict: an unknown name gets unrecognized_name, logged."""
        proxy = start_proxy(self, *self.args, "--sni-strict")
        output = self.verified(proxy.port, "unknown.test", "unknown.test")
        self.assertIn("unrecognized name", output)
        self.assertNotIn(" 200 OK", output)
        [line] = proxy.wait_for_closes(1)
        self.assertIn("unknown server name (--sni-strict)", line)
        for name, expect in [("b.test", "b.test"), (None, "localhost")]:
            self.assertIn(" 200 OK", self.verified(proxy.port, name, expect))
        log = (self.dir / "connections.log").read_text()
        self.assertIn('"sni":"unknown.test"', log)
        self.assertNotIn("Traceback", proxy.log_text() + proxy.output_text())


class ReloadTests(TestCase):
    """SIGHUP reads the files again; a bad file keeps the old certificate."""

    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.authority = trustme.CA()
        self.ca = self.dir / "ca.pem"
        self.authority.cert_pem.write_to_path(str(self.ca))
        self.cert = self.dir / "server.pem"
        write_leaf(self.cert, self.authority.issue_cert("localhost"))
        self.backend = start_http_backend(self)
        self.proxy = start_proxy(
            self,
            "--connect", f"tcp:{HOST}:{self.backend.port}",
            "--cert", str(self.cert),
        )  # fmt: skip

    def reload(self, proxy: TwistdProxy, line: str, count: int) -> None:
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log(line, count)

    def test_reload(self) -> None:
        """
        New connections get the new certificate; a live connection goes on;
        a missing or bad file keeps the old one, and the process lives.
        """
        proxy = self.proxy
        first = fingerprint(proxy.port, self.ca)
        live = tls_connect(proxy.port, client_context(self.ca))
        self.addCleanup(live.close)
        write_leaf(self.cert, self.authority.issue_cert("localhost"))
        self.reload(proxy, "tlsproxy: certificates reloaded", 1)
        second = fingerprint(proxy.port, self.ca)
        self.assertNotEqual(second, first)
        live.sendall(REQUEST)
        self.assertTrue(live.recv(100).startswith(b"HTTP/1.1 200"))
        self.cert.write_bytes(b"junk")
        self.reload(proxy, "tlsproxy: reload failed, the old certificates stay", 1)
        self.cert.unlink()
        self.reload(proxy, "reload failed.*No such file or directory", 1)
        self.assertEqual(fingerprint(proxy.port, self.ca), second)
        self.assertTrue(proxy.running())
        lines = proxy.log_text().splitlines()
        said = [line for line in lines if re.search("reloaded|reload failed", line)]
        self.assertEqual(len(said), 3, lines)

    def test_resumption(self) -> None:
        """
        TLS 1.3 sessions resume (s_client -sess_in); after a reload fresh
        sessions do.  (TLS 1.2 sessions never resume: see docs/guide/certificates.rst.)
        """
        port = self.proxy.port
        session = str(self.dir / "session.pem")
        new = s_client(port, "-tls1_3", "-sess_out", session)
        self.assertIn("New, TLSv1.", new)
        reused = s_client(port, "-tls1_3", "-sess_in", session)
        self.assertIn("Reused, TLSv1.", reused)
        self.assertIn(" 200 OK", reused)
        self.reload(self.proxy, "certificates reloaded", 1)
        self.assertIn("New, TLSv1.", s_client(port, "-tls1_3", "-sess_in", session))
        s_client(port, "-tls1_3", "-sess_out", session)
        reused = s_client(port, "-tls1_3", "-sess_in", session)
        self.assertIn("Reused, TLSv1.", reused)
