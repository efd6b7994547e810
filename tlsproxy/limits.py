"""
Connection limits: which new connections a service admits.  Past its
C{limits.total} live connections, or C{limits.per_client} from one address,
or its L{SharedLimit}'s total across the services of a process, a new
connection is accepted and closed at once, before any TLS byte; refusals
are counted, and logged once per C{limits.report} seconds at most.
"""

from __future__ import annotations

import math
from collections import Counter

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from typing_extensions import override

from .values import Limits

_log = Logger(namespace="tlsproxy")


class SharedLimit:
    """At most C{total} live connections across the admissions that share it."""

    def __init__(self, total: float = math.inf) -> None:
        self.total = total
        self.admissions: list[Admission] = []

    def full(self) -> bool:
        return sum(a.live for a in self.admissions) >= self.total


class Admission:
    """The live connections of C{service}, by client host, within C{limits}."""

    def __init__(
        self, service: str, limits: Limits, shared: SharedLimit, clock: IReactorTime
    ) -> None:
        self._service, self._limits, self._shared = service, limits, shared
        self._clock = clock
        shared.admissions.append(self)
        self._by_host: Counter[str | None] = Counter()
        self.live = self.accepted = self.refused = self._unreported = 0

    def admit(self, host: str | None) -> bool:
        """Whether a new connection from C{host} is let in (and counted)."""
        if (
            self.live >= self._limits.total
            or self._by_host[host] >= self._limits.per_client
            or self._shared.full()
        ):
            self.refused += 1
            self._unreported += 1
            if self._unreported == 1:
                self._clock.callLater(self._limits.report, self._report)
            return False
        self.accepted += 1
        self.live += 1
        self._by_host[host] += 1
        return True

    def release(self, host: str | None) -> None:
        """An admitted connection from C{host} has ended."""
        self.live -= 1
        self._by_host[host] -= 1
        if not self._by_host[host]:
            del self._by_host[host]

    def _report(self) -> None:
        _log.warn(
            "[{service}] refused {count} connection(s) over the limits in"
            " {seconds} s ({live} live now)",
            service=self._service,
            count=self._unreported,
            seconds=self._limits.report,
            live=self.live,
        )
        self._unreported = 0


class Refused(Protocol):
    """A connection not admitted: closed at once, before any TLS byte."""

    @override
    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
