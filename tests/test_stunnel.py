"""
Unit tests of tlsproxy-stunnel2conf: a stunnel.conf made a --config file
and twistd options.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import stunnel, tap

from .memory import LEAF

SEED = """\
; the seed essay's stunnel.conf
chroot = /var/run/stunnel
pid = /stunnel.pid
setgid = stunnel
setuid = stunnel
output = /var/log/stunnel.log
syslog = no
accept = 10.0.0.3:443
connect = 10.0.0.2:80
local = 10.0.0.3
cert = /usr/local/etc/ssl/server.crt
key = /usr/local/etc/ssl/server.key
"""


class Stunnel2ConfTests(SynchronousTestCase):
    """Each stunnel line becomes a key, a twistd option, or a comment."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def run_on(self, text: str | bytes) -> tuple[int, str]:
        """Run the command on C{text} as a file; its status and output."""
        path = os.path.join(self.directory, "stunnel.conf")
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        out: list[str] = []
        return stunnel.main([path], out.append), "".join(out)

    def test_seed(self) -> None:
        """
        The seed's stunnel.conf is one service, a valid --config file, and
        twistd's jail, user, pid file and log options.
        """
        status, out = self.run_on(SEED)
        self.assertEqual(status, 0)
        self.assertIn(
            "#   twistd --chroot /var/run/stunnel --pidfile /stunnel.pid --gid"
            " stunnel --uid stunnel --logfile /var/log/stunnel.log tlsproxy"
            " --config tlsproxy.conf\n",
            out,
        )
        cert = os.path.join(self.directory, "server.crt")
        key = os.path.join(self.directory, "server.key")
        LEAF.cert_chain_pems[0].write_to_path(cert)
        LEAF.private_key_pem.write_to_path(key)
        path = os.path.join(self.directory, "tlsproxy.conf")
        with open(path, "w") as f:
            f.write(
                out.replace("/usr/local/etc/ssl/server.crt", cert).replace(
                    "/usr/local/etc/ssl/server.key", key
                )
            )
        options = tap.Options()
        options.parseOptions(["--config", path])
        [service] = options.services
        config = service.config
        self.assertEqual(config.service, "tlsproxy")
        self.assertEqual(config.listen, "tcp:443:interface=10.0.0.3")
        self.assertEqual(config.connect, "tcp:10.0.0.2:80:bindAddress=10.0.0.3")

    def test_services(self) -> None:
        """
        Sections are services, global service options go in [DEFAULT], and
        what has no equivalent is a comment saying so.
        """
        status, out = self.run_on(
            "syslog = yes\nforeground = yes\ndebug = 7\nlocal = 10.0.0.3\n"
            "sslVersionMin = TLSv1.3\nTIMEOUTidle = 60\n"
            "[web]\naccept = :::443\nconnect = /run/web.sock\n"
            "protocol = proxy\ndebug = daemon.warning\n"
            "[imap]\naccept = 993\nconnect = 143\nCAfile = ca.pem\n"
            "checkHost = a.example\nverifyChain = yes\nsslVersionMin = TLSv1\n"
            "debug = 4\n[pop]\ndebug = chatty\n"
        )
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertIn("twistd --syslog --prefix tlsproxy -n tlsproxy", lines[1])
        self.assertIn("# stunnel: debug = 7\n", out)  # notice and up: the default
        [default, web, imap, pop] = [
            [line for line in part.splitlines()[1:] if not line.startswith("#")]
            for part in out.split("\n[")[1:]
        ]
        self.assertEqual(default, ["tls-min = 1.3", "idle-timeout = 60"])
        self.assertEqual(
            web,
            [
                "listen = tcp6:443:interface=\\:\\:",
                "connect = unix:/run/web.sock",
                "proxy-protocol = v1",
                "quiet = yes",
            ],
        )
        self.assertEqual(
            imap,
            [
                "listen = tcp:993",
                "connect = tcp:127.0.0.1:143:bindAddress=10.0.0.3",
                "client-ca = ca.pem",
                "allow-dns = a.example",
                "quiet = yes",
            ],
        )
        self.assertEqual(pop, [])
        self.assertIn("# stunnel: debug = chatty: no tlsproxy equivalent", out)
        self.assertIn("# stunnel: verifyChain = yes: no tlsproxy equivalent", out)
        self.assertIn("# stunnel: sslVersionMin = TLSv1: no tlsproxy equivalent", out)

    def test_errors(self) -> None:
        """A file that cannot be read or parsed is one line and status 1."""
        self.assertEqual(self.run_on("[web]\naccept\n"), (1, ""))
        self.assertTrue(
            self.stderr.getvalue().endswith(
                "stunnel.conf: line 2: not 'key = value': accept\n"
            )
        )
        self.assertEqual(self.run_on(b"accept = \xff\n")[0], 1)
        self.assertIn("can't decode byte 0xff", self.stderr.getvalue())
        missing = os.path.join(self.directory, "missing.conf")
        self.assertEqual(stunnel.main([missing]), 1)
        self.assertIn(f"{missing}: No such file or directory", self.stderr.getvalue())

    def test_usage(self) -> None:
        """Without exactly one argument (from sys.argv) it says how to run it."""
        self.patch(sys, "argv", ["tlsproxy-stunnel2conf"])
        self.assertEqual(stunnel.main(), 2)
        self.assertIn("usage: tlsproxy-stunnel2conf", self.stderr.getvalue())
