"""
Tests for L{tlsproxy.sandbox}.

L{ConfinedProcessTests} prove each rule on this kernel from inside a confined
child process (C{tests/confined.py}); the other classes replace the door to
the kernel (C{sandbox._libc}) with L{FakeLibc} and cover every branch in
this process, which is never confined.
"""

from __future__ import annotations

import _thread
import errno
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import process, sandbox, tap
from tlsproxy.process import READABLE, Process, StartupError, confinement
from tlsproxy.sandbox import SandboxError, abi, confine, handled

TIMEOUT = 10
"""Seconds a child process may take for each step."""

CHILD = Path(__file__).with_name("confined.py")


def parse(*argv: str) -> tap.Options:
    """Options of this command line."""
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


ALL_FS_1 = 0x1FFF  # EXECUTE ... MAKE_SYM
ABI_RIGHTS = {
    0: (0, 0, 0),
    1: (ALL_FS_1, 0, 0),
    2: (ALL_FS_1 | 1 << 13, 0, 0),
    3: (0x7FFF, 0, 0),
    4: (0x7FFF, 0b11, 0),
    5: (0xFFFF, 0b11, 0),
    6: (0xFFFF, 0b11, 0b11),
    7: (0xFFFF, 0b11, 0b11),
    8: (0xFFFF, 0b11, 0b11),
}
"""(handled_access_fs, handled_access_net, scoped) by ABI, from landlock.h."""


def _descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


class FakeLibc:
    """
    Stands for libc in L{sandbox._libc}: records each call, answers the
    Landlock ABI C{version} (or fails with the errno C{version} when it is
    negative), and fails the step named C{fail} with C{EINVAL}.  A ruleset is a
    real descriptor (of C{/dev/null}), so that closing it is checked.
    """

    def __init__(self, version: int = 7, fail: str = "") -> None:
        self.version = version
        self.fail = fail
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.ruleset = -1

    def __call__(self, function: str, *args: Any) -> int:
        if function == "syscall" and args[:2] == (444, None):
            if self.version < 0:
                raise OSError(-self.version, os.strerror(-self.version))
            return self.version
        steps = {444: "create", 445: "add", 446: "restrict"}
        step = "prctl" if function == "prctl" else steps[args[0]]
        self.calls.append((step, args))
        if step == self.fail:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if step == "create":
            self.ruleset = os.open(os.devnull, os.O_RDONLY)
            return self.ruleset
        return 0

    def steps(self) -> list[str]:
        return [step for step, _ in self.calls]

    def rules(self) -> list[tuple[int, bytes]]:
        return [(args[2], args[3]) for step, args in self.calls if step == "add"]


class FakeKernelMixin:
    """Installs a L{FakeLibc} in place of the kernel, in this process."""

    patch: Callable[..., None]

    def fake(self, version: int = 7, fail: str = "") -> FakeLibc:
        libc = FakeLibc(version, fail)
        self.patch(sandbox, "_libc", libc)
        return libc


class AbiTests(FakeKernelMixin, SynchronousTestCase):
    """L{abi} asks the kernel which Landlock ABI it offers."""

    def test_this_kernel(self) -> None:
        """On this kernel (Linux 6.18) the ABI is 7 or more."""
        self.assertGreaterEqual(abi(), 7)

    def test_libc_error(self) -> None:
        """The door to libc raises OSError with errno when a call returns -1."""
        e = self.assertRaises(OSError, sandbox._libc, "prctl", -1, 0, 0, 0, 0)
        self.assertEqual(e.errno, errno.EINVAL)

    def test_no_landlock(self) -> None:
        """ENOSYS (not built in) and EOPNOTSUPP (not enabled) mean ABI 0."""
        for number in (errno.ENOSYS, errno.EOPNOTSUPP):
            self.fake(version=-number)
            self.assertEqual(abi(), 0)

    def test_other_error(self) -> None:
        """Any other error is a SandboxError of one line."""
        self.fake(version=-errno.EPERM)
        e = self.assertRaises(SandboxError, abi)
        self.assertEqual(
            str(e), "cannot ask for the Landlock ABI: Operation not permitted"
        )

    def test_unknown_platform(self) -> None:
        """Elsewhere than Linux on x86_64 or aarch64, the ABI is 0, unasked."""
        libc = self.fake()
        for system, machine in [("Linux", "riscv64"), ("FreeBSD", "amd64")]:
            self.patch(sandbox.platform, "system", lambda s=system: s)
            self.patch(sandbox.platform, "machine", lambda m=machine: m)
            self.assertEqual(abi(), 0)
        self.assertEqual(libc.calls, [])

    def test_aarch64(self) -> None:
        """Linux on aarch64 is asked, as x86_64 is."""
        self.fake(version=5)
        self.patch(sandbox.platform, "system", lambda: "Linux")
        self.patch(sandbox.platform, "machine", lambda: "aarch64")
        self.assertEqual(abi(), 5)


