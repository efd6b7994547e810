"""The values of a proxy, checked when made (ConfigError names the option)."""

from __future__ import annotations

import math
import re
import typing

import attrs
from OpenSSL import SSL
from twisted.internet.endpoints import serverFromString

from .endpoints import TLS, behind_balancer, binds, client_from_string, reaches
from .proxyheader import HeaderEncoder, no_header

if typing.TYPE_CHECKING:
    from .backend import BackendTLS
    from .context import Certificates
    from .peer import ClientIdentity


class ConfigError(Exception):
    """A start-up mistake; C{str()} is one line naming the option and the value."""


def _check(condition: object, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _seconds(option: str, default: float) -> typing.Any:
    """A field of a positive, finite number of seconds (or its text)."""

    def convert(value: str | float) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"--{option} {value}: not a number of seconds") from None
        _check(
            math.isfinite(seconds) and seconds > 0,
            f"--{option} {value}: must be a positive number of seconds",
        )
        return seconds

    return attrs.field(converter=convert, default=default)


def limit(option: str, value: str | float | None) -> float:
    """A positive whole number (its text too), or infinity for None; or ConfigError."""
    if value is None or value == math.inf:
        return math.inf
    text = str(value)
    _check(
        re.fullmatch("0*[1-9][0-9]{0,17}", text),
        f"--{option} {text}: must be a positive whole number",
    )
    return int(text)


def _limit(option: str) -> typing.Any:
    """A field of a L{limit}."""
    return attrs.field(converter=lambda value: limit(option, value), default=math.inf)


@attrs.frozen(kw_only=True)
class Timeouts:
    """Seconds for the handshake, then to connect the backend, and of silence."""

    handshake: float = _seconds("handshake-timeout", 30)
    connect: float = _seconds("connect-timeout", 30)
    idle: float = _seconds("idle-timeout", 3600)


@attrs.frozen(kw_only=True)
class Limits:
    """Live connections at most (inf: any); seconds between reports, to drain."""

    total: float = _limit("max-connections")
    drain: float = _seconds("drain-timeout", 10)
    report: float = 10.0


# TLS 1.2 suites: forward-secret (ECDHE) and AEAD only, strongest first.
# TLS 1.3's are all forward-secret AEAD; OpenSSL's defaults stand.
TLS12_CIPHERS = ":".join(
    f"ECDHE-{key}-{cipher}"
    for cipher in ("AES256-GCM-SHA384", "CHACHA20-POLY1305", "AES128-GCM-SHA256")
    for key in ("ECDSA", "RSA")
)
TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


def _protocols(value: str | tuple[bytes, ...]) -> tuple[bytes, ...]:
    """ALPN names: comma-separated text, or bytes; 1 to 255 printable ASCII."""
    if isinstance(value, str):
        value = tuple(name.encode() for name in value.split(",")) if value else ()
    text = b",".join(value).decode("utf-8", "replace")
    _check(
        all(re.fullmatch(b"[!-~]{1,255}", name) for name in value),
        f"--alpn {text}: names are 1 to 255 printable ASCII bytes",
    )
    return value


def _version(value: str | int) -> int:
    version = TLS_VERSIONS.get(str(value), value)
    _check(version in TLS_VERSIONS.values(), f"--tls-min {value}: must be 1.2 or 1.3")
    return int(version)


def _ciphers(instance: object, attribute: object, text: str) -> None:
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(text.encode("ascii"))
    except (SSL.Error, UnicodeError):
        raise ConfigError(f"--ciphers {text}: no cipher matches") from None


@attrs.frozen(kw_only=True)
class TLSPolicy:
    """ALPN protocols to offer (in order), the lowest TLS version, TLS 1.2 ciphers."""

    alpn: tuple[bytes, ...] = attrs.field(default=(), converter=_protocols)
    minimum: int = attrs.field(default=SSL.TLS1_2_VERSION, converter=_version)
    ciphers: str = attrs.field(default=TLS12_CIPHERS, validator=_ciphers)


def _names(names: typing.Iterable[str]) -> frozenset[str]:
    return frozenset(names)


@attrs.frozen(kw_only=True)
class AllowList:
    """Client certificates let in: any of these CNs, OUs, DNS names, URIs; or all."""

    cn: frozenset[str] = attrs.field(default=(), converter=_names)
    ou: frozenset[str] = attrs.field(default=(), converter=_names)
    dns: frozenset[str] = attrs.field(default=(), converter=_names)
    uri: frozenset[str] = attrs.field(default=(), converter=_names)
    # As the (kind, name) pairs of ClientIdentity.names, made once.
    names: frozenset[tuple[str, str]] = attrs.field(init=False, eq=False)

    @names.default
    def _pairs(self) -> frozenset[tuple[str, str]]:
        kinds = {"cn": self.cn, "ou": self.ou, "dns": self.dns, "uri": self.uri}
        return frozenset((k, name) for k, names in kinds.items() for name in names)

    def refusal(self, identity: ClientIdentity | None) -> str | None:
        """Why the client of C{identity} is not let in, or C{None} if it is."""
        if not self.names or (identity and self.names & identity.names):
            return None
        return "client certificate not allowed"


def check_endpoint(option: str, parse: typing.Callable[..., object], text: str) -> None:
    """Parse endpoint C{text} with C{parse}; ConfigError if it is not understood."""
    from twisted.internet import reactor

    try:
        parse(reactor, text)
    except Exception as e:  # endpoint plugins raise what they like
        raise ConfigError(f"--{option} {text}: {str(e) or type(e).__name__}") from None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """
    One service: TLS on C{listen} with C{certificates} (None: plain, for
    C{--client}), each connection relayed to C{connect} (C{tls:} with
    C{backend_tls}) after C{header}; ConfigError if options clash.
    """

    listen: str
    connect: str
    certificates: Certificates | None
    timeouts: Timeouts = Timeouts()
    service: str = "tlsproxy"
    header: HeaderEncoder = no_header
    limits: Limits = Limits()
    allow: AllowList = AllowList()
    backend_tls: BackendTLS | None = None
    reuse_port: bool = False

    def __attrs_post_init__(self) -> None:
        balanced, listen = behind_balancer(self.listen)
        tls = self.connect.startswith(TLS)
        _check(_NAME.fullmatch(self.service), f"{self.service}: not a service name")
        _check(
            not self.reuse_port or binds(self.listen)[0] == "tcp",
            f"--reuse-port: not with --listen {self.listen}"
            " (only tcp:, tcp6: and haproxy: over them)",
        )
        _check(
            tls == (self.backend_tls is not None),
            f"--connect {self.connect}:"
            " TLS toward the backend goes with tls:, and only with it",
        )
        if self.certificates is None:
            _check(tls, "--client needs --connect tls:HOST:PORT")
            _check(not balanced, f"--client: not with --listen {self.listen}")
        cas = self.certificates and self.certificates.credentials.client_cas
        _check(
            cas or not self.allow.names,
            "--allow-cn, -ou, -dns and -uri need --client-ca",
        )
        check_endpoint("listen", serverFromString, listen)
        check_endpoint("connect", client_from_string, self.connect)
        port = reaches(self.connect)[1]
        _check(
            port is None or 0 < port < 65536, f"--connect {self.connect}: not a port"
        )
