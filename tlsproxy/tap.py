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
import getopt
import ipaddress
import math
import re
import resource
import signal
import sys
from collections.abc import Callable, Sequence

import attrs
from OpenSSL import SSL
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site
from typing_extensions import override

from .backend import TLS_PREFIX, BackendTLS, client_from_string, host_of
from .config import read_services
from .connlog import ConnectionLog
from .metrics import Metrics
from .proxyheader import ENCODERS, HeaderEncoder, no_header
from .record import RecordObserver, fan_out, log_close
from .relay import Timeouts
from .service import (
    Limits,
    ProxyConfig,
    ProxyService,
    SharedLimit,
    binds,
    overlap,
    proxy_service,
)
from .tls import (
    TLS12_CIPHERS,
    AllowList,
    Certificates,
    ConfigError,
    Identity,
    TLSPolicy,
    from_files,
    self_signed,
)

_log = Logger(namespace="tlsproxy")
_ALLOW_KINDS = ("cn", "ou", "dns", "uri")
PROCESS_WIDE = frozenset({"config", "metrics", "max-connections-total"})
"""The options given on the command line also with C{--config}."""


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


def _descriptors() -> float:
    """
    The default C{--max-connections-total}: each connection takes two file
    descriptors (client and backend), and 64 are kept for the listening
    ports, the logs and the files a reload reads; so a process over its
    limit refuses new clients instead of failing to accept or to connect.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return math.inf if soft == resource.RLIM_INFINITY else max(1, (soft - 64) // 2)


def _processes(text: str | None) -> int:
    """C{--steer-clients}: 1 to 9999 processes, or 0 when not given."""
    if text is None:
        return 0
    if not re.fullmatch("0*[1-9][0-9]{0,3}", text):
        raise ConfigError(f"--steer-clients {text}: must be from 1 to 9999")
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
        ["config", None, None, "INI file of services, one per section."],
        ["listen", None, "tcp:443", "Server endpoint string to accept TLS on."],
        ["connect", None, None, "Client endpoint string of the backend (required)."],
        ["self-signed", None, None, "Make a throwaway certificate for NAME."],
        ["handshake-timeout", None, "30", "Seconds for the TLS handshake."],
        ["connect-timeout", None, "30", "Seconds to connect to the backend."],
        ["idle-timeout", None, "3600", "Seconds without traffic before closing."],
        ["connection-log", None, None, "Append a JSON line per record to FILE."],
        ["proxy-protocol", None, None, "Send a PROXY header to the backend: v1|v2."],
        ["max-connections", None, None, "Live connections at most [default: any]."],
        ["max-connections-per-client", None, None, "From one address at most."],
        [
            "max-connections-total",
            None,
            None,
            "Live connections of all services [default: half the descriptors].",
        ],
        ["drain-timeout", None, "10", "Seconds for live connections on SIGTERM."],
        ["metrics", None, None, "Serve Prometheus metrics on this endpoint."],
        ["alpn", None, "", "ALPN protocols to offer, e.g. http/1.1 [default: none]."],
        ["tls-min", None, "1.2", "The lowest TLS version: 1.2 or 1.3."],
        ["ciphers", None, TLS12_CIPHERS, "TLS 1.2 ciphers (OpenSSL cipher string)."],
        ["client-ca", None, None, "Require client certificates signed by this CA."],
        ["backend-ca", None, None, "Verify a tls: backend with these PEM CAs."],
        ["steer-clients", None, None, "With --reuse-port: N processes, by client."],
    ]
    optFlags = [
        ["sni-strict", None, "Refuse an SNI name no certificate serves."],
        ["client", None, "Accept plain TCP (needs --connect tls:...)."],
        ["reuse-port", None, "Share the --listen port with other processes."],
        ["quiet", None, "No line per connection in twistd's log."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.cert_paths: list[str] = []
        self.key_paths: list[str] = []
        self.allowed: dict[str, set[str]] = {
            k: set() for k in ("cn", "ou", "dns", "uri")
        }

    def opt_cert(self, path: str) -> None:
        """PEM certificate, or a directory of .pem files (repeatable: SNI)."""
        self.cert_paths.append(path)

    def opt_key(self, path: str) -> None:
        """PEM private key file, one per --cert [default: the --cert file]."""
        self.key_paths.append(path)

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
    given: frozenset[str] = frozenset()

    @override
    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Which options are given, their names spelled out as getopt does.
        with contextlib.suppress(getopt.GetoptError):  # reported by usage
            args = sys.argv[1:] if options is None else options
            found, _ = getopt.getopt(args, self.shortOpt, self.longOpt)
            self.given = frozenset(name.lstrip("-") for name, _ in found)
        super().parseOptions(options)  # type: ignore[no-untyped-call]

    @override
    def postOptions(self) -> None:
        try:
            total = self["max-connections-total"]
            self.total = (
                _descriptors()
                if total is None
                else _count("--max-connections-total", total)
            )
            if self["config"] is None:
                self.config = self._config()
                self.services = [self]
            else:
                self.services = _services(self)
        except ConfigError as e:
            raise usage.UsageError(_one_line_of(str(e))) from None

    def _config(self) -> ProxyConfig:
        if self["connect"] is None:
            raise ConfigError("--connect is required (for example tcp:127.0.0.1:80)")
        config = ProxyConfig(
            listen=_endpoint("--listen", self["listen"], serverFromString),
            connect=_endpoint("--connect", self["connect"], client_from_string),
            certificates=None if self._client_mode() else self._certificates(),
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
            reuse_port=bool(self["reuse-port"]),
            steer_clients=_processes(self["steer-clients"]),
        )
        self.observers: list[RecordObserver] = [] if self["quiet"] else [log_close]
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
        given += ["--cert/--key"] if self.cert_paths or self.key_paths else []
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

    def _certificates(self) -> Certificates:
        policy = TLSPolicy(
            alpn=_protocols(self["alpn"]),
            minimum=_tls_version(self["tls-min"]),
            ciphers=_ciphers(self["ciphers"]),
        )
        made: list[Identity] = []
        name = self["self-signed"]
        if name is not None:
            if self.cert_paths or self.key_paths:
                raise ConfigError(f"--self-signed {name}: not with --cert or --key")
            self_made = self_signed(name)
            self.fingerprint = self_made.fingerprint
            made.append(self_made.identity)
        return from_files(
            self.cert_paths,
            self.key_paths,
            client_ca=self["client-ca"],
            identities=made,
            policy=policy,
            strict=bool(self["sni-strict"]),
        )


# The options of the TLS toward the clients, which --client has not.
_SERVER_TLS = ("self-signed", "client-ca", "alpn", "tls-min", "ciphers", "sni-strict")
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


def _services(top: Options) -> list[Options]:
    """The services of C{top}'s --config, each named by its section."""
    path = top["config"]
    beside = sorted(top.given - PROCESS_WIDE)
    if beside:
        raise ConfigError(f"--{beside[0]}: with --config, set it in {path}")
    top.metrics = None
    if top["metrics"] is not None:
        _endpoint("--metrics", top["metrics"], serverFromString)
        top.metrics = Metrics()
    services: list[Options] = []
    for name, options in read_services(path, Options, PROCESS_WIDE):
        options.config = attrs.evolve(options.config, service=name)
        listen = options.config.listen
        for earlier in services:
            if overlap(listen, earlier.config.listen):
                raise ConfigError(
                    f"{path} [{name}] listen: {listen}: the port of"
                    f" [{earlier.config.service}] ({earlier.config.listen})"
                )
        if top.metrics is not None:
            options.observers.append(top.metrics.observe)
        services.append(options)
    return services