class HandledTests(SynchronousTestCase):
    """L{handled} masks the rights to those each ABI knows."""

    def test_each_abi(self) -> None:
        """ABIs 0 to 8 handle the rights landlock.h gives each."""
        for version, rights in ABI_RIGHTS.items():
            self.assertEqual((version, handled(version)), (version, rights))


class ConfineTests(FakeKernelMixin, SynchronousTestCase):
    """L{confine}, against a fake kernel."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.cert = self.directory / "cert.pem"
        self.cert.write_text("certificate")
        self.key = self.directory / "key.pem"
        self.key.write_text("key")
        self.logs = self.directory / "logs"
        self.logs.mkdir()
        self.missing = str(self.directory / "missing.pem")
        self.before = _descriptors()
        # This process may have threads of its own: see ThreadsTests.
        self.patch(sandbox, "_threads", lambda: 1)

    def confine(self, **kwargs: Any) -> str | None:
        """L{confine} the two files, one missing, and ports 443 and 8443."""
        readable = kwargs.pop("readable", [str(self.cert), self.missing, str(self.key)])
        return confine(readable, kwargs.pop("ports", [443, 8443]), **kwargs)

    def test_no_landlock(self) -> None:
        """Without Landlock, confine returns None and does nothing else."""
        libc = self.fake(version=-errno.ENOSYS)
        self.assertIsNone(self.confine())
        self.assertEqual(libc.calls, [])

    def test_steps(self) -> None:
        """No new privileges first, then the ruleset, its rules, and restrict."""
        libc = self.fake()
        self.confine()
        self.assertEqual(
            libc.steps(), ["prctl", "create", "add", "add", "add", "add", "restrict"]
        )
        self.assertEqual(libc.calls[0][1], (38, 1, 0, 0, 0))
        self.assertEqual(libc.calls[-1][1], (446, libc.ruleset, 0))

    def test_ruleset(self) -> None:
        """The ruleset handles every right of ABI 7, with a 24-byte attribute."""
        libc = self.fake()
        self.confine()
        number, attr, size, flags = libc.calls[1][1]
        self.assertEqual((number, size, flags), (444, 24, 0))
        self.assertEqual(struct.unpack("=QQQ", attr), (0xFFFF, 0b11, 0b11))

    def test_rules(self) -> None:
        """Connect-TCP on each port, then read-file on each existing file."""
        libc = self.fake()
        self.confine()
        rules = libc.rules()
        self.assertEqual([kind for kind, _ in rules], [2, 2, 1, 1])
        ports = [struct.unpack("=QQ", rule) for _, rule in rules[:2]]
        self.assertEqual(ports, [(1 << 1, 443), (1 << 1, 8443)])
        beneath = [struct.unpack("=Qi", rule) for _, rule in rules[2:]]
        self.assertEqual([access for access, _ in beneath], [1 << 2, 1 << 2])
        # The descriptors were of the files (closed now; identical inodes
        # cannot be checked after the fact, so a distinct pair is).
        self.assertEqual(len({fd for _, fd in beneath}), 2)

    def test_directory(self) -> None:
        """A directory can be listed (READ_DIR), not its files read."""
        libc = self.fake()
        self.confine(readable=[str(self.directory)], ports=[])
        [(kind, rule)] = libc.rules()
        self.assertEqual((kind, struct.unpack("=Qi", rule)[0]), (1, 1 << 3))

    def test_ephemeral(self) -> None:
        """With ephemeral, a bind-TCP rule for port 0: any ephemeral port."""
        libc = self.fake()
        line = self.confine(readable=[], ports=[80], ephemeral=True)
        rules = [struct.unpack("=QQ", rule) for _, rule in libc.rules()]
        self.assertEqual(rules, [(1 << 1, 80), (1 << 0, 0)])
        self.assertIn("TCP connect to port(s) [80] only, bind ephemeral ports", line)

    def test_rotating(self) -> None:
        """
        The rotating directory gets what twistd's rotation does: write, read,
        remove and make files, truncate (ABI 3+).
        """
        for version, rights in [(7, 0x4126), (2, 0x126)]:
            libc = self.fake(version=version)
            line = self.confine(readable=[], ports=[], rotating=str(self.logs))
            [(kind, rule)] = libc.rules()
            self.assertEqual((kind, struct.unpack("=Qi", rule)[0]), (1, rights))
            self.assertIn(f"read [], rotate logs in {self.logs}, no other", line)

    def test_rotating_missing(self) -> None:
        """A rotating directory that does not exist is not said to rotate."""
        libc = self.fake()
        line = self.confine(rotating=self.missing)
        self.assertNotIn("rotate", line)
        self.assertEqual(len(libc.rules()), 4)

    def test_result(self) -> None:
        """What is enforced, in one line: files readable, ports, scopes."""
        self.fake()
        self.assertEqual(
            self.confine(),
            f"Landlock ABI 7: read {[str(self.cert), str(self.key)]}, no other"
            " file access; TCP connect to port(s) [443, 8443] only, bind none;"
            " signals and abstract UNIX sockets scoped to the process",
        )

    def test_each_abi(self) -> None:
        """At ABI 1 to 7 the ruleset handles that ABI's rights, port rules from 4."""
        for version in range(1, 8):
            libc = self.fake(version=version)
            line = self.confine()
            assert line is not None
            attr = struct.unpack("=QQQ", libc.calls[1][1][1])
            has_net = version >= 4
            self.assertEqual(
                (version, attr, [kind for kind, _ in libc.rules()]),
                (version, ABI_RIGHTS[version], [2, 2, 1, 1] if has_net else [1, 1]),
            )
            self.assertTrue(line.startswith(f"Landlock ABI {version}: "), line)
            self.assertEqual("TCP not confined (ABI < 4)" in line, not has_net)
            self.assertEqual("sockets not scoped" in line, version < 6)

    def test_newer_abi(self) -> None:
        """A kernel newer than ABI 7 gets ABI 7's ruleset."""
        libc = self.fake(version=9)
        line = self.confine()
        assert line is not None
        self.assertTrue(line.startswith("Landlock ABI 7: "))
        self.assertEqual(struct.unpack("=QQQ", libc.calls[1][1][1]), ABI_RIGHTS[7])

    def test_duplicates(self) -> None:
        """A file or port given twice, or given by an iterator, counts once."""
        libc = self.fake()
        line = self.confine(
            readable=iter([str(self.cert), str(self.cert)]), ports=iter([443, 443])
        )
        assert line is not None
        self.assertIn(f"read {[str(self.cert)]},", line)
        self.assertIn("port(s) [443] only", line)
        self.assertEqual(len(libc.rules()), 2)

    def test_one_line(self) -> None:
        """A newline in a path is escaped: what is enforced stays one line."""
        self.fake()
        odd = self.directory / "a\nb.pem"
        odd.write_text("")
        line = self.confine(readable=[str(odd)])
        assert line is not None
        self.assertNotIn("\n", line)

    def test_descriptors_closed(self) -> None:
        """Every descriptor confine opens is closed when it returns."""
        self.fake()
        self.confine()
        self.assertEqual(_descriptors(), self.before)

    def test_step_fails(self) -> None:
        """A failing call is a one-line SandboxError; descriptors are closed."""
        for step in ("prctl", "create", "add", "restrict"):
            self.fake(fail=step)
            e = self.assertRaises(SandboxError, self.confine)
            self.assertEqual(str(e), "cannot confine: Landlock: Invalid argument")
            self.assertEqual(_descriptors(), self.before)

    def test_lookup_error(self) -> None:
        """A path that cannot be looked up, other than missing, is refused."""
        libc = self.fake()
        path = str(self.cert / "below")
        e = self.assertRaises(SandboxError, self.confine, readable=[path])
        self.assertEqual(str(e), f"cannot confine: {path}: Not a directory")
        self.assertEqual(libc.steps(), [])
        self.assertEqual(_descriptors(), self.before)

    def test_threads(self) -> None:
        """With another thread, confine refuses, before anything is changed."""
        libc = self.fake()
        self.patch(sandbox, "_threads", lambda: 2)
        e = self.assertRaises(SandboxError, self.confine)
        self.assertEqual(str(e), "cannot confine: 2 threads, Landlock needs one")
        self.assertEqual(libc.steps(), [])


