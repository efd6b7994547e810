"""
Unit tests for loading certificates and keys and for the TLS policy.
"""

from __future__ import annotations

import os

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.context import from_files
from tlsproxy.credentials import load_cas, load_key, self_signed
from tlsproxy.flow import TLSProtocol
from tlsproxy.peer import client_identity
from tlsproxy.proxyheader import (
    PP2_SUBTYPE_SSL_CN,
    PP2_TYPE_SSL,
    HeaderEncoder,
    no_header,
    v2,
)
from tlsproxy.values import AllowList, ConfigError, TLSPolicy

from .keyupdate import MemoryTLS
from .memory import CA, LEAF, Pair, leaf_certificates
from .test_proxyheader import tlvs, v2_parts


class FilesTests(SynchronousTestCase):
    """PEM files: the leaf and its chain, and a key that must match."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.intermediate = CA.create_child_ca()
        self.leaf = self.intermediate.issue_cert("localhost")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def chain_pem(self) -> bytes:
        return b"".join(blob.bytes() for blob in self.leaf.cert_chain_pems)

    def error(self, cert: str, key: str | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            from_files([cert], [key] if key else [])
        return str(caught.exception)

    def test_chain_order(self) -> None:
        """The leaf comes first and the chain follows it, as in the file."""
        chain = load_cas("--cert", self.write("cert.pem", self.chain_pem()))
        self.assertEqual(len(chain), 2)
        self.assertEqual(
            chain[0].public_bytes(serialization.Encoding.PEM),
            self.leaf.cert_chain_pems[0].bytes(),
        )

    def test_key_in_cert_file(self) -> None:
        """Without a key file the key is read from the certificate's file."""
        path = self.write(
            "both.pem", self.chain_pem() + self.leaf.private_key_pem.bytes()
        )
        context = from_files([path]).context
        self.assertIsInstance(context, SSL.Context)

    def test_missing_file(self) -> None:
        """A missing certificate file is named with the system's reason."""
        path = os.path.join(self.dir, "nothing.pem")
        self.assertEqual(self.error(path), f"--cert {path}: No such file or directory")

    def test_directory(self) -> None:
        """A directory given as the key is refused by name."""
        cert = self.write("cert.pem", self.chain_pem())
        self.assertEqual(
            self.error(cert, self.dir), f"--key {self.dir}: Is a directory"
        )

    def test_garbage_certificate(self) -> None:
        """A file without a PEM certificate is refused."""
        path = self.write("cert.pem", b"garbage\n")
        self.assertEqual(self.error(path), f"--cert {path}: no PEM certificate found")

    def test_garbage_key(self) -> None:
        """A key file without a PEM key is refused, with the reason."""
        cert = self.write("cert.pem", self.chain_pem())
        key = self.write("key.pem", b"garbage\n")
        self.assertTrue(
            self.error(cert, key).startswith(
                f"--key {key}: not a usable PEM private key"
            )
        )

    def test_encrypted_key(self) -> None:
        """An encrypted key is refused: there is nobody to type a passphrase."""
        cert = self.write("cert.pem", self.chain_pem())
        loaded = serialization.load_pem_private_key(
            self.leaf.private_key_pem.bytes(), None
        )
        encrypted = loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        key = self.write("key.pem", encrypted)
        self.assertEqual(
            self.error(cert, key),
            f"--key {key}: not a usable PEM private key "
            "(Password was not given but private key is encrypted)",
        )

    def test_unusable_key_type(self) -> None:
        """A key OpenSSL cannot sign with (X25519) is refused by name."""
        from cryptography.hazmat.primitives.asymmetric import x25519

        cert = self.write("cert.pem", self.chain_pem())
        pem = x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key = self.write("key.pem", pem)
        self.assertTrue(
            self.error(cert, key).startswith(f"--cert {cert} --key {key}: ")
        )

    def test_mismatched_key(self) -> None:
        """A key that is not the certificate's is refused."""
        cert = self.write("cert.pem", self.chain_pem())
        other = trustme.CA().issue_cert("localhost").private_key_pem.bytes()
        key = self.write("key.pem", other)
        self.assertEqual(
            self.error(cert, key), f"--cert {cert} --key {key}: key values mismatch"
        )