def _loopback(interface: str) -> bool:
    """Whether C{interface} (an IP address, or empty: all) is a loopback one."""
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


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


@attrs.frozen
class Proxy:
    """One service of the process: its validated configuration, and it."""

    config: ProxyConfig
    service: ProxyService


class _Twistd(MultiService):
    """
    What only twistd's process gets: a port that cannot be bound ends
    start-up with one line and exit status 1, not a traceback (it must be an
    C{Exception}: that is what twistd reports to its parent process when it
    daemonizes); SIGTERM, after the drain, exits with status 0 (twistd
    would re-raise the signal, so that the status said "killed"); and
    SIGHUP reloads the certificates of every service.

    @ivar proxies: the services, in the order of the command line or file.
    """

    def __init__(self, reactor: IReactorCore) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reactor = reactor
        self._where: dict[IService, str] = {}
        self.proxies: list[Proxy] = []
        self._sighup = signal.getsignal(signal.SIGHUP)  # put back on stop

    def add(self, service: IService, where: str) -> None:
        """Start and stop C{service} too; a bind failure names it C{where}."""
        service.setServiceParent(self)
        self._where[service] = where

    @override
    def privilegedStartService(self) -> None:
        for service in self:
            try:
                service.privilegedStartService()
            except CannotListenError as e:
                raise StartupError(f"tlsproxy: {self._where[service]}: {e}") from None

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # After the reactor has installed its own handlers, which it does
        # once running.
        self._reactor.callWhenRunning(self._take_signals)

    def _take_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGHUP, self._on_sighup)

    @override
    def stopService(self) -> Deferred[None]:
        signal.signal(signal.SIGHUP, self._sighup)
        return super().stopService()  # type: ignore[no-any-return,no-untyped-call]

    def _on_sigterm(self, number: int, frame: object) -> None:
        IReactorThreads(self._reactor).callFromThread(self._stop)

    def _on_sighup(self, number: int, frame: object) -> None:
        IReactorThreads(self._reactor).callFromThread(self._reload)

    def _reload(self) -> None:
        for proxy in self.proxies:
            proxy.service.reload()

    def _stop(self) -> None:
        with contextlib.suppress(ReactorNotRunning):  # a second SIGTERM
            self._reactor.stop()


def makeService(options: Options) -> IService:
    """The service for validated C{options}, on the global reactor."""
    from twisted.internet import reactor

    sys.excepthook = _one_line(sys.excepthook)
    top = _Twistd(reactor)
    shared = SharedLimit(options.total)
    metrics = options.metrics
    path = options["config"]
    for one in options.services:
        config = one.config
        if one.fingerprint is not None:
            _log.warn(
                "[{service}] self-signed certificate for {name}, made for trying"
                " out only; SHA-256 fingerprint {fingerprint}",
                service=config.service,
                name=one["self-signed"],
                fingerprint=one.fingerprint,
            )
        service = proxy_service(config, reactor, fan_out(one.observers), shared)
        where = "--listen" if path is None else f"{path} [{config.service}] listen:"
        top.add(service, f"{where} {config.listen}")
        top.proxies.append(Proxy(config=config, service=service))
        if metrics is not None:
            metrics.watch(config.service, service)
    if metrics is not None:
        kind, _, interface = binds(options["metrics"])
        if kind == "tcp" and not _loopback(interface):
            _log.warn(
                "--metrics {endpoint}: listening beyond loopback; anyone who"
                " reaches it sees the services and their counts",
                endpoint=options["metrics"],
            )
        page = strports.service(options["metrics"], Site(metrics.page()), reactor)
        top.add(page, f"--metrics {options['metrics']}")
    return top
