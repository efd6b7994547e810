"""A proxy as a Twisted service: it relays, drains, rotates keys, reloads."""

from __future__ import annotations

import typing

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from typing_extensions import override

from .backend import Backend
from .endpoints import client_from_string
from .listen import Admission, SharedLimit, accepting, listening
from .record import RecordObserver, log_close
from .relay import RelayFactory
from .values import ConfigError, ProxyConfig

_log = Logger(namespace="tlsproxy")
TICKET_KEY_LIFETIME = 3600.0  # seconds: how long ticket keys (and sessions) live


class _Reloadable(typing.Protocol):
    def reload(self) -> None: ...


class ProxyService(MultiService):
    """C{config}'s service; stopped, it lets live connections drain, then aborts."""

    def __init__(
        self,
        config: ProxyConfig,
        listening: IService,
        relay: RelayFactory,
        clock: IReactorTime,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        listening.setServiceParent(self)
        self.config, self.relay = config, relay
        self.reload_failures = 0
        self._clock = clock
        self._rotation = LoopingCall(self._rotate)
        self._rotation.clock = clock
        # What a reload reads again: the certificates, the backend's CAs.
        files = (config.certificates, config.backend_tls)
        self._files: list[_Reloadable] = [f for f in files if f is not None]

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.config.certificates is not None:  # (--client: no TLS toward clients)
            self._rotation.start(TICKET_KEY_LIFETIME, now=False)

    def _rotate(self) -> None:
        self.config.certificates.rotate()  # type: ignore[union-attr]

    def reload(self) -> None:
        """Read the files again; a bad one keeps the old, logged and counted."""
        failed = False
        for files in self._files:
            try:
                files.reload()
            except ConfigError as e:
                failed = True
                _log.error(
                    "{service}: reload failed, the old certificates stay: {error}",
                    service=self.config.service,
                    error=str(e),
                )
        self.reload_failures += failed
        if not failed:
            _log.info("{service}: certificates reloaded", service=self.config.service)

    @override
    def stopService(self) -> Deferred[None]:
        if self._rotation.running:  # (not under --client, nor before it started)
            self._rotation.stop()
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._drained(stopped))

    async def _drained(self, stopped: Deferred[object]) -> None:
        await stopped
        live = self.relay.live
        deadline = self._clock.seconds() + self.config.limits.drain
        while live and self._clock.seconds() < deadline:
            await deferLater(self._clock, 0.05, lambda: None)
        for side in list(live):
            side.abort("drain timeout")
        # Aborted connections end at the next turn, writing their records.
        while live and self._clock.seconds() < deadline + 1:
            await deferLater(self._clock, 0.01, lambda: None)


def proxy_service(
    config: ProxyConfig,
    reactor: object,
    observe: RecordObserver = log_close,
    shared: SharedLimit | None = None,
) -> ProxyService:
    """
    The service of C{config} on C{reactor} (it binds, or raises, when
    started); records to C{observe}; C{shared}: a cap across services.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    admission = Admission(config.service, config.limits, shared or SharedLimit(), clock)
    tcp = client_from_string(reactor, config.connect)
    backend = Backend(tcp, config.backend_tls, clock)
    relay = RelayFactory(config, backend, admission, clock, observe)
    factory = accepting(relay, config.certificates, clock)
    service = listening(config.listen, factory, reactor, config.reuse_port)
    return ProxyService(config, service, relay, clock)
