"""
A TLS 1.3 peer that floods KeyUpdate messages asking for one back, and
never reads: the attack of the security review's first finding.  Python's
ssl module cannot send a KeyUpdate, so this drives the system's libssl
through ctypes, over a socket of the test's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import select
import socket

_SSL = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
_SSL.TLS_client_method.restype = ctypes.c_void_p
_SSL.TLS_server_method.restype = ctypes.c_void_p
_SSL.SSL_CTX_new.restype = ctypes.c_void_p
_SSL.SSL_CTX_new.argtypes = [ctypes.c_void_p]
_SSL.SSL_new.restype = ctypes.c_void_p
_SSL.SSL_new.argtypes = [ctypes.c_void_p]
for _name in ["SSL_free", "SSL_connect", "SSL_accept", "SSL_do_handshake"]:
    getattr(_SSL, _name).argtypes = [ctypes.c_void_p]
_SSL.SSL_CTX_free.argtypes = [ctypes.c_void_p]
_SSL.SSL_set_fd.argtypes = [ctypes.c_void_p, ctypes.c_int]
_SSL.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
_SSL.SSL_get_error.argtypes = [ctypes.c_void_p, ctypes.c_int]
_SSL.SSL_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
_SSL.SSL_CTX_use_certificate_chain_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_SSL.SSL_CTX_use_PrivateKey_file.argtypes = [
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_int,
]
_SSL.SSL_CTX_set_options.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
_SSL.SSL_CTX_set_options.restype = ctypes.c_uint64
SSL_KEY_UPDATE_REQUESTED = 1
SSL_ERROR_WANT_WRITE = 3
SSL_FILETYPE_PEM = 1


class Flooder:
    """
    One TLS 1.3 connection over C{sock} (already connected), as a client,
    or as a server with C{cert} and C{key} (PEM files).
    """

    def __init__(
        self, sock: socket.socket, cert: str | None = None, key: str | None = None
    ) -> None:
        self.sock = sock
        server = cert is not None
        method = _SSL.TLS_server_method() if server else _SSL.TLS_client_method()
        self._ctx = _SSL.SSL_CTX_new(method)
        if server:
            _SSL.SSL_CTX_use_certificate_chain_file(self._ctx, str(cert).encode())
            _SSL.SSL_CTX_use_PrivateKey_file(
                self._ctx, str(key).encode(), SSL_FILETYPE_PEM
            )
        self._ssl = _SSL.SSL_new(self._ctx)
        _SSL.SSL_set_fd(self._ssl, sock.fileno())
        handshake = _SSL.SSL_accept if server else _SSL.SSL_connect
        if handshake(self._ssl) != 1:
            raise OSError("the flooder's TLS handshake failed")

    def write(self, data: bytes) -> None:
        """Send C{data}, blocking."""
        if _SSL.SSL_write(self._ssl, data, len(data)) != len(data):
            raise OSError("SSL_write failed")

    def flood(self, count: int, patience: float = 1.0) -> int:
        """
        Send up to C{count} KeyUpdates that ask for one back, never reading;
        stop early when the socket has taken nothing for C{patience}
        seconds (the other end stopped reading).  How many were sent.
        """
        self.sock.setblocking(False)
        for sent in range(count):
            _SSL.SSL_key_update(self._ssl, SSL_KEY_UPDATE_REQUESTED)
            while (result := _SSL.SSL_do_handshake(self._ssl)) != 1:
                error = _SSL.SSL_get_error(self._ssl, result)
                if error != SSL_ERROR_WANT_WRITE:
                    raise OSError(f"SSL_do_handshake: error {error}")
                if not select.select([], [self.sock], [], patience)[1]:
                    return sent
        return count

    def close(self) -> None:
        _SSL.SSL_free(self._ssl)
        _SSL.SSL_CTX_free(self._ctx)
        self.sock.close()
