"""
TLS peers that do what Python's ssl module cannot (send a KeyUpdate, ask
for a renegotiation), driving the system's libssl through ctypes: one that
floods KeyUpdates asking for one back and never reads, over a socket of the
test's (the attack of the security review's first finding); and one over
memory buffers (L{MemoryTLS}), whose bytes the test carries.
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
for _name in ["SSL_read", "SSL_write"]:
    getattr(_SSL, _name).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
for _name in ["SSL_shutdown", "SSL_renegotiate"]:
    getattr(_SSL, _name).argtypes = [ctypes.c_void_p]
_SSL.SSL_set_connect_state.argtypes = [ctypes.c_void_p]
_SSL.SSL_set_accept_state.argtypes = [ctypes.c_void_p]
_SSL.SSL_is_init_finished.argtypes = [ctypes.c_void_p]
_SSL.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
_SSL.SSL_ctrl.restype = ctypes.c_long
_SSL.SSL_set_bio.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_SSL.BIO_s_mem.restype = ctypes.c_void_p
_SSL.BIO_new.restype = ctypes.c_void_p
_SSL.BIO_new.argtypes = [ctypes.c_void_p]
_SSL.BIO_read.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
_SSL.BIO_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
_SSL.ERR_clear_error.argtypes = []
SSL_KEY_UPDATE_REQUESTED = 1
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
SSL_ERROR_ZERO_RETURN = 6
SSL_FILETYPE_PEM = 1
SSL_CTRL_SET_TLSEXT_HOSTNAME = 55
SSL_CTRL_SET_MAX_PROTO_VERSION = 124
TLS1_2_VERSION = 0x0303
TLS1_3_VERSION = 0x0304


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


class MemoryTLS:
    """
    One end of a TLS connection over memory buffers: the test feeds it the
    peer's bytes (L{feed}) and carries away its own (L{output}).  A client
    (verifying nothing, naming C{sni}) unless C{cert} and C{key} (PEM files)
    make it a server; C{version}: the highest TLS version it speaks.
    """

    def __init__(
        self,
        cert: str | None = None,
        key: str | None = None,
        version: int = TLS1_3_VERSION,
        sni: bytes | None = None,
    ) -> None:
        server = cert is not None
        method = _SSL.TLS_server_method() if server else _SSL.TLS_client_method()
        self._ctx = _SSL.SSL_CTX_new(method)
        if server:
            _SSL.SSL_CTX_use_certificate_chain_file(self._ctx, str(cert).encode())
            _SSL.SSL_CTX_use_PrivateKey_file(
                self._ctx, str(key).encode(), SSL_FILETYPE_PEM
            )
        self._ssl = _SSL.SSL_new(self._ctx)
        _SSL.SSL_ctrl(self._ssl, SSL_CTRL_SET_MAX_PROTO_VERSION, version, None)
        if sni is not None:
            _SSL.SSL_ctrl(self._ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, 0, sni)
        self._in = _SSL.BIO_new(_SSL.BIO_s_mem())
        self._out = _SSL.BIO_new(_SSL.BIO_s_mem())
        _SSL.SSL_set_bio(self._ssl, self._in, self._out)  # (the SSL owns them)
        state = _SSL.SSL_set_accept_state if server else _SSL.SSL_set_connect_state
        state(self._ssl)
        self.version = version
        self.failed = False  # a TLS error: an alert is all it sends after
        self.closed = False  # the peer's close_notify came

    def _check(self, result: int) -> int:
        """
        What a libssl call returned: C{result} if positive; else 0 if it
        wants the peer's bytes, or minus SSL_get_error's code (a TLS error,
        not the peer's close_notify, marks it L{failed}).
        """
        if result > 0:
            return result
        error = _SSL.SSL_get_error(self._ssl, result)
        _SSL.ERR_clear_error()
        if error == SSL_ERROR_WANT_READ:
            return 0
        if error != SSL_ERROR_ZERO_RETURN:
            self.failed = True
        return -error

    def handshake(self) -> bool:
        """Go on with the handshake, as far as the peer's bytes allow: done?"""
        if not self.failed and not self.done:
            self._check(_SSL.SSL_do_handshake(self._ssl))
        return self.done

    @property
    def done(self) -> bool:
        return bool(_SSL.SSL_is_init_finished(self._ssl))

    def feed(self, data: bytes) -> None:
        """The peer's bytes, as they came."""
        _SSL.BIO_write(self._in, data, len(data))

    def output(self) -> bytes:
        """What it has to send to the peer, taken."""
        chunks = []
        buffer = ctypes.create_string_buffer(65536)
        while (n := _SSL.BIO_read(self._out, buffer, len(buffer))) > 0:
            chunks.append(buffer.raw[:n])
        return b"".join(chunks)

    def read(self) -> bytes:
        """The application bytes the peer's bytes make (then, maybe, L{closed})."""
        chunks = []
        buffer = ctypes.create_string_buffer(65536)
        while not self.failed:
            n = self._check(_SSL.SSL_read(self._ssl, buffer, len(buffer)))
            if n <= 0:
                self.closed = self.closed or n == -SSL_ERROR_ZERO_RETURN
                break
            chunks.append(buffer.raw[:n])
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        """Send C{data} (the handshake done: memory takes it all)."""
        if data and self._check(_SSL.SSL_write(self._ssl, data, len(data))) <= 0:
            raise OSError("SSL_write failed")

    def shutdown(self) -> None:
        """Send close_notify (during a handshake: nothing)."""
        _SSL.SSL_shutdown(self._ssl)
        _SSL.ERR_clear_error()

    def key_update(self, count: int) -> None:
        """Send C{count} KeyUpdates that ask for one back (TLS 1.3)."""
        for _ in range(count):
            _SSL.SSL_key_update(self._ssl, SSL_KEY_UPDATE_REQUESTED)
            self._check(_SSL.SSL_do_handshake(self._ssl))

    def renegotiate(self) -> None:
        """Ask for a renegotiation (TLS 1.2): a ClientHello, or a HelloRequest."""
        _SSL.SSL_renegotiate(self._ssl)
        self._check(_SSL.SSL_do_handshake(self._ssl))

    def free(self) -> None:
        """Free libssl's objects (the test's to call, once)."""
        _SSL.SSL_free(self._ssl)
        _SSL.SSL_CTX_free(self._ctx)