class ThreadsTests(SynchronousTestCase):
    """
    L{sandbox._threads} counts the threads of the process.  This one may have
    threads of its own (the reactor's pool, started by other tests): each test
    counts one more.
    """

    def python_thread(self) -> None:
        """Start a Python thread, ended on cleanup."""
        self.addCleanup(self.wait_for, _tasks())
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait, args=(TIMEOUT,))
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)

    def c_thread(self) -> None:
        """Start a thread that Python's threading does not know of."""
        self.addCleanup(self.wait_for, _tasks())
        lock = _thread.allocate_lock()
        lock.acquire()
        _thread.start_new_thread(lock.acquire, (True, TIMEOUT))
        self.addCleanup(lock.release)

    def wait_for(self, count: int) -> None:
        """Wait until the process has C{count} threads again (they end late)."""
        deadline = time.monotonic() + TIMEOUT
        while _tasks() != count:
            if time.monotonic() > deadline:
                self.fail(f"{_tasks()} threads, not {count}")
            time.sleep(0.01)

    def test_python_thread(self) -> None:
        """A Python thread is counted."""
        before = sandbox._threads()
        self.python_thread()
        self.assertEqual(sandbox._threads(), before + 1)

    def test_c_thread(self) -> None:
        """A thread unknown to Python's threading is counted, from /proc."""
        before = sandbox._threads()
        python = threading.active_count()
        self.c_thread()
        self.assertEqual(threading.active_count(), python)
        self.assertEqual(sandbox._threads(), before + 1)

    def test_no_proc(self) -> None:
        """Without /proc (a chroot), Python's threads alone are counted."""
        self.patch(sandbox, "_TASKS", self.mktemp())
        self.assertEqual(sandbox._threads(), threading.active_count())
        self.c_thread()
        self.assertEqual(sandbox._threads(), threading.active_count())
        self.python_thread()
        self.assertEqual(sandbox._threads(), threading.active_count())


