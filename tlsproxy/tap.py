"""C{twistd tlsproxy}: options read as root before the chroot, then composed."""

from __future__ import annotations

import encodings.idna  # noqa: F401  (getaddrinfo needs it; not in a jail)
import errno
import math
import resource
import sys
from collections.abc import Callable

import attrs
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from typing_extensions import override

from .backend import BackendTLS
from .config import read_services
from .context import Certificates, from_files
from .credentials import Identity, self_signed
from .endpoints import TLS, behind_balancer, client_from_string, overlap, reaches
from .listen import SharedLimit
from .metrics import Metrics
from .peer import printable
from .process import Process, confinement, one_line
from .proxyheader import ENCODERS, no_header
from .record import ConnectionLog, RecordObserver, fan_out, log_close
from .service import proxy_service
from .values import (
    TLS12_CIPHERS,
    AllowList,
    ConfigError,
    Limits,
    ProxyConfig,
    Timeouts,
    TLSPolicy,
    check_endpoint,
    limit,
)

_log = Logger(namespace="tlsproxy")
PROCESS_WIDE = frozenset({"config", "metrics", "max-connections-total", "no-sandbox"})
ALLOW = ("cn", "ou", "dns", "uri")
REPEATABLE = ("cert", "key", *(f"allow-{kind}" for kind in ALLOW))
# The options of the TLS toward the clients, which --client has not.
_SERVER_TLS = ("self-signed", "client-ca", "alpn", "tls-min", "ciphers", "sni-strict")


def _descriptors() -> float:
    """The default total: two descriptors a connection, 64 kept for the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return math.inf if soft == resource.RLIM_INFINITY else max(1, (soft - 64) // 2)


def _repeat(name: str, doc: str) -> Callable[[Options, str], None]:
    """An C{opt_} method for a repeatable option: each value is kept."""

    def opt(self: Options, value: str) -> None:
        self.repeated[name].append(value)

    opt.__doc__ = doc
    return opt


class Options(usage.Options):
    """The options of C{twistd tlsproxy}; see tlsproxy(8) for each."""

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
        ["max-connections-total", None, None, "Of all services [default: by fds]."],
        ["drain-timeout", None, "10", "Seconds for live connections on SIGTERM."],
        ["metrics", None, None, "Serve Prometheus metrics on this endpoint."],
        ["alpn", None, "", "ALPN protocols to offer, e.g. http/1.1 [default: none]."],
        ["tls-min", None, "1.2", "The lowest TLS version: 1.2 or 1.3."],
        ["ciphers", None, TLS12_CIPHERS, "TLS 1.2 ciphers (OpenSSL cipher string)."],
        ["client-ca", None, None, "Require client certificates signed by this CA."],
        ["backend-ca", None, None, "Verify a tls: backend with these PEM CAs."],
    ]
    optFlags = [
        ["sni-strict", None, "Refuse an SNI name no certificate serves."],
        ["client", None, "Accept plain TCP (needs --connect tls:...)."],
        ["reuse-port", None, "Share the --listen port with other processes."],
        ["quiet", None, "No line per connection in twistd's log."],
        ["no-sandbox", None, "Do not confine the process with Landlock."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.repeated: dict[str, list[str]] = {name: [] for name in REPEATABLE}

    opt_cert = _repeat("cert", "PEM certificate, or a directory of .pem files (SNI).")
    opt_key = _repeat("key", "PEM private key, one per --cert [default: in it].")
    opt_allow_cn = _repeat("allow-cn", "Let in client certificates of this CN.")
    opt_allow_ou = _repeat("allow-ou", "Let in client certificates of this OU.")
    opt_allow_dns = _repeat("allow-dns", "Let in client certificates of this DNS name.")
    opt_allow_uri = _repeat("allow-uri", "Let in client certificates of this URI.")
    fingerprint: str | None = None

    @override
    def postOptions(self) -> None:
        try:
            given = self["max-connections-total"]
            self.total = (
                limit("max-connections-total", given) if given else _descriptors()
            )
            self.metrics = None if self["metrics"] is None else Metrics()
            if self.metrics is not None:
                check_endpoint("metrics", serverFromString, self["metrics"])
            self.services = [self] if self["config"] is None else _services(self)
            if self["config"] is None:
                self.config, self.observers = self._config(), self._observers()
        except ConfigError as e:
            raise usage.UsageError(printable(str(e))) from None

    def _config(self) -> ProxyConfig:
        connect, ca = self["connect"], self["backend-ca"]
        version = self["proxy-protocol"]
        if connect is None:
            raise ConfigError("--connect is required (for example tcp:127.0.0.1:80)")
        if ca is not None and not connect.startswith(TLS):
            raise ConfigError(f"--backend-ca {ca}: needs --connect tls:HOST:PORT")
        if version not in (None, *ENCODERS):
            raise ConfigError(f"--proxy-protocol {version}: must be v1 or v2")
        check_endpoint("listen", serverFromString, behind_balancer(self["listen"])[1])
        check_endpoint("connect", client_from_string, connect)  # (before the files)
        tls = BackendTLS(reaches(connect)[0], ca) if connect.startswith(TLS) else None
        return ProxyConfig(
            listen=self["listen"],
            connect=connect,
            certificates=None if self._client_mode() else self._certificates(),
            timeouts=Timeouts(
                handshake=self["handshake-timeout"],
                connect=self["connect-timeout"],
                idle=self["idle-timeout"],
            ),
            limits=Limits(
                total=self["max-connections"],
                drain=self["drain-timeout"],
            ),
            allow=AllowList(
                cn=self.repeated["allow-cn"],
                ou=self.repeated["allow-ou"],
                dns=self.repeated["allow-dns"],
                uri=self.repeated["allow-uri"],
            ),
            backend_tls=tls,
            reuse_port=bool(self["reuse-port"]),
            header=ENCODERS[version] if version else no_header,
        )

    def _observers(self) -> list[RecordObserver]:
        """twistd's log line (unless quiet), the metrics, the connection log."""
        observers: list[RecordObserver] = [] if self["quiet"] else [log_close]
        if self.metrics is not None:
            observers.append(self.metrics.observe)
        # Last: nothing is created on disk for a command line that fails.
        if (path := self["connection-log"]) is not None:
            try:
                observers.append(ConnectionLog.open(path))
            except OSError as e:
                why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
                raise ConfigError(f"--connection-log {path}: {why}") from None
        return observers

    def _client_mode(self) -> bool:
        """Whether C{--client} is given, and without a client-side TLS option."""
        if not self["client"]:
            return False
        given = [f"--{o}" for o in _SERVER_TLS if self[o] != self.defaults[o]]
        given += [f"--{o}" for o in REPEATABLE if self.repeated[o]]
        if given:
            raise ConfigError(f"--client: not with {', '.join(given)}")
        return True

    def _certificates(self) -> Certificates:
        name = self["self-signed"]
        certs, keys = self.repeated["cert"], self.repeated["key"]
        made: list[Identity] = []
        if name is not None:
            if certs or keys:
                raise ConfigError(f"--self-signed {name}: not with --cert or --key")
            self_made = self_signed(name)
            self.fingerprint = self_made.fingerprint
            made.append(self_made.identity)
        policy = TLSPolicy(
            alpn=self["alpn"], minimum=self["tls-min"], ciphers=self["ciphers"]
        )
        return from_files(
            certs,
            keys,
            client_ca=self["client-ca"],
            identities=made,
            policy=policy,
            strict=bool(self["sni-strict"]),
        )

    def files(self) -> list[str]:
        """The files a reload reads."""
        cas = [self[o] for o in ("client-ca", "backend-ca") if self[o] is not None]
        return self.repeated["cert"] + self.repeated["key"] + cas


