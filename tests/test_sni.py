"""
Unit tests for choosing a certificate by SNI, for reading the files again
(reload) and for new session ticket keys (rotation): real handshakes in
memory between pyOpenSSL connections.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys

import trustme
from cryptography import x509
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.context import UNKNOWN_NAME, Certificates, from_files
from tlsproxy.credentials import Credentials, read_credentials
from tlsproxy.peer import server_name
from tlsproxy.values import ConfigError

from .memory import CA, Pair, identity
from .test_tls import self_signed_pem

A = CA.issue_cert("a.test")
B = CA.issue_cert("b.test", "B2.test")
WILD = CA.issue_cert("*.w.test")
ALSO_B = CA.issue_cert("b.test")


def certificates(*leaves: trustme.LeafCert, strict: bool = False) -> Certificates:
    made = Credentials(tuple(identity(leaf) for leaf in leaves))
    return Certificates(lambda: made, strict=strict)


def client_context() -> SSL.Context:
    """A TLS 1.2 client's context (sessions resume within one context)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    return context


CLIENT = client_context()


def handshake_pair(
    context: SSL.Context,
    name: bytes | None = None,
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection]:
    """
    A TLS 1.2 handshake with a server on C{context}, sending the SNI C{name}
    (if any) and offering C{session} (if any); the client's end and the
    server's.

    @raise SSL.Error: the client's handshake failed.
    """
    server = SSL.Connection(context, None)
    server.set_accept_state()
    client = SSL.Connection(CLIENT, None)
    if name is not None:
        client.set_tlsext_host_name(name)
    if session is not None:
        client.set_session(session)
    client.set_connect_state()
    for _ in range(4):
        for this, other in ((client, server), (server, client)):
            try:
                this.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                if this is client:
                    raise
                # The server failed: the client is still sent its alert.
            with contextlib.suppress(SSL.WantReadError):  # (nothing to send)
                other.bio_write(this.bio_read(1 << 16))
    return client, server


def handshake(
    context: SSL.Context,
    name: bytes | None = None,
    session: SSL.Session | None = None,
) -> SSL.Connection:
    """L{handshake_pair}'s client end."""
    return handshake_pair(context, name, session)[0]


STDLIB = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
STDLIB.check_hostname = False
STDLIB.verify_mode = ssl.CERT_NONE
STDLIB.minimum_version = ssl.TLSVersion.TLSv1_3