@contextmanager
def _listening(family: socket.AddressFamily, address: object) -> Iterator[Any]:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(address)
        s.listen()
        yield s.getsockname()


class ConfinedProcessTests(SynchronousTestCase):
    """
    A child process confined on this kernel as the proxy would be: reads its
    listed files, connects to its listed port, and nothing else.
    """

    def setUp(self) -> None:
        if abi() < 6:
            raise self.skipTest("needs Landlock ABI 6 or later")
        stack = ExitStack()
        self.addCleanup(stack.close)
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir()
        self.cert = self.directory / "cert.pem"
        self.cert.write_text("certificate")
        self.other = self.directory / "other.pem"
        self.other.write_text("other")
        self.log = self.directory / "twistd.log"
        self.log.write_text("")
        self.port = stack.enter_context(_listening(socket.AF_INET, ("127.0.0.1", 0)))[1]
        self.other_port = stack.enter_context(
            _listening(socket.AF_INET, ("127.0.0.1", 0))
        )[1]
        victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        stack.callback(victim.wait)
        stack.callback(victim.kill)
        self.victim = victim.pid
        self.abstract = f"tlsproxy-test-{os.getpid()}"
        stack.enter_context(_listening(socket.AF_UNIX, "\0" + self.abstract))
        # A short path: sun_path holds 108 bytes, self.directory may be longer.
        self.unix = os.path.join(tempfile.mkdtemp(), "socket")
        stack.callback(shutil.rmtree, os.path.dirname(self.unix))
        stack.enter_context(_listening(socket.AF_UNIX, self.unix))

    def run_child(
        self,
        probes: list[tuple[str, object]],
        *,
        readable: list[str] | None = None,
        confined: bool = True,
        ephemeral: bool = False,
        rotating: str | None = None,
        thread: bool = False,
        between: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        """
        Run C{tests/confined.py}: it confines itself to C{readable} (the
        certificate, by default) and port C{self.port}, then C{between} runs
        here, then the child runs C{probes}.

        @return: the child's first line, with C{results} added.
        """
        spec = {
            "readable": [str(self.cert)] if readable is None else readable,
            "ports": [self.port],
            "ephemeral": ephemeral,
            "rotating": rotating,
            "confine": confined,
            "thread": thread,
            "preopen": str(self.log),
            "probes": probes,
        }
        child = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(child.kill)
        assert child.stdin is not None and child.stdout is not None
        if not select.select([child.stdout], [], [], TIMEOUT)[0]:
            self.fail("the child did not confine itself in time")
        first: dict[str, Any] = json.loads(child.stdout.readline())
        between()
        out, _ = child.communicate("go\n", timeout=TIMEOUT)
        self.assertEqual(child.returncode, 0)
        if out:
            first.update(json.loads(out))
        return first

    def results(self, *probes: tuple[str, object], **kwargs: Any) -> list[str]:
        """The result of each of C{probes} in a confined child."""
        results: list[str] = self.run_child(list(probes), **kwargs)["results"]
        return results

    def test_control(self) -> None:
        """Unconfined, every probe below succeeds: the denials are Landlock's."""
        probes: list[tuple[str, object]] = [
            ("read", str(self.other)),
            ("read", "/proc/self/status"),
            ("listdir", str(self.directory)),
            ("create", str(self.directory / "new")),
            ("open-write", os.devnull),
            ("exec", None),
            ("connect", self.other_port),
            ("bind", 0),
            ("kill", os.getpid()),
            ("ptrace", self.victim),
            ("abstract-unix", self.abstract),
        ]
        out = self.run_child(probes, confined=False)
        self.assertEqual(out["confinement"], None)
        read, status, *others = out["results"]
        self.assertEqual((read, status[:5]), ("other", "Name:"))
        self.assertEqual(others, ["ok"] * len(others))

    def test_confinement(self) -> None:
        """The child is confined at this kernel's ABI (7 known here)."""
        out = self.run_child([], readable=[str(self.cert), str(self.other) + ".no"])
        self.assertEqual(
            out["confinement"],
            f"Landlock ABI 7: read {[str(self.cert)]}, no other file access; TCP"
            f" connect to port(s) {[self.port]} only, bind none; signals and"
            " abstract UNIX sockets scoped to the process",
        )

    def test_reads_listed(self) -> None:
        """The listed files stay readable."""
        self.assertEqual(
            self.results(
                ("read", str(self.cert)),
                ("read", str(self.other)),
                readable=[str(self.cert), str(self.other)],
            ),
            ["certificate", "other"],
        )

    def test_reads_nothing_else(self) -> None:
        """
        No other file can be read: the next one, /etc/passwd, Python's own
        modules (none can be imported any more), /proc.
        """
        self.assertEqual(
            self.results(
                ("read", str(self.other)),
                ("read", "/etc/passwd"),
                ("read", os.__file__),
                ("read", "/proc/self/status"),
            ),
            ["EACCES"] * 4,
        )

    def test_no_listing(self) -> None:
        """No directory can be listed, not even the listed file's."""
        self.assertEqual(self.results(("listdir", str(self.directory))), ["EACCES"])

    def test_no_write(self) -> None:
        """Nothing can be created, nor opened for writing, the listed file too."""
        self.assertEqual(
            self.results(
                ("create", str(self.directory / "new")),
                ("open-write", str(self.cert)),
                ("open-write", os.devnull),
            ),
            ["EACCES"] * 3,
        )
        self.assertFalse((self.directory / "new").exists())

    def test_devnull_listed(self) -> None:
        """/dev/null, when listed, can be opened for reading only."""
        self.assertEqual(
            self.results(
                ("read", os.devnull), ("open-write", os.devnull), readable=[os.devnull]
            ),
            ["", "EACCES"],
        )

    def test_no_exec(self) -> None:
        """No program can be run."""
        self.assertEqual(self.results(("exec", None)), ["EACCES"])

    def test_connect(self) -> None:
        """The listed port can be connected to; another cannot."""
        self.assertEqual(
            self.results(("connect", self.port), ("connect", self.other_port)),
            ["ok", "EACCES"],
        )

    def test_no_bind(self) -> None:
        """No TCP port can be bound."""
        self.assertEqual(self.results(("bind", 0), ("bind", 0)), ["EACCES"] * 2)

    def test_bind_ephemeral(self) -> None:
        """
        With ephemeral, a port the kernel chooses can be bound (a backend's
        source address, C{bindAddress}); a port named cannot.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        self.assertEqual(
            self.results(("bind", 0), ("bind", free), ephemeral=True), ["ok", "EACCES"]
        )

    def test_listed_directory(self) -> None:
        """A listed directory can be listed; its files not listed, not read."""
        self.assertEqual(
            self.results(
                ("listdir", str(self.directory)),
                ("read", str(self.other)),
                readable=[str(self.directory), str(self.cert)],
            )[1:],
            ["EACCES"],
        )

    def test_rotation(self) -> None:
        """
        In the rotating directory, twistd's rotation works: rename the log,
        make a new one, append to it; elsewhere nothing is made.
        """
        logs = self.directory / "logs"
        logs.mkdir()
        log = logs / "twistd.log"
        log.write_text("old\n")
        self.assertEqual(
            self.results(
                ("rename", [str(log), f"{log}.1"]),
                ("new-log", str(log)),
                ("append", str(log)),
                ("read", f"{log}.1"),
                ("create", str(self.directory / "new")),
                ("exec", None),
                rotating=str(logs),
            ),
            ["ok", "ok", "ok", "old\n", "EACCES", "EACCES"],
        )
        self.assertTrue(log.exists())

    def test_signals(self) -> None:
        """No signal reaches another process; one to itself does."""
        self.assertEqual(
            self.results(("kill", os.getpid()), ("signal-self", None)),
            ["EPERM", "ok"],
        )

    def test_no_ptrace(self) -> None:
        """No other process can be traced."""
        self.assertEqual(self.results(("ptrace", self.victim)), ["EPERM"])

    def test_no_abstract_unix(self) -> None:
        """An abstract UNIX socket made outside cannot be connected to."""
        self.assertEqual(self.results(("abstract-unix", self.abstract)), ["EPERM"])

    def test_unix_path_not_confined(self) -> None:
        """A UNIX socket with a path is not confined (no right for it up to ABI 7)."""
        self.assertEqual(self.results(("unix", self.unix)), ["ok"])

    def test_mptcp_not_confined(self) -> None:
        """
        A Multipath TCP socket connects to any port: Landlock's TCP rules
        check IPPROTO_TCP sockets only (seen on Linux 6.18, ABI 7).
        """
        result = self.results(("connect-mptcp", self.other_port))
        if result in (["ENOPROTOOPT"], ["EPROTONOSUPPORT"]):
            raise self.skipTest("no Multipath TCP here (net.mptcp.enabled = 0?)")
        self.assertEqual(result, ["ok"])

    def test_open_descriptor(self) -> None:
        """A file opened before confining can still be written."""
        self.assertEqual(self.results(("write-preopened", "line\n")), ["ok"])
        self.assertEqual(self.log.read_text(), "line\n")

    def test_renamed_file(self) -> None:
        """
        A listed file replaced by rename after confining cannot be read (the
        rule holds the inode); one rewritten in place can.
        """

        def renew() -> None:
            new = self.directory / "new.pem"
            new.write_text("renewed")
            new.rename(self.cert)
            with self.other.open("w") as f:
                f.write("rewritten")

        self.assertEqual(
            self.results(
                ("read", str(self.cert)),
                ("read", str(self.other)),
                readable=[str(self.cert), str(self.other)],
                between=renew,
            ),
            ["EACCES", "rewritten"],
        )

    def test_thread_refused(self) -> None:
        """A process with a second thread is refused, in one line."""
        out = self.run_child([], thread=True)
        self.assertEqual(
            out, {"error": "cannot confine: 2 threads, Landlock needs one"}
        )


class ConfinementTests(SynchronousTestCase):
    """
    L{confinement}: what twistd's process confines itself to, worked out from
    the options, and applied once it serves.
    """

    def setUp(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.line: str | None = "Landlock ABI 7: ..."
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

        def confine(*args: Any) -> str | None:
            self.calls.append(args)
            return self.line

        self.patch(process, "confine", confine)

    def confined(
        self,
        files: list[str] = [],  # noqa: B006
        backends: list[str] = ["tcp:127.0.0.1:80"],  # noqa: B006
        twistd: dict[str, Any] | None = None,
    ) -> tuple[Any, ...]:
        """The arguments L{confine} gets, once started."""
        confinement(files, backends, twistd)()
        return self.calls.pop()

    def test_files(self) -> None:
        """
        The reload's files are readable, a directory's .pem files too, and
        /dev/null and the resolver's files.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        for name in ("b.pem", "a.pem", "README"):
            (directory / name).write_text("")
        readable = self.confined(["/etc/cert.pem", str(directory)])[0]
        self.assertEqual(readable[: len(READABLE)], list(READABLE))
        pems = [str(directory / "a.pem"), str(directory / "b.pem")]
        expected = ["/etc/cert.pem", str(directory), *pems]
        self.assertEqual(sorted(readable[len(READABLE) :]), sorted(expected))

    def test_ports(self) -> None:
        """Each TCP backend's port; a UNIX backend has none; bindAddress binds."""
        backends = ["tcp:127.0.0.1:80", "unix:/run/www.sock", "tls:h:443"]
        self.assertEqual(self.confined(backends=backends)[1:3], ([80, 443], False))
        bound = ["tcp:host=127.0.0.1:port=80:bindAddress=127.0.0.2"]
        self.assertEqual(self.confined(backends=bound)[1:3], ([80], True))

    def test_log_rotation(self) -> None:
        """twistd's log file's directory is where its rotation may act."""
        cases: list[tuple[dict[str, Any] | None, str | None]] = [
            (None, None),  # not under twistd
            ({"nodaemon": True, "logfile": None}, None),  # stdout
            ({"nodaemon": True, "logfile": "-"}, None),
            ({"nodaemon": True, "logfile": "/var/log/t/t.log"}, "/var/log/t"),
            ({"nodaemon": False, "logfile": None, "syslog": True}, None),
            ({"nodaemon": False, "logfile": None, "syslog": False}, os.getcwd()),
            ({"nodaemon": False, "logfile": "x/t.log"}, os.path.abspath("x")),
        ]
        for twistd, rotating in cases:
            self.assertEqual(
                (twistd, self.confined(twistd=twistd)[3]), (twistd, rotating)
            )

    def test_logged(self) -> None:
        """What is enforced is logged; without Landlock, a warning."""
        self.confined()
        self.line = None
        self.confined()
        first, second = (formatEvent(e) for e in self.events)
        self.assertEqual(first, "Landlock ABI 7: ...")
        self.assertEqual(
            second, "no Landlock (Linux 5.13+ on x86_64, aarch64): not confined"
        )
        self.assertEqual(self.events[1]["log_level"], LogLevel.warn)

    def test_error(self) -> None:
        """A SandboxError is a one-line start-up error."""

        def fails(*args: Any) -> str:
            raise SandboxError("cannot confine: Landlock: Invalid argument")

        self.patch(process, "confine", fails)
        e = self.assertRaises(StartupError, confinement([], [], None))
        self.assertEqual(
            str(e),
            "tlsproxy: cannot confine: Landlock: Invalid argument"
            " (--no-sandbox: not confined)",
        )

    def test_before_services(self) -> None:
        """The process confines itself before its services start."""
        order: list[str] = []

        class Started(Service):
            def startService(self) -> None:
                order.append("service")

        top = Process(MemoryReactor(), lambda: order.append("confined"))
        top.add(Started(), "--listen tcp:0")
        top.startService()
        self.assertEqual(order, ["confined", "service"])

    def test_option(self) -> None:
        """On by default; --no-sandbox (in a --config file: process-wide) off."""
        argv = ["--connect", "tcp:127.0.0.1:80", "--self-signed", "x", "--listen"]
        on = tap.makeService(parse(*argv, "tcp:0:interface=127.0.0.1"))
        off = tap.makeService(parse(*argv, "tcp:0", "--no-sandbox"))
        self.assertIsNotNone(on._confinement)  # type: ignore[attr-defined]
        self.assertIsNone(off._confinement)  # type: ignore[attr-defined]
        self.assertIn("no-sandbox", tap.PROCESS_WIDE)
