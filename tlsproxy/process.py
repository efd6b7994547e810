"""
twistd's process around the services: a port that cannot be bound is one
line and exit status 1; SIGTERM drains, then exits 0; SIGHUP reloads.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger
from typing_extensions import override

from .endpoints import reaches
from .sandbox import SandboxError, confine
from .service import ProxyService

_log = Logger(namespace="tlsproxy")
# Readable: Twisted's reserve descriptor (for EMFILE), getaddrinfo's files.
READABLE = ("/dev/null", "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf")


class StartupError(Exception):
    """A failure after the options were accepted; its text is one line."""


def one_line(hook: Callable[..., object]) -> Callable[..., object]:
    """C{sys.excepthook} for twistd: a L{StartupError} is its line, no traceback."""

    def excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if issubclass(kind, StartupError):
            sys.stderr.write(f"{value}\n")
        else:
            hook(kind, value, tb)

    return excepthook


class Process(MultiService):
    """twistd's services; C{proxies}: the proxies among them, in order."""

    def __init__(
        self, reactor: IReactorCore, confinement: Callable[[], None] | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reactor, self._confinement = reactor, confinement
        self._where: dict[IService, str] = {}
        self.proxies: list[ProxyService] = []
        self._sighup = signal.getsignal(signal.SIGHUP)  # put back on stop

    def add(self, service: IService, where: str) -> None:
        """Start and stop C{service} too; a bind failure names it C{where}."""
        service.setServiceParent(self)
        self._where[service] = where
        if isinstance(service, ProxyService):
            self.proxies.append(service)

    @override
    def privilegedStartService(self) -> None:
        for service in self:
            try:
                service.privilegedStartService()
            except CannotListenError as e:
                raise StartupError(f"tlsproxy: {self._where[service]}: {e}") from None

    @override
    def startService(self) -> None:
        if self._confinement is not None:  # (bound, privileges dropped)
            self._confinement()
        super().startService()  # type: ignore[no-untyped-call]
        # After the reactor's own handlers, which it installs once running.
        self._reactor.callWhenRunning(self._take_signals)

    def _take_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)

    @override
    def stopService(self) -> Deferred[None]:
        signal.signal(signal.SIGHUP, self._sighup)
        return super().stopService()  # type: ignore[no-any-return,no-untyped-call]

    def _on_signal(self, number: int, frame: object) -> None:
        act = self._stop if number == signal.SIGTERM else self._reload
        IReactorThreads(self._reactor).callFromThread(act)

    def _reload(self) -> None:
        for proxy in self.proxies:
            proxy.reload()

    def _stop(self) -> None:
        # (twistd's own handler would end with status "killed", not 0)
        with contextlib.suppress(ReactorNotRunning):  # (a second SIGTERM)
            self._reactor.stop()


def confinement(
    files: Sequence[str], backends: Sequence[str], twistd: Mapping[str, Any] | None
) -> Callable[[], None]:
    """
    Confining the process, once it serves, to reading C{files} (a
    directory's C{*.pem} too) and L{READABLE}, TCP to C{backends}, rotating
    twistd's log (C{twistd}: its options; None: not under twistd).
    """
    reached = [reaches(backend) for backend in backends]
    ports = [port for _, port, _ in reached if port is not None]
    ephemeral = any(binds for _, _, binds in reached)
    twistd = twistd or {"nodaemon": True}
    daemon = not (twistd["nodaemon"] or twistd.get("syslog"))
    log = twistd.get("logfile") or ("twistd.log" if daemon else "-")
    rotating = None if log == "-" else os.path.dirname(os.path.abspath(log))

    def confined() -> None:
        readable = list(READABLE)
        for path in files:
            readable += [path, *glob.glob(os.path.join(glob.escape(path), "*.pem"))]
        try:
            line = confine(readable, ports, ephemeral, rotating)
        except SandboxError as e:
            raise StartupError(f"tlsproxy: {e} (--no-sandbox: not confined)") from None
        if line is None:
            _log.warn("no Landlock (Linux 5.13+ on x86_64, aarch64): not confined")
        else:
            _log.info("{line}", line=line)

    return confined