KINDS: dict[str, str] = {
    **{str(option[0]): "value" for option in Options.optParameters},
    **{str(option[0]): "flag" for option in Options.optFlags},
    **{name: "values" for name in REPEATABLE},
}
"""What each option takes, for the --config file: see L{tlsproxy.config}."""


def _services(top: Options) -> list[Options]:
    """The services of C{top}'s --config, each named by its section."""
    path = top["config"]
    beside = [o for o in top.defaults if top[o] != top.defaults[o]]
    beside += [o for o in REPEATABLE if top.repeated[o]]
    if set(beside) - PROCESS_WIDE:
        raise ConfigError(
            f"--{min(set(beside) - PROCESS_WIDE)}: with --config, set it in {path}"
        )
    services: list[Options] = []
    for name, options in read_services(path, _parse, KINDS, PROCESS_WIDE):
        options.config = attrs.evolve(options.config, service=name)
        for earlier in services:
            if overlap(options.config.listen, earlier.config.listen):
                raise ConfigError(
                    f"{path} [{name}] listen: {options.config.listen}: the port of"
                    f" [{earlier.config.service}] ({earlier.config.listen})"
                )
        if top.metrics is not None:
            options.observers.append(top.metrics.observe)
        services.append(options)
    return services


def _parse(argv: list[str]) -> Options:
    """One service of a --config file, as its own command line."""
    options = Options()
    options.parseOptions(argv)  # type: ignore[no-untyped-call]
    return options


def makeService(options: Options) -> IService:
    """The service for validated C{options}, on the global reactor."""
    from twisted.internet import reactor

    sys.excepthook = one_line(sys.excepthook)
    services = options.services
    files = [path for one in services for path in one.files()]
    backends = [one.config.connect for one in services]
    twistd = getattr(options, "parent", None)
    sandbox = None if options["no-sandbox"] else confinement(files, backends, twistd)
    process = Process(reactor, sandbox)
    shared, metrics = SharedLimit(options.total), options.metrics
    path = options["config"]
    for one in services:
        config = one.config
        if one.fingerprint is not None:
            made = f"self-signed certificate for {one['self-signed']}, for trying out"
            _log.warn(
                "[{service}] {made} only; SHA-256 fingerprint {fingerprint}",
                service=config.service,
                made=made,
                fingerprint=one.fingerprint,
            )
        service = proxy_service(config, reactor, fan_out(one.observers), shared)
        where = "--listen" if path is None else f"{path} [{config.service}] listen:"
        process.add(service, f"{where} {config.listen}")
        if metrics is not None:
            metrics.watch(config.service, service)
    if metrics is not None:
        page = metrics.service(options["metrics"], reactor)
        process.add(page, f"--metrics {options['metrics']}")
    return process