class SelfSignedTests(SynchronousTestCase):
    """Throwaway certificates for trying tlsproxy out."""

    def test_dns_name(self) -> None:
        """A name becomes the DNS name; the fingerprint is the certificate's."""
        made = self_signed("example.test")
        context = from_files(identities=[made.identity]).context
        certificate = SSL.Connection(context).get_certificate()
        assert certificate is not None
        crypto = certificate.to_cryptography()
        names = crypto.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            names.value.get_values_for_type(x509.DNSName), ["example.test"]
        )
        digest = crypto.fingerprint(hashes.SHA256()).hex().upper()
        self.assertEqual(made.fingerprint.replace(":", ""), digest)
        self.assertEqual(len(made.fingerprint), 95)

    def test_impossible_name(self) -> None:
        """A name no certificate can carry is a one-line error."""
        for name, reason in [
            ("", "Attribute's length must be >= 1 and <= 64"),
            ("x" * 65, "Attribute's length must be >= 1 and <= 64"),
            ("é.example", "DNSName values should be passed as an A-label string"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self_signed(name)
            self.assertTrue(
                str(caught.exception).startswith(f"--self-signed {name}: {reason}"),
                str(caught.exception),
            )

    def test_ip_address(self) -> None:
        """An IP address becomes an IP address name."""
        certificate = SSL.Connection(
            from_files(identities=[self_signed("127.0.0.1").identity]).context
        ).get_certificate()
        assert certificate is not None
        names = certificate.to_cryptography().extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        self.assertEqual(
            [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)],
            ["127.0.0.1"],
        )


class PolicyTests(SynchronousTestCase):
    """The context's settings that a scanner looks at."""

    def test_options(self) -> None:
        """No compression, no renegotiation, the server's cipher order."""
        context = from_files(identities=[self_signed("localhost").identity]).context
        options = context.set_options(0)
        for option in (
            SSL.OP_NO_COMPRESSION,
            SSL.OP_NO_RENEGOTIATION,
            SSL.OP_CIPHER_SERVER_PREFERENCE,
        ):
            self.assertTrue(options & option, option)


class NegotiationTests(SynchronousTestCase):
    """ALPN, the lowest version and the TLS 1.2 ciphers, as configured."""

    def test_alpn_chosen(self) -> None:
        """The first of the server's protocols that the client offers wins."""
        pair = Pair(
            policy=TLSPolicy(alpn=(b"http/1.1", b"h2")),
            acceptableProtocols=[b"h2", b"http/1.1"],
        )
        pair.flush()
        pair.connect_backend()
        self.assertEqual(pair.records[0].alpn, "http/1.1")
        self.assertEqual(pair.client_tls.negotiatedProtocol, b"http/1.1")

    def test_alpn_no_overlap(self) -> None:
        """A client offering none of them is served without ALPN."""
        pair = Pair(policy=TLSPolicy(alpn=(b"h2",)), acceptableProtocols=[b"x"])
        pair.flush()
        pair.connect_backend()
        self.assertIsNone(pair.records[0].alpn)

    def test_alpn_by_default(self) -> None:
        """By default a client's ALPN offer is answered with none (no failure)."""
        pair = Pair(acceptableProtocols=[b"h2", b"http/1.1"])
        pair.flush()
        pair.connect_backend()
        self.assertIsNone(pair.records[0].alpn)

    def test_tls13_only(self) -> None:
        """With TLS 1.3 as the lowest version, a TLS 1.2 client fails."""
        from twisted.internet.ssl import TLSVersion

        pair = Pair(
            policy=TLSPolicy(minimum=SSL.TLS1_3_VERSION),
            extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2},
        )
        pair.flush()
        self.assertTrue(pair.records[-1].reason.startswith("TLS error: "))

    def test_ciphers(self) -> None:
        """A TLS 1.2 client gets a cipher from the configured string."""
        from twisted.internet.ssl import TLSVersion

        pair = Pair(
            policy=TLSPolicy(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"),
            extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2},
        )
        pair.flush()
        pair.connect_backend()
        self.assertEqual(pair.records[0].cipher, "ECDHE-ECDSA-AES128-GCM-SHA256")


ANYONE = AllowList()


