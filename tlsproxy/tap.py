"""
C{twistd tlsproxy}: the command line, validated once, and the service it
makes.

Everything is read and checked in L{Options.postOptions}, which twistd runs
as root on the real filesystem, before it chroots and drops privileges: the
certificate and key files, the TLS context, the endpoint strings and the
timeouts.  A mistake is one line naming the option and the value.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (getaddrinfo needs it; not in a jail)
import math
import re
import signal
import sys
from collections.abc import Callable

from OpenSSL import SSL
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site
from typing_extensions import override

from .backend import TLS_PREFIX, BackendTLS, client_from_string, host_of
from .connlog import ConnectionLog
from .metrics import Metrics
from .proxyheader import ENCODERS, HeaderEncoder, no_header
from .record import RecordObserver, fan_out, log_close
from .relay import Timeouts
from .service import Limits, ProxyConfig, proxy_service
from .tls import (
    TLS12_CIPHERS,
    AllowList,
    ConfigError,
    TLSPolicy,
    load_client_cas,
    load_server_context,
    self_signed,
)

_log = Logger(namespace="tlsproxy")
_ALLOW_KINDS = ("cn", "ou", "dns", "uri")


def _one_line_of(text: str) -> str:
    """C{text} with line breaks and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{option} {text}: not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} {text}: must be a positive number of seconds")
    return value


def _count(option: str, text: str | None) -> float:
    """A positive whole number, or no limit (infinity) when not given."""
    if text is None:
        return math.inf
    if not re.fullmatch("0*[1-9][0-9]{0,17}", text):
        raise ConfigError(f"{option} {text}: must be a positive whole number")
    return int(text)


def _endpoint(option: str, text: str, parse: Callable[[object, str], object]) -> str:
    from twisted.internet import reactor

    try:
        parse(reactor, text)
    except Exception as e:  # endpoint plugins raise what they like
        raise ConfigError(f"{option} {text}: {str(e) or type(e).__name__}") from None
    return text


