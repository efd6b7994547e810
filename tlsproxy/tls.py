"""
The server's TLS context: certificates and keys loaded at start-up, chosen
by the client's SNI name, read again on reload.

Start-up runs before twistd chroots and drops privileges, so the key file
may stay outside the jail, readable by root only (a reload reads the files
inside the jail: see README.rst).  Every user mistake
becomes a L{ConfigError} whose message names the option and the value.
"""

from __future__ import annotations

import datetime
import functools
import glob
import ipaddress
import os
import stat
import sys
import typing
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import make_assert
from OpenSSL.SSL import _NoOverlappingProtocols  # (its type, for mypy)
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from typing_extensions import override
from zope.interface import implementer

from .peer import ClientIdentity, server_name

# TLS 1.2 suites: forward-secret (ECDHE) and AEAD only, strongest first.
# TLS 1.3 suites are all forward-secret AEAD; OpenSSL's defaults stand.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
    ]
)

_log = Logger(namespace="tlsproxy")

_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_SINGLE_ECDH_USE
)


class ConfigError(Exception):
    """
    A start-up mistake by the user; C{str()} is one line naming the option
    and the value.
    """


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{option} {path}: {e.strerror}") from None


def load_certificates(path: str) -> list[x509.Certificate]:
    """
    Read the leaf certificate and the chain after it from the PEM file
    C{path}, given by C{--cert}.

    @raise ConfigError: the file cannot be read or holds no certificate.
    """
    data = _read("--cert", path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"--cert {path}: no PEM certificate found") from None


