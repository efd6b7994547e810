"""
Integration tests: the real C{twistd tlsproxy} as an operator runs it, in a
jail made by C{etc/mkjail.sh}, as nobody:nogroup, with the certificate and
the key outside the jail (mode 0600, owned by root).

After the chroot the Python library is no longer on disk: a module that is
imported for the first time there cannot be found.  So these tests drive
every run-time path (faults included) through the jailed process, and fail
on any traceback in its log.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from unittest import TestCase, skipIf

from tests.harness import (
    HELLO,
    HOST,
    TIMEOUT,
    Certificates,
    HttpBackend,
    client_context,
    client_hello,
    curl_ok,
    make_certificates,
    start_http_backend,
    temp_dir,
    tls_connect,
    wait_until,
)

USER = "nobody"
GROUP = "nogroup"
PIDFILE = "/tlsproxy.pid"
"""The pid file as twistd is told it: a path inside the jail."""

MKJAIL = Path(__file__).resolve().parent.parent / "etc" / "mkjail.sh"


def _why_no_jail() -> str | None:
    """
    Return why these tests cannot run here, or C{None} if they can.
    """
    if not sys.platform.startswith("linux"):
        return "needs Linux: /proc, and mkjail.sh's mknod"
    if os.geteuid() != 0:
        return "needs root: twistd --chroot --uid --gid, and etc/mkjail.sh"
    try:
        pwd.getpwnam(USER)
        grp.getgrnam(GROUP)
    except KeyError as e:
        return f"needs the user {USER} and the group {GROUP}: {e}"
    return None


_NO_JAIL = _why_no_jail()


# --- the jail, the certificates and the process ----------------------------


def make_jail(case: TestCase) -> Path:
    """
    Run C{etc/mkjail.sh} for nobody:nogroup in a new directory and return the
    jail.

    The directory around the jail is mode 0700, owned by root: the jailed
    process, once it is nobody, could not even look up the jail's path.
    """
    around = temp_dir(case)
    if stat.S_IMODE(around.stat().st_mode) != 0o700:
        raise AssertionError(f"{around} should be mode 0700")
    jail = around / "jail"
    made = subprocess.run(
        ["sh", str(MKJAIL), str(jail), USER, GROUP],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    if made.returncode != 0:
        raise AssertionError(
            f"mkjail.sh exited {made.returncode}: "
            f"{made.stderr.decode(errors='replace')}"
        )
    return jail


def private_certificates(case: TestCase) -> Certificates:
    """
    Return fresh certificate files (outside any jail) whose certificate and
    key files are mode 0600, owned by root.
    """
    certs = make_certificates(temp_dir(case))
    for path in (certs.cert, certs.key):
        os.chown(path, 0, 0)
        path.chmod(0o600)
    return certs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def proc_status(pid: int) -> dict[str, str]:
    """
    Return the fields of C{/proc/PID/status}, by name; empty if it is gone.
    """
    fields = {}
    for line in _read_text(Path(f"/proc/{pid}/status")).splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


class JailedProxy:
    """
    A C{twistd tlsproxy} process chrooted into a jail, as nobody:nogroup.

    @ivar jail: the jail directory, as the caller named it.
    @ivar pid: the process id of the proxy (when daemonized: the daemon's,
        from the pid file).
    @ivar port: the port it listens on (127.0.0.1).
    """

    def __init__(
        self, directory: Path, jail: Path, args: Sequence[str], *, daemon: bool
    ) -> None:
        """
        Start C{twistd [-n] --chroot JAIL ... tlsproxy ARGS}, with its log in
        C{directory} (outside the jail); wait until it has dropped its
        privileges.
        """
        self.jail = jail
        self.pid = 0
        self._log = directory / "twistd.log"
        self._output = directory / "twistd.out"
        self._child: subprocess.Popen[bytes] | None = None
        self._stopped = False
        command = [
            str(Path(sys.executable).with_name("twistd")),
            *([] if daemon else ["-n"]),
            "--chroot",
            str(jail),
            "--uid",
            USER,
            "--gid",
            GROUP,
            "--pidfile",
            PIDFILE,
            "--logfile",
            str(self._log),
            "tlsproxy",
            *args,
        ]
        with self._output.open("wb") as output:
            if daemon:
                # twistd's first process exits once the daemon has bound its
                # port and dropped its privileges, or has failed to.
                status = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=TIMEOUT,
                    check=False,
                ).returncode
            else:
                self._child = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
                self.pid = self._child.pid
                status = 0
        try:
            if status != 0:
                raise AssertionError(
                    f"twistd exited {status}; output:\n"
                    f"{self.output_text()}\nlog:\n{self.log_text()}"
                )
            if daemon:
                self.pid = int(self.pid_file().read_text())
            self.port: int = int(self.wait_for_log(r"starting on (\d+)")[0].group(1))
            self.wait_for_log(r"set uid/gid ")
        except BaseException:
            self.stop(check=False)
            raise

    def pid_file(self) -> Path:
        """
        Return where the pid file is seen from outside the jail.
        """
        return self.jail / PIDFILE.lstrip("/")

    def running(self) -> bool:
        """
        Return whether the process is still running.
        """
        if self._child is not None:
            return self._child.poll() is None
        # A daemon is not our child: its reaper (init) may take a moment.
        state = proc_status(self.pid).get("State", "Z")
        return not state.startswith("Z")

    def log_text(self) -> str:
        """
        Return the twistd log so far.
        """
        return _read_text(self._log)

    def output_text(self) -> str:
        """
        Return what twistd wrote to stdout and stderr (before it daemonized).
        """
        return _read_text(self._output)

    def close_lines(self) -> list[str]:
        """
        Return the per-connection lines logged so far, one per closed
        connection.
        """
        return [line for line in self.log_text().splitlines() if " closed: " in line]

    def wait_for_log(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """
        Wait until the log has C{count} matches of C{pattern}; return them all.
        Fail at once if the log holds a traceback or the process has exited.
        """
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def enough() -> bool:
            log = self.log_text()
            # Inside the jail a traceback is often a failed lazy import.
            if "Traceback" in log:
                raise AssertionError(
                    f"twistd logged a traceback (waiting for {pattern!r})"
                )
            found[:] = list(regex.finditer(log))
            if len(found) < count and not self.running():
                raise AssertionError(f"twistd exited before logging {pattern!r}")
            return len(found) >= count

        try:
            wait_until(enough, f"{count} log line(s) matching {pattern!r}")
        except AssertionError as e:
            raise AssertionError(
                f"{e}\nlog:\n{self.log_text()}\noutput:\n{self.output_text()}"
            ) from None
        return found

    def wait_for_closes(self, count: int) -> list[str]:
        """
        Wait until C{count} connections have been logged as closed.
        """
        self.wait_for_log(r" closed: ", count)
        return self.close_lines()

    def stop(self, check: bool = True) -> None:
        """
        Send SIGTERM and wait for the exit; with C{check}, fail unless it
        shut down cleanly and its log and output hold no traceback.
        """
        if self._stopped or not self.pid:
            return
        self._stopped = True
        if self.running():
            os.kill(self.pid, signal.SIGTERM)
        try:
            wait_until(lambda: not self.running(), "twistd to exit on SIGTERM")
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if check:
                raise
        if self._child is not None:
            self._child.wait(TIMEOUT)
        if not check:
            return
        text = self.log_text() + self.output_text()
        # twistd -n re-raises the signal that stopped it, once it has shut down.
        status = None if self._child is None else self._child.returncode
        clean = status in (None, 0, -signal.SIGTERM)
        if not clean or "Traceback" in text or "Server Shut Down." not in text:
            raise AssertionError(f"twistd exited {status}; log and output:\n{text}")


# --- clients ----------------------------------------------------------------


def get_hello(proxy: JailedProxy, certs: Certificates, *args: str) -> bytes:
    """
    Fetch C{/} through the proxy with curl (ALPN on; and C{args}), verifying
    the proxy as localhost against the CA; return the body.
    """
    return curl_ok(
        *args,
        "--cacert",
        str(certs.ca),
        "--resolve",
        f"localhost:{proxy.port}:{HOST}",
        f"https://localhost:{proxy.port}/",
    )


def get_over(
    proxy: JailedProxy, certs: Certificates, version: ssl.TLSVersion
) -> tuple[str | None, bytes]:
    """
    Send an HTTP/1.0 C{GET /} over TLS C{version} only; return the version
    negotiated and the response, read up to the close_notify.
    """
    context = client_context(certs.ca)
    context.minimum_version = context.maximum_version = version
    with tls_connect(proxy.port, context) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        return sock.version(), response


def wait_for_end(sock: socket.socket) -> None:
    """
    Read and discard until the peer ends the connection, cleanly or not.
    """
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while sock.recv(65536):
            pass


def restart_backend(case: TestCase, port: int) -> HttpBackend:
    """
    Start an HTTP backend again on 127.0.0.1:C{port}, once free.
    """
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((HOST, port))
    except BaseException:
        listening.close()
        raise
    return start_http_backend(case, listening)


# --- tests ------------------------------------------------------------------


@skipIf(_NO_JAIL is not None, _NO_JAIL or "")
class JailTests(TestCase):
    """
    twistd --chroot JAIL --uid nobody --gid nogroup tlsproxy, with a jail
    from etc/mkjail.sh, confines the proxy and it still serves.
    """

    def setUp(self) -> None:
        self.certs = private_certificates(self)
        self.backend = start_http_backend(self)
        self.jail = make_jail(self)

    def start(
        self, *extra: str, daemon: bool = True, jail: Path | None = None
    ) -> JailedProxy:
        """
        Start the jailed proxy (in C{jail}, else the test's) before the
        backend; the test stops it (and checks its exit) when it ends.
        """
        proxy = JailedProxy(
            temp_dir(self),
            jail or self.jail,
            [
                "--listen",
                f"tcp:0:interface={HOST}",
                "--connect",
                f"tcp:{HOST}:{self.backend.port}",
                "--cert",
                str(self.certs.cert),
                "--key",
                str(self.certs.key),
                *extra,
            ],
            daemon=daemon,
        )
        self.addCleanup(proxy.stop)
        return proxy

    def assert_jailed(self, proxy: JailedProxy) -> None:
        """
        Check that C{proxy} runs as nobody:nogroup alone, without
        capabilities, with its root at the jail, its pid in the jail's pid
        file and nothing else added to the jail.
        """
        uid = pwd.getpwnam(USER).pw_uid
        gid = grp.getgrnam(GROUP).gr_gid
        status = proc_status(proxy.pid)
        # Real, effective, saved and filesystem ids.
        self.assertEqual(status["Uid"].split(), [str(uid)] * 4, status)
        self.assertEqual(status["Gid"].split(), [str(gid)] * 4, status)
        self.assertEqual(status["Groups"].split(), [str(gid)], status)
        self.assertEqual(int(status["CapEff"], 16), 0, status)
        self.assertEqual(int(status["CapPrm"], 16), 0, status)
        self.assertEqual(
            os.readlink(f"/proc/{proxy.pid}/root"), os.path.realpath(self.jail)
        )
        self.assertEqual(proxy.pid_file().read_text(), str(proxy.pid))
        inside = sorted(
            str(path.relative_to(self.jail)) for path in self.jail.rglob("*")
        )
        self.assertEqual(
            inside,
            ["dev", "dev/null", "etc", "etc/group", "etc/passwd", "tlsproxy.pid"],
        )

    def assert_relays(self, proxy: JailedProxy) -> None:
        """
        Check that a verifying curl gets the backend's answer through C{proxy}
        and that the connection's close line names its addresses.
        """
        before = len(self.backend.peers())
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        via_host, via_port = self.backend.peers()[before]
        line = proxy.wait_for_closes(1)[-1]
        self.assertRegex(
            line,
            rf"\[tlsproxy\] [0-9a-f]{{32}} from {re.escape(HOST)}:\d+"
            rf" via {re.escape(via_host)}:{via_port}"
            rf" to {re.escape(HOST)}:{self.backend.port}"
            rf" closed: (client|backend) closed; \d+ bytes from client,"
            rf" \d+ bytes to client in [\d.]+ s$",
        )

    def assert_alive(self, proxy: JailedProxy) -> None:
        """
        Check that C{proxy} still runs and has logged no traceback.
        """
        self.assertTrue(proxy.running(), proxy.log_text())
        self.assertNotIn("Traceback", proxy.log_text())

    def test_daemon_is_jailed(self) -> None:
        """
        Daemonized, the proxy runs as nobody:nogroup alone, without
        capabilities, with its root at the jail and its pid in JAIL/tlsproxy.pid.
        """
        self.assert_jailed(self.start())

    def test_daemon_relays(self) -> None:
        """
        Daemonized in the jail, the proxy relays a verifying curl request to
        the backend and logs the connection's close line.
        """
        self.assert_relays(self.start())

    def test_foreground(self) -> None:
        """
        Under twistd -n the proxy is jailed as when daemonized, and relays.
        """
        proxy = self.start(daemon=False)
        self.assert_jailed(proxy)
        self.assert_relays(proxy)

    def test_connection_log_outside_jail(self) -> None:
        """
        The connection log stays outside the jail, written through the file
        opened before chroot, and logrotate's copytruncate works on it: the
        next record starts the truncated file.
        """
        log = temp_dir(self) / "connections.log"
        proxy = self.start("--connection-log", str(log))
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        proxy.wait_for_closes(1)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        self.assertEqual([r["event"] for r in records], ["open", "close"])
        os.truncate(log, 0)
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        proxy.wait_for_closes(2)
        data = log.read_bytes()
        self.assertTrue(data.startswith(b'{"event":"open"'), data[:40])
        self.assertEqual(len(data.splitlines()), 2)
        self.assertEqual(os.stat(log).st_uid, 0)

    def test_metrics_inside_jail(self) -> None:
        """
        Metrics bound as root are served from inside the jail, after a
        relayed request.
        """
        proxy = self.start("--metrics", f"tcp:0:interface={HOST}")
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        proxy.wait_for_closes(1)
        [match] = proxy.wait_for_log(r"Site starting on (\d+)")
        page = curl_ok(f"http://{HOST}:{match.group(1)}/metrics").decode()
        self.assertIn(
            'tlsproxy_connections_accepted_total{service="tlsproxy"} 1.0', page
        )
        self.assert_alive(proxy)

    def test_faults_inside_jail(self) -> None:
        """
        Inside the jail, garbage, a truncated ClientHello, a stalled
        handshake, a client reset, TLS 1.2, TLS 1.3 and an absent backend
        each end only their own connection, without a traceback, and a normal
        request still succeeds after them all.
        """
        proxy = self.start("--handshake-timeout", "1")
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        proxy.wait_for_closes(1)

        with socket.create_connection((HOST, proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n" * 20)
            wait_for_end(sock)
        self.assertIn("closed: TLS error", proxy.wait_for_closes(2)[-1])

        hello = client_hello()
        with socket.create_connection((HOST, proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(hello[: len(hello) // 2])
        proxy.wait_for_closes(3)

        with socket.create_connection((HOST, proxy.port), timeout=TIMEOUT) as sock:
            wait_for_end(sock)
        self.assertIn("closed: handshake timeout", proxy.wait_for_closes(4)[-1])

        before = len(self.backend.peers())
        with tls_connect(proxy.port, client_context(self.certs.ca)) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            wait_until(
                lambda: len(self.backend.peers()) > before, "the backend connection"
            )
            # Closing with a zero linger time sends a TCP reset.
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.assertIn("closed: client error", proxy.wait_for_closes(5)[-1])

        for count, (version, name) in enumerate(
            [
                (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
            ],
            start=6,
        ):
            negotiated, response = get_over(proxy, self.certs, version)
            self.assertEqual(negotiated, name)
            self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
            self.assertTrue(response.endswith(b"\r\n\r\n" + HELLO), response)
            proxy.wait_for_closes(count)

        self.backend.stop()
        with tls_connect(proxy.port, client_context(self.certs.ca)) as tls:
            wait_for_end(tls)
        self.assertIn("closed: backend connect failed: ", proxy.wait_for_closes(8)[-1])

        restart_backend(self, self.backend.port)
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        self.assertEqual(len(proxy.wait_for_closes(9)), 9)
        self.assert_alive(proxy)
        self.assertEqual(proxy.pid_file().read_text(), str(proxy.pid))

    def test_sigterm(self) -> None:
        """
        SIGTERM ends the jailed daemon cleanly: the log says "Server Shut
        Down." and holds no traceback.
        """
        proxy = self.start()
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        proxy.wait_for_closes(1)
        proxy.stop()
        self.assertFalse(proxy.running())
        log = proxy.log_text()
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)

    def test_two_share_a_port(self) -> None:
        """
        Two daemons, each in its own jail, share one port with --reuse-port
        (bound as root before the uid changes), and both serve: of 40
        connections each relays some (all to one of two: once in 2**39).
        """
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        args = ["--listen", f"tcp:{port}:interface={HOST}", "--reuse-port"]
        proxies = [self.start(*args, jail=make_jail(self)) for _ in range(2)]
        for _ in range(40):
            self.assertEqual(get_hello(proxies[0], self.certs), HELLO)
        wait_until(
            lambda: sum(len(proxy.close_lines()) for proxy in proxies) == 40,
            "40 connections logged as closed",
        )
        self.assertTrue(all(proxy.close_lines() for proxy in proxies))
        for proxy in proxies:
            self.assert_alive(proxy)

    def place(self, certs: Certificates) -> list[Path]:
        """Write C{certs} at the jail's copy of the proxy's paths; those paths."""
        uid = pwd.getpwnam(USER).pw_uid
        placed = []
        for path, new in [(self.certs.cert, certs.cert), (self.certs.key, certs.key)]:
            inside = self.jail / path.relative_to("/")
            inside.parent.mkdir(parents=True, exist_ok=True)
            inside.write_bytes(new.read_bytes())  # (in place, if it is there)
            os.chown(inside, uid, -1)
            inside.chmod(0o600)
            placed.append(inside)
        return placed

    def test_reload_inside_jail(self) -> None:
        """
        SIGHUP in the jail reads the same paths inside it: files placed there
        before the start and rewritten in place are read again; confined, a
        file replaced by rename cannot be, and the certificate in use stays.
        """
        self.place(self.certs)
        proxy = self.start()
        proxy.wait_for_log(r"Landlock ABI \d+: read \[.*cert\.pem")
        fresh = make_certificates(temp_dir(self))
        self.place(fresh)
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log(r"tlsproxy: certificates reloaded")
        self.assertEqual(get_hello(proxy, fresh), HELLO)
        renamed = self.jail / "renewed.pem"
        renamed.write_bytes(self.certs.cert.read_bytes())
        renamed.rename(self.place(fresh)[0])
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log(r"reload failed, the old certificates stay: .*denied")
        self.assertEqual(get_hello(proxy, fresh), HELLO)
        self.assert_alive(proxy)

    def test_reload_inside_jail_unconfined(self) -> None:
        """
        With --no-sandbox, files placed in the jail after the start are read
        by SIGHUP; without them the old certificate stays (one line).
        """
        proxy = self.start("--no-sandbox")
        old = served_fingerprint(proxy)
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log(r"reload failed, the old certificates stay: .*No such file")
        self.assertEqual(get_hello(proxy, self.certs), HELLO)
        fresh = make_certificates(temp_dir(self))
        self.place(fresh)
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log(r"tlsproxy: certificates reloaded")
        self.assertNotEqual(served_fingerprint(proxy), old)
        self.assertEqual(get_hello(proxy, fresh), HELLO)
        self.assert_alive(proxy)


def served_fingerprint(proxy: JailedProxy) -> bytes:
    """The certificate (DER) that C{proxy} serves to a client for localhost."""
    with tls_connect(proxy.port, client_context()) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der
