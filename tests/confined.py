"""
The child process of C{tests/test_sandbox.py}: confines itself as the proxy
would, then tries things and says, as JSON on stdout, what happened.

    python confined.py SPEC

SPEC is JSON: C{readable}, C{ports}, C{ephemeral} and C{rotating} (passed to
L{confine}), C{confine}
(false: a control run, not confined), C{thread} (start a second thread
first), C{preopen} (a file opened for appending before confining, or null)
and C{probes}, a list of C{[name, argument]}.

The first line out is C{{"confinement": line}} or C{{"error": str(e)}} (then
the process exits); it then waits for a line on stdin (the parent may change
files meanwhile), runs the probes, and writes C{{"results": [...]}}: for each
probe, C{"ok"} or what it read, or the C{errno} name it failed
with.

Everything is imported before confining: afterwards no module can be read.
"""

from __future__ import annotations

import ctypes
import encodings.idna  # noqa: F401  (socket calls may import it lazily)
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from tlsproxy.sandbox import SandboxError, confine


def _connect(
    family: socket.AddressFamily, address: str | tuple[str, int], protocol: int = 0
) -> None:
    with socket.socket(family, socket.SOCK_STREAM, protocol) as s:
        s.settimeout(5)
        s.connect(address)


def _ptrace(pid: int) -> None:
    """Attach to the process C{pid} (stopping it), then detach."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(ctypes.c_long(16), ctypes.c_long(pid), None, None) == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    os.waitpid(pid, 0)
    libc.ptrace(ctypes.c_long(17), ctypes.c_long(pid), None, None)


def _probes(preopened: int | None) -> dict[str, Callable[[Any], object]]:
    """Each probe: C{None} when it did it, or what it read."""
    received: list[int] = []
    signal.signal(signal.SIGUSR1, lambda *_: received.append(1))

    def read(path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def signal_self(_: object) -> str | None:
        os.kill(os.getpid(), signal.SIGUSR1)
        return None if received else "not delivered"

    return {
        "read": read,
        "listdir": os.listdir,
        "create": lambda path: open(path, "x").close(),
        "open-write": lambda path: os.close(os.open(path, os.O_WRONLY)),
        "exec": lambda _: subprocess.run([sys.executable, "-c", ""], check=True),
        "connect": lambda port: _connect(socket.AF_INET, ("127.0.0.1", port)),
        "connect-mptcp": lambda port: _connect(
            socket.AF_INET, ("127.0.0.1", port), socket.IPPROTO_MPTCP
        ),
        "bind": lambda port: socket.socket().bind(("127.0.0.1", port)),
        "rename": lambda paths: os.rename(*paths),
        "append": lambda path: open(path, "ab").close(),
        "new-log": lambda path: open(path, "wb+").close(),
        "kill": lambda pid: os.kill(pid, 0),
        "ptrace": _ptrace,
        "signal-self": signal_self,
        "abstract-unix": lambda name: _connect(socket.AF_UNIX, "\0" + name),
        "unix": lambda path: _connect(socket.AF_UNIX, path),
        "write-preopened": lambda text: os.write(preopened, text.encode()),
    }


def _run(probe: Callable[[Any], object], argument: object) -> object:
    try:
        value = probe(argument)
    except OSError as e:
        return errno.errorcode[e.errno]
    return value if isinstance(value, str) else "ok"


def main(spec: dict[str, Any]) -> None:
    preopen = spec["preopen"]
    preopened = os.open(preopen, os.O_WRONLY | os.O_APPEND) if preopen else None
    probes = _probes(preopened)
    if spec["thread"]:
        threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()
    shown = None
    if spec["confine"]:
        try:
            shown = confine(
                spec["readable"], spec["ports"], spec["ephemeral"], spec["rotating"]
            )
        except SandboxError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            return
        assert shown is not None, "no Landlock: the parent should have skipped"
    print(json.dumps({"confinement": shown}), flush=True)
    sys.stdin.readline()
    results = [_run(probes[name], argument) for name, argument in spec["probes"]]
    print(json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