class ClientCertificateTests(SynchronousTestCase):
    """--client-ca and --allow-*: who gets in with which certificate."""

    def setUp(self) -> None:
        self.ca = x509.load_pem_x509_certificate(CA.cert_pem.bytes())
        self.certificate, self.key_pem = client_certificate(self.ca)

    def pair(
        self,
        allow: AllowList = ANYONE,
        present: bool = True,
        certificate: tuple[x509.Certificate, bytes] | None = None,
        header: HeaderEncoder = no_header,
    ) -> Pair:
        from twisted.internet.ssl import PrivateCertificate

        presented, key_pem = certificate or (self.certificate, self.key_pem)
        options = {}
        if present:
            options["clientCertificate"] = PrivateCertificate.loadPEM(
                presented.public_bytes(serialization.Encoding.PEM) + key_pem
            )
        pair = Pair(client_cas=(self.ca,), allow=allow, header=header, **options)
        pair.flush()
        return pair

    def test_allow_lists(self) -> None:
        """Any listed CN, OU, DNS or URI name lets the certificate in."""
        identity = client_identity(self.certificate)
        for allow in [
            AllowList(),
            AllowList(cn=frozenset({"other", "client-1"})),
            AllowList(ou=frozenset({"ops"})),
            AllowList(dns=frozenset({"client.example"})),
            AllowList(uri=frozenset({"spiffe://example/client"})),
        ]:
            self.assertIsNone(allow.refusal(identity), allow)
        refused = AllowList(cn=frozenset({"other"}), dns=frozenset({"x.example"}))
        self.assertEqual(refused.refusal(identity), "client certificate not allowed")
        self.assertEqual(refused.refusal(None), "client certificate not allowed")
        self.assertIsNone(AllowList().refusal(None))

    def test_no_alternative_names(self) -> None:
        """A certificate without subjectAltName is judged by its subject."""
        bare = client_identity(x509.load_pem_x509_certificate(self_signed_pem("bare")))
        self.assertIsNone(AllowList(cn=frozenset({"bare"})).refusal(bare))

    def test_two_cns_not_allowed(self) -> None:
        """
        A certificate with two CNs has no CN: C{--allow-cn} of either does
        not let it in, and neither is recorded (the CN checked is the CN
        forwarded).
        """
        two = client_certificate(self.ca, "admin", "alice")
        for cn in ["alice", "admin"]:
            pair = self.pair(AllowList(cn=frozenset({cn})), certificate=two)
            [record] = pair.records
            self.assertEqual(record.reason, "client certificate not allowed")
            self.assertIsNone(record.client_cn)
            self.assertIn("CN=alice", record.client_cert)
            self.assertEqual(pair.endpoint.attempts, [])

    def test_two_cns_no_cn_forwarded(self) -> None:
        """
        Let in by another name, a certificate with two CNs, or with a CN
        that holds control characters, sends the backend no CN in PROXY v2.
        """
        for cns in [("admin", "alice"), ("alice\r\nX-Admin: 1",), ("\x1b[31m",)]:
            pair = self.pair(
                AllowList(ou=frozenset({"ops"})),
                certificate=client_certificate(self.ca, *cns),
                header=v2,
            )
            pair.connect_backend()
            pair.flush()
            self.assertIsNone(pair.records[0].client_cn)
            ssl = v2_parts(pair.backend.data)[2][PP2_TYPE_SSL]
            self.assertNotIn(PP2_SUBTYPE_SSL_CN, tlvs(ssl[5:]))
            self.assertNotIn(cns[-1].encode(), pair.backend.data)

    def test_signed_client_let_in(self) -> None:
        """A client with a certificate the CA signed reaches the backend."""
        pair = self.pair(AllowList(cn=frozenset({"client-1"})))
        pair.connect_backend()
        record = pair.records[0]
        self.assertEqual(record.client_cert, self.certificate.subject.rfc4514_string())
        self.assertIn("CN=client-1", record.client_cert)
        self.assertEqual(record.client_cn, "client-1")

    def test_not_allowed(self) -> None:
        """A signed certificate that no --allow-* lists is closed and logged."""
        pair = self.pair(AllowList(cn=frozenset({"someone-else"})))
        [record] = pair.records
        self.assertEqual(record.reason, "client certificate not allowed")
        self.assertIn("CN=client-1", record.client_cert)
        self.assertEqual(pair.endpoint.attempts, [])

    def test_no_certificate(self) -> None:
        """A client without a certificate fails its handshake."""
        pair = self.pair(present=False)
        [record] = pair.records
        self.assertTrue(record.reason.startswith("TLS error: "), record.reason)
        self.assertEqual(pair.endpoint.attempts, [])

    def test_load_client_cas(self) -> None:
        """The CA file is read at start-up; a bad one is a one-line error."""
        directory = self.mktemp()
        os.mkdir(directory)
        good = os.path.join(directory, "ca.pem")
        CA.cert_pem.write_to_path(good)
        self.assertEqual(load_cas("--client-ca", good), (self.ca,))
        bad = os.path.join(directory, "bad.pem")
        with open(bad, "wb") as f:
            f.write(b"junk")
        with self.assertRaises(ConfigError) as caught:
            load_cas("--client-ca", bad)
        self.assertEqual(
            str(caught.exception), f"--client-ca {bad}: no PEM certificate found"
        )


