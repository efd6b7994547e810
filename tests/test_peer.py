"""
Unit tests for what a client presents: its certificate's identity and the
server name it sent, each read once (tlsproxy.peer).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.peer import client_identity, printable

from .memory import CA
from .test_tls import client_certificate, self_signed_pem


class IdentityTests(SynchronousTestCase):
    """One reading of a client certificate: its subject, its CN, its names."""

    def setUp(self) -> None:
        self.ca = x509.load_pem_x509_certificate(CA.cert_pem.bytes())

    def test_names(self) -> None:
        """The subject, the one CN, and every name an allow list can list."""
        certificate, _ = client_certificate(self.ca)
        identity = client_identity(certificate)
        assert identity is not None
        self.assertEqual(identity.subject, certificate.subject.rfc4514_string())
        self.assertEqual(identity.cn, "client-1")
        self.assertEqual(
            identity.names,
            {
                ("cn", "client-1"),
                ("ou", "ops"),
                ("dns", "client.example"),
                ("uri", "spiffe://example/client"),
            },
        )

    def test_none(self) -> None:
        """No certificate, no identity."""
        self.assertIsNone(client_identity(None))

    def test_no_cn(self) -> None:
        """A subject without a CN has a subject but no CN."""
        no_cn = x509.load_pem_x509_certificate(
            self_signed_pem("x", NameOID.ORGANIZATIONAL_UNIT_NAME)
        )
        identity = client_identity(no_cn)
        assert identity is not None
        self.assertEqual((identity.subject, identity.cn), ("OU=x", None))
        self.assertEqual(identity.names, {("ou", "x")})

    def test_several_cns(self) -> None:
        """Two CNs: no CN at all, for the allow list as for the record."""
        certificate, _ = client_certificate(self.ca, "admin", "alice")
        identity = client_identity(certificate)
        assert identity is not None
        self.assertIsNone(identity.cn)
        self.assertNotIn("cn", {kind for kind, _ in identity.names})

    def test_control_characters(self) -> None:
        """
        A CN with control characters is no CN; the subject keeps it,
        escaped.
        """
        certificate, _ = client_certificate(self.ca, "a\r\nb\x1b[0m")
        identity = client_identity(certificate)
        assert identity is not None
        self.assertIsNone(identity.cn)
        self.assertTrue(identity.subject.isprintable(), identity.subject)
        self.assertIn("a\\r\\nb\\x1b[0m", identity.subject)


class PrintableTests(SynchronousTestCase):
    """Text bound for a log line shows control characters escaped."""

    def test_printable(self) -> None:
        """Printable text, non-ASCII included, is unchanged."""
        for text in ["", "plain", "café ☃"]:
            self.assertIs(printable(text), text)

    def test_escaped(self) -> None:
        """Line breaks, escapes and NULs are written as Python escapes."""
        self.assertEqual(
            printable("a\nb\x1b[0m\x00\u2028"), "a\\nb\\x1b[0m\\x00\\u2028"
        )
