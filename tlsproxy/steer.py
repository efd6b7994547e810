"""
C{--steer-clients N}: every connection from one client address to the same
one of the N processes that share a port with C{--reuse-port}, so that its
TLS sessions, which only the process that made them can resume, resume.

A classic BPF program attached to the port's C{SO_REUSEPORT} group (Linux's
C{SO_ATTACH_REUSEPORT_CBPF}, socket(7)) returns the index of the socket
that gets each new connection: the client's address modulo N.  Sockets are
numbered in the order they began to listen; when one closes, the last one
takes its number.  An index past the group's size (while a process
restarts) falls back to the kernel's own hash.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51  # (Linux's; Python's socket module lacks it)
_IP = -0x100000  # SKF_NET_OFF: loads from there are from the IP header


def program(processes: int) -> list[tuple[int, int, int, int]]:
    """The BPF instructions (code, jump if true, jump if false, operand)."""
    return [
        (0x30, 0, 0, _IP),  # A = the IP header's first byte
        (0x74, 0, 0, 4),  # A >>= 4: the IP version
        (0x15, 0, 2, 6),  # if A == 6 go on, else skip two
        (0x20, 0, 0, _IP + 20),  # A = the IPv6 source's last 32 bits
        (0x05, 0, 0, 1),  # skip one
        (0x20, 0, 0, _IP + 12),  # A = the IPv4 source
        (0x94, 0, 0, processes),  # A %= processes
        (0x16, 0, 0, 0),  # return A: the index of the socket
    ]


def steer(listening: socket.socket, processes: int) -> None:
    """
    Attach the program for C{processes} to the C{SO_REUSEPORT} group of
    C{listening} (it then applies to every socket of the group).

    @raise OSError: the kernel refuses it (not Linux, or no such group).
    """
    code = b"".join(struct.pack("=HBBi", *op) for op in program(processes))
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog: the instruction count, and a pointer to them.
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buffer))
    listening.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