class DrainTests(SynchronousTestCase):
    """
    The producer a TLSProtocol keeps with its transport tells when the
    transport's buffer is full, and lets a closing transport close.
    """

    def connected(self) -> tuple[TLSProtocol, StringTransport]:
        factory = TLSMemoryBIOFactory(
            leaf_certificates(), False, Factory.forProtocol(Protocol)
        )
        factory.protocol = TLSProtocol
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_full_and_drained(self) -> None:
        """Paused: full; resumed: not, and reading goes on."""
        protocol, transport = self.connected()
        assert transport.producer is not None
        transport.producer.pauseProducing()
        self.assertTrue(protocol.full)
        transport.producer.resumeProducing()
        self.assertFalse(protocol.full)
        self.assertEqual(transport.producerState, "producing")

    def test_answers_all_sent(self) -> None:
        """
        All that TLS answers to one read (here to 2,400 KeyUpdates that ask
        for one back, 64 KiB) goes to the transport at once: none waits in
        OpenSSL's buffer, out of flow control's sight, growing with each
        read while the client reads the rest.  (tests/test_model.py found
        it.)
        """
        protocol, transport = self.connected()
        client = MemoryTLS(sni=b"localhost")
        self.addCleanup(client.free)
        while not client.handshake():
            protocol.dataReceived(client.output())
            client.feed(transport.value())
            transport.clear()
        protocol.dataReceived(client.output())  # its Finished
        transport.clear()
        client.key_update(2400)
        updates = client.output()
        self.assertGreater(len(updates), 2**16 - 2**10)
        protocol.dataReceived(updates)
        self.assertGreater(len(transport.value()), 2**16 - 2**10)  # (not 32 KiB)

    def test_closing(self) -> None:
        """A transport that closes while full gets rid of the producer."""
        _, transport = self.connected()
        assert transport.producer is not None
        transport.producer.pauseProducing()
        transport.disconnecting = True
        transport.producer.resumeProducing()
        self.assertIsNone(transport.producer)


class KeyModeTests(SynchronousTestCase):
    """A private key file others can read is named in a warning, and used."""

    def test_modes(self) -> None:
        """Group or others able to read it: a warning; the owner alone: none."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        path = self.mktemp()
        LEAF.private_key_pem.write_to_path(path)
        for mode, warned in [
            (0o644, True),
            (0o640, True),
            (0o604, True),
            (0o600, False),
        ]:
            del events[:]
            os.chmod(path, mode)
            self.assertIsNotNone(load_key(path))
            said = [e for e in events if e.get("path") == path]
            self.assertEqual(len(said), warned, oct(mode))
            if warned:
                self.assertEqual(said[0]["mode"], mode)
                self.assertEqual(said[0]["log_level"].name, "warn")


def self_signed_pem(name: str, oid: x509.ObjectIdentifier | None = None) -> bytes:
    """A self-signed certificate for CN=name (or OID=name), no subjectAltName."""
    import datetime

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(oid or NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def client_certificate(
    ca: x509.Certificate, *cns: str
) -> tuple[x509.Certificate, bytes]:
    """
    A client certificate that the test CA signed: CN client-1 (or C{cns}, in
    that order), OU ops, DNS client.example, URI spiffe://example/client;
    and its key, in PEM.
    """
    import datetime

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key(CA.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns or ["client-1"]]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [*names, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops")]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("client.example"),
                    x509.UniformResourceIdentifier("spiffe://example/client"),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate, key_pem
