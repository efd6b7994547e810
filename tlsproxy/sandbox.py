"""
Landlock, by the system calls of C{<linux/landlock.h>} through ctypes.  A rule
holds an inode: a file renamed into place later cannot be read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
import threading
from collections.abc import Iterable
from contextlib import ExitStack, suppress

# One number on both (x86_64's table and asm-generic's).
_ARCHITECTURES = frozenset({("Linux", "x86_64"), ("Linux", "aarch64")})
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_READ_FILE, _READ_DIR = 1 << 2, 1 << 3
# WRITE_FILE, READ_FILE, REMOVE_FILE, MAKE_REG, TRUNCATE: twistd's rotation.
_ROTATE = 1 << 1 | 1 << 2 | 1 << 5 | 1 << 8 | 1 << 14
KNOWN_ABI = 7
_TASKS = "/proc/self/task"


class SandboxError(Exception):
    """Landlock is there but cannot confine the process; C{str()}: one line."""


def handled(abi: int) -> tuple[int, int, int]:
    """The file rights, network rights and scopes ABI C{abi} knows: all handled."""
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    return fs if abi else 0, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0


def _libc(function: str, *args: int | bytes | None) -> int:
    """libc's C{function} (tests replace it); -1 raised as OSError."""
    call = getattr(ctypes.CDLL(None, use_errno=True), function)
    result: int = call(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


def abi() -> int:
    """The kernel's Landlock ABI; 0 without Landlock, or not Linux on these CPUs."""
    if (platform.system(), platform.machine()) not in _ARCHITECTURES:
        return 0
    try:
        return _libc("syscall", _CREATE_RULESET, None, 0, 1)  # (..._VERSION)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):  # not built, not enabled
            return 0
        raise SandboxError(f"cannot ask for the Landlock ABI: {e.strerror}") from None


def _threads() -> int:
    """This process's threads: the kernel's count (without /proc: Python's)."""
    try:
        tasks = len(os.listdir(_TASKS))
    except OSError:
        tasks = 0
    return max(tasks, threading.active_count())


def confine(
    readable: Iterable[str],
    connect: Iterable[int],
    ephemeral: bool = False,
    rotating: str | None = None,
) -> str | None:
    """
    Confine this one-thread process for good, at its ABI, to reading
    C{readable} (a directory: listing it), a log's rotation in C{rotating},
    TCP connect to C{connect} and binding ephemeral ports if C{ephemeral};
    signals and abstract UNIX sockets scoped.  What is enforced, in a line;
    None: no Landlock.  SandboxError: it failed, maybe half done (exit).
    """
    version = min(abi(), KNOWN_ABI)
    if version == 0:
        return None
    if (threads := _threads()) > 1:
        raise SandboxError(f"cannot confine: {threads} threads, Landlock needs one")
    fs, net, scoped = handled(version)
    ports = sorted(set(connect))
    rules = [(2, struct.pack("=QQ", 1 << 1, port)) for port in ports if net]
    rules += [(2, struct.pack("=QQ", 1 << 0, 0))] if net and ephemeral else []
    wanted = [(path, _READ_FILE) for path in dict.fromkeys(readable)]
    read: list[str] = []
    rotates = ""
    with ExitStack() as stack:
        try:
            for path, right in wanted + ([(rotating, _ROTATE)] if rotating else []):
                with suppress(FileNotFoundError):
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                    stack.callback(os.close, fd)
                    if right == _READ_FILE and stat.S_ISDIR(os.fstat(fd).st_mode):
                        right = _READ_DIR
                    rules.append((1, struct.pack("=Qi", right & fs, fd)))  # BENEATH
                    if right == _ROTATE:
                        rotates = f", rotate logs in {path}"
                    else:
                        read.append(path)
            _libc("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            attr = struct.pack("=QQQ", fs, net, scoped)  # landlock_ruleset_attr
            ruleset = _libc("syscall", _CREATE_RULESET, attr, len(attr), 0)
            stack.callback(os.close, ruleset)
            for kind, rule in rules:
                _libc("syscall", _ADD_RULE, ruleset, kind, rule, 0)
            _libc("syscall", _RESTRICT_SELF, ruleset, 0)
        except OSError as e:
            where = e.filename or "Landlock"
            raise SandboxError(f"cannot confine: {where}: {e.strerror}") from None
    tcp = "TCP not confined (ABI < 4)"
    if net:
        binds = "ephemeral ports" if ephemeral else "none"
        tcp = f"TCP connect to port(s) {ports or 'none'} only, bind {binds}"
    return (
        f"Landlock ABI {version}: read {read}"
        f"{rotates}, no other file access; {tcp}; signals and abstract UNIX"
        f" sockets{'' if scoped else ' not'} scoped to the process"
    )
