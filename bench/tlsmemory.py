"""
What one idle server-side TLS connection costs in the TLS library alone: the
heap (glibc's count of bytes in use) per connection object, fresh and after
a TLS 1.3 handshake, for the OpenSSL that tlsproxy runs on (pyOpenSSL, over
the OpenSSL inside the cryptography wheel) and for the system's OpenSSL,
the one stunnel, hitch, HAProxy and nginx use here (through Python's ssl).

    python bench/tlsmemory.py [CERT KEY]

Then the same after 64 KiB went to the client: an OpenSSL memory BIO keeps
the largest buffer it held for the connection's life (tlsproxy no longer
swaps it for a new one: pyOpenSSL has no public call for that).

In memory: no sockets.  The client is Python's ssl (its key share: X25519,
as openssl s_client's and the benchmark's); the last row's client is
pyOpenSSL, whose OpenSSL offers X25519MLKEM768 first, as browsers now do.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from OpenSSL import SSL

COUNT = 2000


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                     "fsmblks", "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap() -> int:
    """Bytes that malloc has handed out and not had back."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def per_object(make: Callable[[], object]) -> float:
    """KiB of heap that each of C{COUNT} objects from C{make} holds on to."""
    kept = [make() for _ in range(20)]  # warm up: caches, lazy loading
    gc.collect()
    before = heap()
    kept = [make() for _ in range(COUNT)]
    gc.collect()
    used = heap() - before
    del kept
    return used / COUNT / 1024


def stdlib_client() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


class StdlibSide:
    """One end, in Python's ssl over the system's OpenSSL."""

    def __init__(self, context: ssl.SSLContext, server: bool) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server)

    def step(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()

    def take(self) -> bytes:
        return self.outgoing.read()

    def version(self) -> str | None:
        return self.tls.version()

    def drain(self) -> None:
        """Read what the peer sent, and drop it."""
        with contextlib.suppress(ssl.SSLWantReadError):
            while self.tls.read(65536):
                pass

    def give(self, data: bytes) -> None:
        self.incoming.write(data)


class PyOpenSSLSide:
    """One end, in pyOpenSSL over the cryptography wheel's OpenSSL."""

    def __init__(self, context: SSL.Context, server: bool) -> None:
        self.tls = SSL.Connection(context, None)
        (self.tls.set_accept_state if server else self.tls.set_connect_state)()

    def step(self) -> None:
        with contextlib.suppress(SSL.WantReadError):
            self.tls.do_handshake()

    def take(self) -> bytes:
        try:
            return self.tls.bio_read(65536)
        except SSL.WantReadError:
            return b""

    def give(self, data: bytes) -> None:
        if data:  # (pyOpenSSL refuses an empty write)
            self.tls.bio_write(data)

    def version(self) -> str:
        return self.tls.get_protocol_version_name()


Side = StdlibSide | PyOpenSSLSide


def handshake(server: Side, client: Side) -> Side:
    """Run the handshake in memory; keep only the server's end."""
    for _ in range(5):
        client.step()
        server.give(client.take())
        server.step()
        client.give(server.take())
    client.step()
    server.give(client.take())
    server.step()
    return server


def relayed(server: PyOpenSSLSide, client: StdlibSide) -> Side:
    """64 KiB sent to the client in 16 KiB records, as Twisted does; then idle."""
    for _ in range(4):
        server.tls.send(b"x" * 16384)
        client.give(server.take())
        client.drain()
    return server


def main() -> None:
    cert, key = sys.argv[1:3] if len(sys.argv) == 3 else self_signed()
    ours = SSL.Context(SSL.TLS_METHOD)
    ours.use_certificate_file(cert)
    ours.use_privatekey_file(key)
    ours.set_mode(SSL.MODE_RELEASE_BUFFERS)  # as tlsproxy does
    system = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    system.load_cert_chain(cert, key)
    client, browser = stdlib_client(), SSL.Context(SSL.TLS_METHOD)

    def check(server: Side) -> Side:
        assert server.version() == "TLSv1.3", "the handshake did not complete"
        return server

    rows = [
        (
            f"pyOpenSSL, {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}",
            per_object(lambda: PyOpenSSLSide(ours, True)),
            per_object(
                lambda: check(
                    handshake(PyOpenSSLSide(ours, True), StdlibSide(client, False))
                )
            ),
        ),
        (
            f"Python's ssl, {ssl.OPENSSL_VERSION}",
            per_object(lambda: StdlibSide(system, True)),
            per_object(
                lambda: check(
                    handshake(StdlibSide(system, True), StdlibSide(client, False))
                )
            ),
        ),
        (
            "pyOpenSSL, client offering X25519MLKEM768",
            float("nan"),
            per_object(
                lambda: check(
                    handshake(PyOpenSSLSide(ours, True), PyOpenSSLSide(browser, False))
                )
            ),
        ),
    ]
    print(f"KiB of heap per server TLS connection, mean of {COUNT}:")
    print(f"  {'library':<48} {'fresh':>6} {'after TLS 1.3 handshake':>24}")
    for name, fresh, done in rows:
        shown = "" if fresh != fresh else f"{fresh:.1f}"
        print(f"  {name:<48} {shown:>6} {done:>24.1f}")

    def after() -> Side:
        server, peer = PyOpenSSLSide(ours, True), StdlibSide(client, False)
        handshake(server, peer)
        return relayed(server, peer)

    print("\nThe first row's, idle after 64 KiB sent in 16 KiB records:")
    print(f"  {'kept as it is':<48} {per_object(after):>6.1f}")


def self_signed() -> tuple[str, str]:
    """An ECDSA P-256 certificate and key, in a temporary directory."""
    where = Path(tempfile.mkdtemp())
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


if __name__ == "__main__":
    main()