def tls13(
    context: SSL.Context, name: str = "a.test", session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """
    A TLS 1.3 handshake with a server on C{context} by Python's own client
    (which can tell whether it resumed), offering C{session}, and the
    session tickets that follow it read; the client's end.
    """
    server = SSL.Connection(context, None)
    server.set_accept_state()
    into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = STDLIB.wrap_bio(into, out, server_hostname=name, session=session)
    for _ in range(4):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        if out.pending:
            server.bio_write(out.read())
        with contextlib.suppress(SSL.Error):  # (refused: an alert for the client)
            server.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            into.write(server.bio_read(1 << 16))
    with contextlib.suppress(ssl.SSLWantReadError):
        client.read()  # (the session tickets)
    return client


def resumed(client: SSL.Connection, earlier: SSL.Connection) -> bool:
    """Whether C{client} resumed C{earlier}'s TLS 1.2 session."""
    return client.master_key() == earlier.master_key()


def served(context: SSL.Context, name: bytes | None = None) -> str:
    """The first DNS name of the certificate served for C{name}."""
    certificate = handshake(context, name).get_peer_certificate(as_cryptography=True)
    assert certificate is not None
    alternative = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    return alternative.get_values_for_type(x509.DNSName)[0]


class ChoiceTests(SynchronousTestCase):
    """The certificate is chosen by the client's SNI name, never arbitrarily."""

    def test_by_name(self) -> None:
        """Each name gets the certificate that names it, any of its names."""
        context = certificates(A, B).context
        self.assertEqual(served(context, b"a.test"), "a.test")
        self.assertEqual(served(context, b"b.test"), "b.test")
        self.assertEqual(served(context, b"b2.test"), "b.test")

    def test_default(self) -> None:
        """Without SNI, or with a name none serves, the first is served."""
        context = certificates(B, A).context
        self.assertEqual(served(context), "b.test")
        self.assertEqual(served(context, b"c.test"), "b.test")

    def test_wildcard(self) -> None:
        """A wildcard serves one label under its domain, not two, not none."""
        context = certificates(A, WILD).context
        self.assertEqual(served(context, b"x.w.test"), "*.w.test")
        self.assertEqual(served(context, b"y.x.w.test"), "a.test")
        self.assertEqual(served(context, b"w.test"), "a.test")

    def test_case(self) -> None:
        """Names compare without case."""
        self.assertEqual(served(certificates(A, B).context, b"B.Test"), "b.test")

    def test_not_host_names(self) -> None:
        """
        A name that is not a host name (a final dot, an empty label, a
        literal wildcard) is served no certificate of its own.
        """
        context = certificates(A, B, WILD).context
        for name in [b"b.test.", b"b.test..", b".b.test", b"*.w.test", b"b\n.test"]:
            self.assertEqual(served(context, name), "a.test", name)

    def test_first_given_wins(self) -> None:
        """Of two certificates for one name, the first given is served."""
        context = certificates(A, B, ALSO_B).context
        certificate = handshake(context, b"b.test").get_peer_certificate(
            as_cryptography=True
        )
        assert certificate is not None
        self.assertEqual(certificate.serial_number, identity(B).chain[0].serial_number)

    def test_common_name_without_dns_names(self) -> None:
        """A certificate without DNS names serves its CN, as hitch does."""
        self.assertEqual(
            identity(A).names(), {"a.test"}, "DNS names, not the CN (none here)"
        )
        bare = x509.load_pem_x509_certificate(self_signed_pem("Bare.Test"))
        made = identity(A)
        self.assertEqual(type(made)((bare,), made.key, "x").names(), {"bare.test"})


class StrictTests(SynchronousTestCase):
    """--sni-strict: a name no certificate serves fails the handshake."""

    def setUp(self) -> None:
        self.hooked: list[object] = []
        self.hook = lambda *info: self.hooked.append(info)
        self.patch(sys, "excepthook", self.hook)
        self.context = certificates(A, B, strict=True).context

    def test_unknown_name_refused(self) -> None:
        """The client gets the unrecognized_name alert; no traceback."""
        with self.assertRaises(SSL.Error) as caught:
            handshake(self.context, b"c.test")
        self.assertIn("unrecognized name", str(caught.exception))
        self.assertEqual(self.hooked, [])
        self.assertIs(sys.excepthook, self.hook)

    def test_not_host_names_refused(self) -> None:
        """
        A name that is not a host name is refused, however close it is to a
        served one.
        """
        context = certificates(A, WILD, strict=True).context
        for name in [b"a.test.", b"a.test...", b".w.test", b"*.w.test", b"a..test"]:
            with self.assertRaises(SSL.Error, msg=name) as caught:
                handshake(context, name)
            self.assertIn("unrecognized name", str(caught.exception))

    def test_known_and_no_name(self) -> None:
        """Known names and clients without SNI are served as usual."""
        self.assertEqual(served(self.context, b"b.test"), "b.test")
        self.assertEqual(served(self.context), "a.test")


class FilesTests(SynchronousTestCase):
    """Several --cert (and --key) files, or a directory of them."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)

    def write(self, name: str, *parts: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(b"".join(parts))
        return path

    def pem(self, leaf: trustme.LeafCert) -> bytes:
        return leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes()

    def error(self, *args: object, **kwargs: object) -> str:
        with self.assertRaises(ConfigError) as caught:
            read_credentials(*args, **kwargs)  # type: ignore[arg-type]
        return str(caught.exception)

    def test_pairs(self) -> None:
        """The Nth --key goes with the Nth --cert."""
        a = self.write("a.crt", A.cert_chain_pems[0].bytes())
        b = self.write("b.crt", B.cert_chain_pems[0].bytes())
        a_key = self.write("a.key", A.private_key_pem.bytes())
        b_key = self.write("b.key", B.private_key_pem.bytes())
        context = from_files([a, b], [a_key, b_key]).context
        self.assertEqual(served(context, b"b.test"), "b.test")
        self.assertEqual(served(context), "a.test")

    def test_key_count(self) -> None:
        """Keys are one per --cert, or none."""
        a = self.write("a.pem", self.pem(A))
        self.assertEqual(
            self.error([a, a], [a]),
            "--key: 1 given for 2 --cert: give one per --cert, or none"
            " (each --cert file then holds its key)",
        )

    def test_none(self) -> None:
        """No certificate at all is refused."""
        self.assertEqual(
            self.error(), "--cert FILE (or --self-signed NAME) is required"
        )

    def test_mismatch_names_the_pair(self) -> None:
        """A key that is not its certificate's names both files."""
        a = self.write("a.crt", A.cert_chain_pems[0].bytes())
        b_key = self.write("b.key", B.private_key_pem.bytes())
        with self.assertRaises(ConfigError) as caught:
            from_files([a], [b_key])
        self.assertEqual(
            str(caught.exception), f"--cert {a} --key {b_key}: key values mismatch"
        )

    def test_directory(self) -> None:
        """A directory's .pem files, in name order; other files are ignored."""
        self.write("2-b.pem", self.pem(B))
        self.write("1-a.pem", self.pem(A))
        self.write("notes.txt", b"not a certificate")
        context = from_files([self.dir]).context
        self.assertEqual(served(context), "a.test")
        self.assertEqual(served(context, b"b.test"), "b.test")

    def test_empty_directory(self) -> None:
        """A directory without a .pem file is refused."""
        self.assertEqual(
            self.error([self.dir]),
            f"--cert {self.dir}: no readable .pem file in the directory",
        )

    def test_directory_with_key(self) -> None:
        """A directory's files hold their keys: a --key for it is refused."""
        key = self.write("a.key", A.private_key_pem.bytes())
        self.assertEqual(
            self.error([self.dir], [key]),
            f"--cert {self.dir} --key {key}: a directory takes no --key",
        )


class ReloadTests(SynchronousTestCase):
    """Reload reads the files again; rotation makes new ticket keys."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp())
        self.put(A)
        self.certificates = from_files([self.path])

    def put(self, leaf: trustme.LeafCert) -> None:
        with open(self.path, "wb") as f:
            f.write(leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes())

    def test_reload(self) -> None:
        """New connections get the new certificate; live ones keep theirs."""
        old = self.certificates.context
        self.put(B)
        self.certificates.reload()
        self.assertEqual(served(self.certificates.context), "b.test")
        self.assertEqual(served(old), "a.test")

    def test_bad_file_keeps_the_old(self) -> None:
        """A file that is now bad raises, and the old certificate stays."""
        old = self.certificates.context, self.certificates.credentials
        for junk in [b"junk", A.cert_chain_pems[0].bytes() + B.private_key_pem.bytes()]:
            with open(self.path, "wb") as f:
                f.write(junk)
            with self.assertRaises(ConfigError):
                self.certificates.reload()
            self.assertEqual(
                (self.certificates.context, self.certificates.credentials), old
            )
        os.remove(self.path)
        with self.assertRaises(ConfigError):
            self.certificates.reload()
        self.certificates.rotate()  # from what was read, not from the file
        self.assertEqual(served(self.certificates.context), "a.test")

    def test_resumption(self) -> None:
        """A TLS 1.3 session resumes until the ticket keys rotate, then not."""
        first = tls13(self.certificates.context)
        again = tls13(self.certificates.context, session=first.session)
        self.assertTrue(again.session_reused)
        self.certificates.rotate()
        stale = tls13(self.certificates.context, session=first.session)
        self.assertFalse(stale.session_reused)
        fresh = tls13(self.certificates.context, session=stale.session)
        self.assertTrue(fresh.session_reused)


class ResumptionTests(SynchronousTestCase):
    """
    TLS 1.2 sessions never resume: on a TLS 1.2 resumption OpenSSL reports
    the session's server name, not the one the client sent, so neither
    --sni-strict nor the record could judge the name sent.
    """

    def setUp(self) -> None:
        self.patch(sys, "excepthook", lambda *info: None)

    def test_strict_judges_the_name_sent(self) -> None:
        """
        A TLS 1.2 session made for a served name, or with no name, offered
        (by ticket and by session ID) with an unknown name is refused.
        """
        context = certificates(A, B, strict=True).context
        for made_for in [b"a.test", None]:
            session = handshake(context, made_for).get_session()
            assert session is not None
            with self.assertRaises(SSL.Error, msg=made_for) as caught:
                handshake(context, b"evil.invalid", session)
            self.assertIn("unrecognized name", str(caught.exception))

    def test_name_sent_recorded(self) -> None:
        """
        Offered with another name, a TLS 1.2 session is not resumed, and
        the server name read is the one sent.
        """
        context = certificates(A, B).context
        first = handshake(context, b"a.test")
        client, server = handshake_pair(context, b"b.test", first.get_session())
        self.assertFalse(resumed(client, first))
        self.assertEqual(server_name(server), "b.test")

    def test_same_name_not_resumed(self) -> None:
        """Even with the same name, a TLS 1.2 session is not resumed."""
        context = certificates(A).context
        first = handshake(context, b"a.test")
        again = handshake(context, b"a.test", first.get_session())
        self.assertFalse(resumed(again, first))

    def test_tls13_resumes_under_strict(self) -> None:
        """TLS 1.3 sessions resume; an unknown name is still refused."""
        context = certificates(A, B, strict=True).context
        first = tls13(context, "a.test")
        self.assertTrue(tls13(context, "b.test", first.session).session_reused)
        with self.assertRaises(ssl.SSLError):
            tls13(context, "evil.invalid", first.session)


class RecordTests(SynchronousTestCase):
    """What the connection record says of SNI."""

    def test_strict_refusal_logged(self) -> None:
        """A refused name closes the connection, with the reason in its record."""
        self.patch(sys, "excepthook", lambda *info: None)
        pair = Pair(certificates=certificates(A, strict=True))
        pair.flush()
        [record] = pair.records
        self.assertEqual((record.event, record.reason), ("close", UNKNOWN_NAME))
        self.assertEqual(pair.endpoint.attempts, [])

    def test_sni_recorded(self) -> None:
        """The client's name is in the record, with the certificate it chose."""
        pair = Pair(certificates=certificates(A, CA.issue_cert("localhost")))
        pair.flush()
        pair.connect_backend()
        self.assertEqual(pair.records[0].sni, "localhost")
        self.assertIsNone(pair.records[0].reason)