class Options(usage.Options):
    """The options of C{twistd tlsproxy}; see README.rst for each."""

    synopsis = "--connect ENDPOINT (--cert FILE [--key FILE] | --self-signed NAME)"
    longdesc = (
        "Accept TLS connections on the --listen endpoint and relay each one, "
        "after its handshake, to the --connect endpoint as plain TCP. Use "
        "twistd's own --chroot, --uid, --gid, --pidfile, --logfile and --syslog."
    )
    optParameters = [
        ["listen", None, "tcp:443", "Server endpoint string to accept TLS on."],
        ["connect", None, None, "Client endpoint string of the backend (required)."],
        ["cert", None, None, "PEM certificate file: the leaf, then its chain."],
        ["key", None, None, "PEM private key file [default: the --cert file]."],
        ["self-signed", None, None, "Make a throwaway certificate for NAME."],
        ["handshake-timeout", None, "30", "Seconds for the TLS handshake."],
        ["connect-timeout", None, "30", "Seconds to connect to the backend."],
        ["idle-timeout", None, "3600", "Seconds without traffic before closing."],
        ["connection-log", None, None, "Append a JSON line per record to FILE."],
        ["proxy-protocol", None, None, "Send a PROXY header to the backend: v1|v2."],
        ["max-connections", None, None, "Live connections at most [default: any]."],
        ["max-connections-per-client", None, None, "From one address at most."],
        ["drain-timeout", None, "10", "Seconds for live connections on SIGTERM."],
        ["metrics", None, None, "Serve Prometheus metrics on this endpoint."],
        ["alpn", None, "", "ALPN protocols to offer, e.g. http/1.1 [default: none]."],
        ["tls-min", None, "1.2", "The lowest TLS version: 1.2 or 1.3."],
        ["ciphers", None, TLS12_CIPHERS, "TLS 1.2 ciphers (OpenSSL cipher string)."],
        ["client-ca", None, None, "Require client certificates signed by this CA."],
        ["backend-ca", None, None, "Verify a tls: backend with these PEM CAs."],
    ]
    optFlags = [["client", None, "Accept plain TCP (needs --connect tls:...)."]]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.allowed: dict[str, set[str]] = {
            k: set() for k in ("cn", "ou", "dns", "uri")
        }

    def opt_allow_cn(self, name: str) -> None:
        """Let in client certificates with this subject CN (repeatable)."""
        self.allowed["cn"].add(name)

    def opt_allow_ou(self, name: str) -> None:
        """Let in client certificates with this subject OU (repeatable)."""
        self.allowed["ou"].add(name)

    def opt_allow_dns(self, name: str) -> None:
        """Let in client certificates with this DNS name (repeatable)."""
        self.allowed["dns"].add(name)

    def opt_allow_uri(self, name: str) -> None:
        """Let in client certificates with this URI name (repeatable)."""
        self.allowed["uri"].add(name)

    fingerprint: str | None = None

    @override
    def postOptions(self) -> None:
        try:
            self.config = self._config()
        except ConfigError as e:
            raise usage.UsageError(_one_line_of(str(e))) from None

    def _config(self) -> ProxyConfig:
        if self["connect"] is None:
            raise ConfigError("--connect is required (for example tcp:127.0.0.1:80)")
        config = ProxyConfig(
            listen=_endpoint("--listen", self["listen"], serverFromString),
            connect=_endpoint("--connect", self["connect"], client_from_string),
            context=None if self._client_mode() else self._context(),
            timeouts=Timeouts(
                handshake=_seconds("--handshake-timeout", self["handshake-timeout"]),
                connect=_seconds("--connect-timeout", self["connect-timeout"]),
                idle=_seconds("--idle-timeout", self["idle-timeout"]),
            ),
            header=self._header(),
            allow=self._allow(),
            limits=Limits(
                total=_count("--max-connections", self["max-connections"]),
                per_client=_count(
                    "--max-connections-per-client", self["max-connections-per-client"]
                ),
                drain=_seconds("--drain-timeout", self["drain-timeout"]),
            ),
            backend_tls=self._backend_tls(),
        )
        self.observers: list[RecordObserver] = [log_close]
        self.metrics: Metrics | None = None
        if self["metrics"] is not None:
            _endpoint("--metrics", self["metrics"], serverFromString)
            self.metrics = Metrics()
            self.observers.append(self.metrics.observe)
        # Last: nothing is created on disk for a command line that fails.
        if self["connection-log"] is not None:
            self.observers.append(ConnectionLog.open(self["connection-log"]))
        return config

    def _backend_tls(self) -> BackendTLS | None:
        """TLS toward a C{tls:} backend, verified by C{--backend-ca}'s CAs."""
        ca = self["backend-ca"]
        if not self["connect"].startswith(TLS_PREFIX):
            if ca is not None:
                raise ConfigError(f"--backend-ca {ca}: needs --connect tls:HOST:PORT")
            return None
        return BackendTLS(host_of(self["connect"]), ca)

    def _client_mode(self) -> bool:
        """Whether C{--client} is given, and without a client-side TLS option."""
        if not self["client"]:
            return False
        if not self["connect"].startswith(TLS_PREFIX):
            raise ConfigError("--client needs --connect tls:HOST:PORT")
        if self["listen"].startswith("haproxy:"):
            raise ConfigError(f"--client: not with --listen {self['listen']}")
        given = [f"--{o}" for o in _SERVER_TLS if self[o] != self.defaults[o]]
        given += ["--allow-*"] if any(self.allowed.values()) else []
        if given:
            raise ConfigError(f"--client: not with {', '.join(given)}")
        return True

    def _header(self) -> HeaderEncoder:
        version = self["proxy-protocol"]
        if version is None:
            return no_header
        if version not in ENCODERS:
            raise ConfigError(f"--proxy-protocol {version}: must be v1 or v2")
        return ENCODERS[version]

    def _allow(self) -> AllowList:
        if self["client-ca"] is None and any(self.allowed.values()):
            raise ConfigError("--allow-cn, -ou, -dns and -uri need --client-ca")
        return AllowList(**{kind: frozenset(v) for kind, v in self.allowed.items()})

    def _context(self) -> SSL.Context:
        client_ca = self["client-ca"]
        policy = TLSPolicy(
            alpn=_protocols(self["alpn"]),
            minimum=_tls_version(self["tls-min"]),
            ciphers=_ciphers(self["ciphers"]),
            client_cas=() if client_ca is None else load_client_cas(client_ca),
        )
        name = self["self-signed"]
        if name is not None:
            if self["cert"] or self["key"]:
                raise ConfigError(f"--self-signed {name}: not with --cert or --key")
            made = self_signed(name, policy)
            self.fingerprint = made.fingerprint
            return made.context
        if self["cert"] is None:
            raise ConfigError("--cert FILE (or --self-signed NAME) is required")
        return load_server_context(self["cert"], self["key"], policy)


