"""The server's TLS contexts, one per certificate, chosen by the SNI name."""

from __future__ import annotations

import functools
import sys
import typing
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL.SSL import Connection
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from .credentials import Credentials, Identity, read_credentials
from .flow import CountingConnection
from .peer import server_name
from .values import ConfigError, TLSPolicy

_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_SINGLE_ECDH_USE
_OPTIONS |= SSL.OP_CIPHER_SERVER_PREFERENCE
UNKNOWN_NAME = "unknown server name (--sni-strict)"
DEFAULT_POLICY = TLSPolicy()


def openssl_reasons(error: Exception) -> str:
    """OpenSSL's reason strings ("key values mismatch"), else the error."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue:
        return ", ".join(str(entry[-1]) for entry in queue)
    return str(error)


def server_context(
    identity: Identity, policy: TLSPolicy, client_cas: Sequence[x509.Certificate]
) -> SSL.Context:
    """
    An OpenSSL context for C{identity} under C{policy}, requiring a client
    certificate from C{client_cas} if any; ConfigError if OpenSSL refuses it.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(policy.minimum)
    context.set_options(_OPTIONS)
    # Free a connection's buffers while idle: 29 KiB per idle connection, not 50.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(policy.ciphers.encode("ascii"))
    # Always a callback: an ALPN offer never fails the handshake (DESIGN.md).
    choose = functools.partial(_choose_protocol, policy.alpn)
    context.set_alpn_select_callback(choose)  # type: ignore[arg-type]
    # No session cache: TLS 1.2 never resumes (see _choose_certificate).
    context.set_session_id(b"tlsproxy")
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        context.use_certificate(identity.chain[0])
        for extra in identity.chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(identity.key)  # type: ignore[arg-type]
        context.check_privatekey()
    except (SSL.Error, TypeError) as e:  # TypeError: a key type OpenSSL won't use
        raise ConfigError(f"{identity.where}: {openssl_reasons(e)}") from None
    store = context.get_cert_store()
    assert store is not None
    for authority in map(crypto.X509.from_cryptography, client_cas):
        store.add_cert(authority)
        context.add_client_ca(authority)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return context


def _choose_protocol(
    ours: tuple[bytes, ...], connection: Connection, theirs: list[bytes]
) -> object:
    """The first of our ALPN protocols the client offers; else none (as nginx)."""
    return next((p for p in ours if p in theirs), SSL.NO_OVERLAPPING_PROTOCOLS)


def _sni_context(
    credentials: Credentials, policy: TLSPolicy, strict: bool
) -> SSL.Context:
    """A context per identity; connections start on the first, then switch."""
    contexts: list[SSL.Context] = []
    by_name: dict[str, SSL.Context] = {}
    for identity in credentials.identities:
        contexts.append(server_context(identity, policy, credentials.client_cas))
        for name in identity.names():
            by_name.setdefault(name, contexts[-1])  # the first given wins
    contexts[0].set_tlsext_servername_callback(
        functools.partial(_choose_certificate, by_name, strict)
    )
    return contexts[0]


def _choose_certificate(
    by_name: dict[str, SSL.Context], strict: bool, connection: Connection
) -> None:
    """
    The certificate naming the SNI name, or a wildcard, or the default (or for
    C{strict}, an alert); no ticket for TLS 1.2 (resumed, it hides the name).
    """
    if connection.get_protocol_version() < SSL.TLS1_3_VERSION:
        connection.set_options(SSL.OP_NO_TICKET)
    name = server_name(connection)
    if name is None:
        return
    context = by_name.get(name) or by_name.get("*." + name.partition(".")[2])
    if context is not None:
        connection.set_context(context)
    elif strict:
        typing.cast(ServerConnection, connection).refusal = UNKNOWN_NAME
        _refuse()


def _refuse() -> typing.NoReturn:
    """
    Fail the handshake with C{unrecognized_name}: pyOpenSSL sends it when the
    SNI callback raises, after calling C{sys.excepthook}: hooked, once.
    """
    previous = sys.excepthook

    def taken(*exc_info: object) -> None:
        sys.excepthook = previous

    sys.excepthook = taken
    raise _UnknownNameError(UNKNOWN_NAME)


class _UnknownNameError(Exception):
    """A client's SNI name that no certificate serves, in strict mode."""


@implementer(IOpenSSLServerConnectionCreator)
@attrs.define
class Certificates:
    """Each new connection's TLS context; L{reload} the files, L{rotate} the keys."""

    read: Callable[[], Credentials]
    policy: TLSPolicy = DEFAULT_POLICY
    strict: bool = False
    credentials: Credentials = attrs.field(init=False)
    context: SSL.Context = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Read the files and use them; ConfigError (the old ones stay) if bad."""
        credentials = self.read()
        self.context = _sni_context(credentials, self.policy, self.strict)
        self.credentials = credentials

    def rotate(self) -> None:
        """New ticket keys (a new context): older sessions no longer resume."""
        self.context = _sni_context(self.credentials, self.policy, self.strict)

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> Connection:
        return ServerConnection(self.context, None)


def from_files(
    certs: Sequence[str] = (),
    keys: Sequence[str] = (),
    *,
    client_ca: str | None = None,
    identities: Sequence[Identity] = (),
    policy: TLSPolicy = DEFAULT_POLICY,
    strict: bool = False,
) -> Certificates:
    """The certificates of these files (L{read_credentials}), now and on reload."""
    read = functools.partial(
        read_credentials, tuple(certs), tuple(keys), client_ca, tuple(identities)
    )
    return Certificates(read, policy, strict)


class ServerConnection(CountingConnection):
    """An accepted connection, which can tell why TLS refused it, if it did."""

    refusal: str | None = None