def load_key(path: str) -> PrivateKeyTypes:
    """
    Read an unencrypted PEM private key from C{path}, given by C{--key} (or
    C{--cert} when the key is in the certificate's file).

    @raise ConfigError: the file cannot be read or holds no usable key.
    """
    data = _read("--key", path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o044:
        _log.warn(
            "--key {path}: mode {mode:04o}: group or others can read the"
            " private key (chmod 600 it)",
            path=path,
            mode=mode,
        )
    try:
        return load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        reason = str(e).split(".")[0]
        raise ConfigError(
            f"--key {path}: not a usable PEM private key ({reason})"
        ) from None


@attrs.frozen(kw_only=True)
class TLSPolicy:
    """
    What the server offers beyond its certificate: ALPN protocols, in its
    order of preference (none by default); the lowest TLS version (1.2 or
    1.3); the TLS 1.2 cipher string (TLS 1.3's suites are all AEAD).
    """

    alpn: tuple[bytes, ...] = ()
    minimum: int = SSL.TLS1_2_VERSION
    ciphers: str = TLS12_CIPHERS


DEFAULT_POLICY = TLSPolicy()


def _choose_protocol(
    ours: tuple[bytes, ...], connection: SSL.Connection, theirs: list[bytes]
) -> bytes | _NoOverlappingProtocols:
    """
    The first of our ALPN protocols that the client offers; else none, and
    the handshake goes on without ALPN (as nginx does).
    """
    return next((p for p in ours if p in theirs), SSL.NO_OVERLAPPING_PROTOCOLS)


def server_context(
    chain: list[x509.Certificate],
    key: PrivateKeyTypes,
    policy: TLSPolicy = DEFAULT_POLICY,
    client_cas: Sequence[x509.Certificate] = (),
) -> SSL.Context:
    """
    Build the server's OpenSSL context: TLS 1.2 and 1.3 only, forward-secret
    AEAD ciphers in the server's order, no compression, no renegotiation,
    session resumption by session ID and by ticket; and C{policy}.

    @param chain: the leaf certificate first, then its chain.
    @param key: the leaf's private key, as C{cryptography} loaded it.
    @param client_cas: if any, a client certificate signed by one of them
        is required.

    @raise SSL.Error: OpenSSL refuses the certificate or the key, or the
        key does not match the certificate.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(policy.minimum)
    context.set_options(_OPTIONS)
    # Free a connection's read and write buffers while idle: 29 KiB per idle
    # connection instead of 50 (bench/bench.py), at no cost in throughput.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(policy.ciphers.encode("ascii"))
    # Always a callback, so that a client's ALPN offer never fails the
    # handshake (Twisted 26.10's own contexts abort it, see DESIGN.md).
    context.set_alpn_select_callback(functools.partial(_choose_protocol, policy.alpn))
    # TLS 1.3 resumes by session tickets; TLS 1.2 never resumes (no session
    # cache; no ticket, see _choose_certificate): on a TLS 1.2 resumption
    # OpenSSL reports the session's server name, not the one the client sent.
    context.set_session_id(b"tlsproxy")
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.use_certificate(chain[0])
    for extra in chain[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(key)  # type: ignore[arg-type]
    context.check_privatekey()
    if client_cas:
        _require_client_certificates(context, client_cas)
    return context


def _require_client_certificates(
    context: SSL.Context, authorities: Sequence[x509.Certificate]
) -> None:
    """Ask for a client certificate, name C{authorities}, and verify with them."""
    store = context.get_cert_store()
    assert store is not None
    for authority in authorities:
        store.add_cert(crypto.X509.from_cryptography(authority))
    context.set_client_ca_list(
        [crypto.X509.from_cryptography(a).get_subject() for a in authorities]
    )
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)


def load_client_cas(path: str) -> tuple[x509.Certificate, ...]:
    """The CAs of client certificates: L{load_cas} for C{--client-ca}."""
    return load_cas("--client-ca", path)


def load_cas(option: str, path: str) -> tuple[x509.Certificate, ...]:
    """
    The certificate authorities in the PEM file C{path}, given by C{option}.

    @raise ConfigError: the file cannot be read or holds no certificate.
    """
    data = _read(option, path)
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise ConfigError(f"{option} {path}: no PEM certificate found") from None


@attrs.frozen(kw_only=True)
class AllowList:
    """
    Which client certificates are let in, as ghostunnel's C{--allow-*}: one
    with any of these subject CNs or OUs, or subjectAltName DNS names or
    URIs (see L{tlsproxy.peer.ClientIdentity}: a certificate with several
    CNs has none).  With no entry at all, any certificate the CA signed.
    """

    cn: frozenset[str] = frozenset()
    ou: frozenset[str] = frozenset()
    dns: frozenset[str] = frozenset()
    uri: frozenset[str] = frozenset()
    # The same, as the (kind, name) pairs of ClientIdentity.names: made once
    # here, not for every handshake.
    _wanted: frozenset[tuple[str, str]] = attrs.field(init=False, eq=False)

    @_wanted.default
    def _pairs(self) -> frozenset[tuple[str, str]]:
        kinds = {"cn": self.cn, "ou": self.ou, "dns": self.dns, "uri": self.uri}
        return frozenset((k, name) for k, names in kinds.items() for name in names)

    def refusal(self, identity: ClientIdentity | None) -> str | None:
        """Why the client of C{identity} is not let in, or C{None} if it is."""
        if not self._wanted or (identity and self._wanted & identity.names):
            return None
        return "client certificate not allowed"


ANY_CERTIFICATE = AllowList()


_CN = NameOID.COMMON_NAME


@attrs.frozen
class Identity:
    """
    One certificate the server can present: its chain (the leaf first), its
    key, and where they came from, for messages (C{"--cert A --key B"}).
    """

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    where: str

    def names(self) -> set[str]:
        """
        The server names it serves, lower case: its DNS names, or its CNs
        when it has none (as hitch does); C{*.example.com} is a wildcard.
        """
        leaf = self.chain[0]
        try:
            alternative = leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
            dns = alternative.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns = []
        cns = [str(a.value) for a in leaf.subject.get_attributes_for_oid(_CN)]
        return {name.lower() for name in dns or cns}


def _identity(cert_path: str, key_path: str) -> Identity:
    return Identity(
        chain=tuple(load_certificates(cert_path)),
        key=load_key(key_path),
        where=f"--cert {cert_path} --key {key_path}",
    )


@attrs.frozen
class Credentials:
    """
    What the files hold: the identities (the first is the default, for a
    client that names no server or one none of them serves) and the CAs
    that sign client certificates, if any are required.
    """

    identities: tuple[Identity, ...]
    client_cas: tuple[x509.Certificate, ...] = ()


def read_credentials(
    certs: Sequence[str] = (),
    keys: Sequence[str] = (),
    client_ca: str | None = None,
    identities: Sequence[Identity] = (),
) -> Credentials:
    """
    Read C{--cert} files (or directories), their C{--key} files (one per
    C{--cert}, or none: each C{--cert} file then holds its key) and the
    C{--client-ca} file; C{identities} made in memory come first.

    @raise ConfigError: on any problem with any file.
    """
    if not (certs or identities):
        raise ConfigError("--cert FILE (or --self-signed NAME) is required")
    if keys and len(keys) != len(certs):
        raise ConfigError(
            f"--key: {len(keys)} given for {len(certs)} --cert: give one per"
            " --cert, or none (each --cert file then holds its key)"
        )
    read = list(identities)
    paired: Sequence[str | None] = keys or [None] * len(certs)
    for cert, key in zip(certs, paired, strict=True):
        read += _identities(cert, key)
    cas = () if client_ca is None else load_client_cas(client_ca)
    return Credentials(tuple(read), cas)


def _identities(cert: str, key: str | None) -> list[Identity]:
    """
    One identity from a certificate file, or one from each C{*.pem} file of
    a directory (in name order; each file holds its key).
    """
    if not os.path.isdir(cert):
        return [_identity(cert, key or cert)]
    if key is not None:
        raise ConfigError(f"--cert {cert} --key {key}: a directory takes no --key")
    paths = sorted(glob.glob(os.path.join(glob.escape(cert), "*.pem")))
    if not paths:
        raise ConfigError(f"--cert {cert}: no readable .pem file in the directory")
    return [_identity(path, path) for path in paths]


def _sni_context(
    credentials: Credentials, policy: TLSPolicy, strict: bool
) -> SSL.Context:
    """
    A context for each identity, and the first one's, which every
    connection starts on, switches to the one that serves the client's SNI
    name (L{_choose_certificate}).

    @raise ConfigError: OpenSSL refuses a certificate or key, or they do not
        match.
    """
    contexts: list[SSL.Context] = []
    by_name: dict[str, SSL.Context] = {}
    for identity in credentials.identities:
        try:
            context = server_context(
                list(identity.chain), identity.key, policy, credentials.client_cas
            )
        except (SSL.Error, TypeError) as e:  # TypeError: a key type OpenSSL won't use
            raise ConfigError(f"{identity.where}: {openssl_reasons(e)}") from None
        contexts.append(context)
        for name in identity.names():
            by_name.setdefault(name, context)  # the first given wins
    contexts[0].set_tlsext_servername_callback(
        functools.partial(_choose_certificate, by_name, strict)
    )
    return contexts[0]


def _choose_certificate(
    by_name: dict[str, SSL.Context], strict: bool, connection: SSL.Connection
) -> None:
    """
    Serve the certificate for the client's SNI name: one that names it, or
    else one with a wildcard for its parent domain.  With no SNI name, the
    default; with a name no certificate serves (or one that is not a host
    name), the default, or in C{strict} mode the C{unrecognized_name} alert
    (hitch's C{sni-nomatch-abort}).  OpenSSL calls this for every
    ClientHello, so it is also where a TLS 1.2 connection is denied a
    session ticket.
    """
    if connection.get_protocol_version() < SSL.TLS1_3_VERSION:
        connection.set_options(SSL.OP_NO_TICKET)
    name = server_name(connection)
    if name is None:
        return
    parent = name.partition(".")[2]
    context = by_name.get(name) or by_name.get(f"*.{parent}")
    if context is not None:
        connection.set_context(context)
    elif strict:
        typing.cast(ServerConnection, connection).refusal = UNKNOWN_NAME
        _refuse_name()


UNKNOWN_NAME = "unknown server name (--sni-strict)"


class UnknownServerNameError(Exception):
    """A client's SNI name that no certificate serves, in strict mode."""


def _refuse_name() -> typing.NoReturn:
    """
    Fail the handshake with the C{unrecognized_name} alert: pyOpenSSL sends
    it when the SNI callback raises, after handing the exception to
    C{sys.excepthook}, which would print a traceback for each such client.
    A hook for that one call takes it, and puts the previous hook back.
    """
    previous = sys.excepthook

    def taken(*exc_info: object) -> None:
        sys.excepthook = previous

    sys.excepthook = taken
    raise UnknownServerNameError


@attrs.define
class Certificates:
    """
    The server's TLS context, and how to make it again: L{reload} reads the
    files again (C{SIGHUP}), L{rotate} makes new session ticket keys from the
    certificates already read.  Each replaces L{context} for new
    connections; live ones keep theirs.
    """

    read: Callable[[], Credentials]
    policy: TLSPolicy = DEFAULT_POLICY
    strict: bool = False
    credentials: Credentials = attrs.field(init=False)
    context: SSL.Context = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.reload()

    def reload(self) -> None:
        """
        Read the files and use them.

        @raise ConfigError: on any problem with any file; the old
            certificates stay in use.
        """
        credentials = self.read()
        self.context = _sni_context(credentials, self.policy, self.strict)
        self.credentials = credentials

    def rotate(self) -> None:
        """
        New session ticket keys (OpenSSL makes them for each new context),
        and a new session cache: sessions made before no longer resume.
        """
        self.context = _sni_context(self.credentials, self.policy, self.strict)


def from_files(
    certs: Sequence[str] = (),
    keys: Sequence[str] = (),
    *,
    client_ca: str | None = None,
    identities: Sequence[Identity] = (),
    policy: TLSPolicy = DEFAULT_POLICY,
    strict: bool = False,
) -> Certificates:
    """
    The certificates of C{--cert certs --key keys --client-ca client_ca}
    (see L{read_credentials}), read now and again on each
    L{Certificates.reload}.

    @raise ConfigError: on any problem with any file.
    """
    read = functools.partial(
        read_credentials, tuple(certs), tuple(keys), client_ca, tuple(identities)
    )
    return Certificates(read, policy, strict)


def openssl_reasons(error: Exception) -> str:
    """OpenSSL's reason strings ("key values mismatch"), else the error."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue:
        return ", ".join(str(entry[-1]) for entry in queue)
    return str(error)


@attrs.frozen
class SelfSigned:
    """
    A throwaway certificate made in memory for C{--self-signed}: never
    written to disk.
    """

    identity: Identity
    fingerprint: str  # SHA-256, colon-separated hex, as openssl prints it


def self_signed(name: str) -> SelfSigned:
    """
    Make a P-256 key and a 30-day self-signed certificate for C{name} (a DNS
    name or an IP address).

    @raise ConfigError: C{name} cannot be a certificate's name.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        alt = _alternative_name(name)
    except ValueError as e:
        raise ConfigError(f"--self-signed {name}: {e}") from None
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .sign(key, hashes.SHA256())
    )
    digest = certificate.fingerprint(hashes.SHA256())
    return SelfSigned(
        identity=Identity((certificate,), key, f"--self-signed {name}"),
        fingerprint=":".join(f"{byte:02X}" for byte in digest),
    )


def _alternative_name(name: str) -> x509.GeneralName:
    """
    An IP address, or a DNS name (ASCII: an internationalized name in its
    A-label form).

    @raise ValueError: C{name} is neither.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen
class ServerTLS:
    """
    Give each accepted connection an OpenSSL connection on the current
    context of C{certificates}.

    Twisted's C{CertificateOptions} is not used: it turns sessions off, and
    in Twisted 26.10 it aborts every handshake that offers ALPN unless it is
    given protocols to offer.
    """

    certificates: Certificates

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return ServerConnection(self.certificates.context, None)


_made = make_assert(SSL.Error)  # (pyOpenSSL's check that OpenSSL allocated)


class CountingConnection(SSL.Connection):
    """An OpenSSL connection that counts the bytes TLS gives its transport."""

    written = 0

    @override
    def bio_read(self, bufsiz: int) -> bytes:
        data = super().bio_read(bufsiz)
        self.written += len(data)
        return data


@implementer(IPushProducer)
class _Drain:
    """
    The producer a L{TLSProtocol} keeps registered with its transport from
    the start: the transport's buffer is full while it is paused.  Pausing
    and resuming pass on to the layer above's producer, if it has one.  A
    transport that is closing waits for its producer to resume; then this
    one steps aside, and the transport closes.
    """

    def __init__(self, tls: TLSProtocol) -> None:
        self.tls = tls
        self.above: IPushProducer | None = None

    def pauseProducing(self) -> None:
        self.tls.full = True
        if self.above is not None:
            self.above.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self.tls.transport
        if transport.disconnecting:  # type: ignore[union-attr]
            transport.unregisterProducer()  # type: ignore[union-attr]
            return
        self.tls.drained()
        if self.above is not None:
            self.above.resumeProducing()

    def stopProducing(self) -> None:
        if self.above is not None:
            self.above.stopProducing()


class TLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS protocol, which stops reading from its peer while what
    TLS itself answers to that peer's bytes (a KeyUpdate that asks for one,
    an alert) waits in a full transport buffer: however the peer sends, the
    layer holds at most one read's answers beyond the buffer, from the
    handshake to the close (OpenSSL answers even after its close_notify).
    The layer above pauses and resumes reading as before: the transport
    reads while neither it nor an answer holds it.  The layer above's
    producer is never the TLS layer's own, so that L{loseConnection} sends
    close_notify at once, whatever is registered.  It needs a
    L{CountingConnection}.
    """

    full = False  # the transport's buffer is full
    _held = False  # by the layer above
    _answering = False  # answers wait in the full buffer

    @override
    def makeConnection(self, transport: ITransport) -> None:
        self._drain = _Drain(self)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        transport.registerProducer(self._drain, True)  # type: ignore[attr-defined]

    @override
    def dataReceived(self, data: bytes) -> None:
        connection: CountingConnection = self.getHandle()  # type: ignore[no-untyped-call]
        before = connection.written
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self.full and connection.written != before:
            self._answering = True
            self._reading()

    def drained(self) -> None:
        """The transport's buffer is no longer full."""
        self.full = self._answering = False
        self._reading()

    def pauseProducing(self) -> None:
        self._held = True
        self._reading()

    def resumeProducing(self) -> None:
        self._held = False
        self._reading()

    def _reading(self) -> None:
        if self._held or self._answering:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    @override
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._drain.above = producer

    @override
    def unregisterProducer(self) -> None:
        self._drain.above = None


class ServerConnection(CountingConnection):
    """
    An accepted connection, which can tell why TLS refused it, if it did,
    and give back its buffers when they are empty.
    """

    refusal: str | None = None

    def shed(self) -> bool:
        """
        Swap the two memory BIOs for new ones, if the handshake is over and
        both are empty; whether it did.

        An OpenSSL memory BIO keeps the largest buffer it ever held, for the
        connection's life: a whole TLS record out (16 KiB), a whole socket
        read in (up to 64 KiB).  So a keep-alive connection idle after one
        download keeps about 20 KB more than a fresh one; after an upload,
        more.  Both BIOs are swapped at once: C{SSL_set_bio} frees what it
        replaces, and replacing only one of two would free a reference it
        does not own.  pyOpenSSL has no call for this; it reads and writes
        through the two attributes set here.
        """
        if (
            self.get_peer_finished() is None
            or _lib.BIO_get_mem_data(self._into_ssl, _ffi.NULL)
            or _lib.BIO_get_mem_data(self._from_ssl, _ffi.NULL)
        ):
            return False
        into, out = _lib.BIO_new(_lib.BIO_s_mem()), _lib.BIO_new(_lib.BIO_s_mem())
        _made(into != _ffi.NULL and out != _ffi.NULL)
        _lib.SSL_set_bio(self._ssl, into, out)
        self._into_ssl, self._from_ssl = into, out
        return True