# The options of the TLS toward the clients, which --client has not.
_SERVER_TLS = ("cert", "key", "self-signed", "client-ca", "alpn", "tls-min", "ciphers")
_TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


def _tls_version(text: str) -> int:
    if text not in _TLS_VERSIONS:
        raise ConfigError(f"--tls-min {text}: must be 1.2 or 1.3")
    return _TLS_VERSIONS[text]


def _protocols(text: str) -> tuple[bytes, ...]:
    """ALPN protocol names, comma-separated: printable ASCII, 1 to 255 bytes."""
    if not text:
        return ()
    names = text.split(",")
    if not all(re.fullmatch("[!-~]{1,255}", name) for name in names):
        raise ConfigError(f"--alpn {text}: names are 1 to 255 printable ASCII bytes")
    return tuple(name.encode("ascii") for name in names)


def _ciphers(text: str) -> str:
    """An OpenSSL cipher string that matches at least one TLS 1.2 cipher."""
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(text.encode("ascii"))
    except (SSL.Error, UnicodeError):
        raise ConfigError(f"--ciphers {text}: no cipher matches") from None
    return text


class StartupError(Exception):
    """A failure after the options were accepted; its text is one line."""


def _one_line(hook: Callable[..., object]) -> Callable[..., object]:
    """
    Wrap C{sys.excepthook} so that a L{StartupError} escaping twistd prints
    its one line instead of a traceback (the exit status stays 1).
    """

    def excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if issubclass(kind, StartupError):
            sys.stderr.write(f"{value}\n")
        else:
            hook(kind, value, tb)

    return excepthook


class _Twistd(MultiService):
    """
    What only twistd's process gets: a port that cannot be bound ends
    start-up with one line and exit status 1, not a traceback (it must be an
    C{Exception}: that is what twistd reports to its parent process when it
    daemonizes); and SIGTERM, after the drain, exits with status 0 (twistd
    would re-raise the signal, so that the status said "killed").
    """

    def __init__(self, listen: str, service: IService, reactor: IReactorCore) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._listen = listen
        self._reactor = reactor
        service.setServiceParent(self)

    @override
    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as e:
            raise StartupError(f"tlsproxy: --listen {self._listen}: {e}") from None

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # After the reactor has installed its own handlers, which it does
        # once running.
        self._reactor.callWhenRunning(self._take_sigterm)

    def _take_sigterm(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, number: int, frame: object) -> None:
        IReactorThreads(self._reactor).callFromThread(self._stop)

    def _stop(self) -> None:
        with contextlib.suppress(ReactorNotRunning):  # a second SIGTERM
            self._reactor.stop()


def makeService(options: Options) -> IService:
    """The service for validated C{options}, on the global reactor."""
    from twisted.internet import reactor

    sys.excepthook = _one_line(sys.excepthook)
    if options.fingerprint is not None:
        _log.warn(
            "self-signed certificate for {name}, made for trying out only;"
            " SHA-256 fingerprint {fingerprint}",
            name=options["self-signed"],
            fingerprint=options.fingerprint,
        )
    service = proxy_service(options.config, reactor, fan_out(options.observers))
    top = _Twistd(options["listen"], service, reactor)
    metrics = options.metrics
    if metrics is not None:
        metrics.watch(options.config.service, service.tls)
        page = strports.service(options["metrics"], Site(metrics.page()), reactor)
        page.setServiceParent(top)
    return top
