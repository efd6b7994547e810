"""The PEM files, read before the chroot and on reload; C{--self-signed}'s."""

from __future__ import annotations

import datetime
import glob
import ipaddress
import os
import stat
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from .values import ConfigError

_log = Logger(namespace="tlsproxy")


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{option} {path}: {e.strerror}") from None


def load_cas(option: str, path: str) -> tuple[x509.Certificate, ...]:
    """The certificates of C{option}'s PEM file C{path}; ConfigError if none."""
    try:
        return tuple(x509.load_pem_x509_certificates(_read(option, path)))
    except ValueError:
        raise ConfigError(f"{option} {path}: no PEM certificate found") from None


def load_key(path: str) -> PrivateKeyTypes:
    """
    The unencrypted PEM private key of C{path} (warned of if group or others
    can read it); ConfigError if the file has none usable.
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


@attrs.frozen
class Identity:
    """A certificate chain (the leaf first), its key, and where they came from."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    where: str

    def names(self) -> set[str]:
        """The names it serves, lower case: its DNS names, else its CNs (as hitch)."""
        leaf = self.chain[0]
        try:
            alternative = leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
            dns = alternative.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns = []
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return {name.lower() for name in dns or [str(a.value) for a in cns]}


@attrs.frozen
class Credentials:
    """The identities (the first is the default) and the client CAs, if any."""

    identities: tuple[Identity, ...]
    client_cas: tuple[x509.Certificate, ...] = ()


def read_credentials(
    certs: Sequence[str] = (),
    keys: Sequence[str] = (),
    client_ca: str | None = None,
    identities: Sequence[Identity] = (),
) -> Credentials:
    """
    C{identities}, then those of C{--cert} files or directories and C{--key}
    (one each, or none), and C{--client-ca}; ConfigError for any problem.
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
    cas = () if client_ca is None else load_cas("--client-ca", client_ca)
    return Credentials(tuple(read), cas)


def _identities(cert: str, key: str | None) -> list[Identity]:
    """One identity from a file, or one from each C{*.pem} of a directory."""
    if not os.path.isdir(cert):
        paths = [(cert, key or cert)]
    elif key is not None:
        raise ConfigError(f"--cert {cert} --key {key}: a directory takes no --key")
    else:
        found = sorted(glob.glob(os.path.join(glob.escape(cert), "*.pem")))
        if not found:
            raise ConfigError(f"--cert {cert}: no readable .pem file in the directory")
        paths = [(path, path) for path in found]
    return [
        Identity(load_cas("--cert", c), load_key(k), f"--cert {c} --key {k}")
        for c, k in paths
    ]


@attrs.frozen
class SelfSigned:
    """A throwaway certificate, never on disk, and its SHA-256 fingerprint."""

    identity: Identity
    fingerprint: str


def self_signed(name: str) -> SelfSigned:
    """A P-256 key and a 30-day certificate for C{name} (a DNS name or an IP)."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        alternative = _alternative_name(name)
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
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .sign(key, hashes.SHA256())
    )
    digest = certificate.fingerprint(hashes.SHA256())
    return SelfSigned(
        Identity((certificate,), key, f"--self-signed {name}"),
        ":".join(f"{byte:02X}" for byte in digest),
    )


def _alternative_name(name: str) -> x509.GeneralName:
    """An IP address, or else a DNS name (ValueError if neither)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
