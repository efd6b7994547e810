"""Connection records (fields: tlsproxy(8)), twistd's line, the connection log."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .peer import printable


@attrs.frozen(kw_only=True)
class ConnectionRecord:
    """One connection, C{"open"} (backend connected) or C{"close"}; None: n/a."""

    event: str
    id: str
    service: str
    client_host: str | None = None
    client_port: int | None = None
    listen_host: str | None = None
    listen_port: int | None = None
    balancer_host: str | None = None
    balancer_port: int | None = None
    backend_local_host: str | None = None
    backend_local_port: int | None = None
    backend_host: str | None = None
    backend_port: int | None = None
    opened: float
    closed: float | None = None
    duration: float | None = None
    handshake_time: float | None = None
    connect_time: float | None = None
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    tls_version: str | None = None
    cipher: str | None = None
    sni: str | None = None
    alpn: str | None = None
    client_cert: str | None = None
    client_cn: str | None = None
    reason: str | None = None


RecordObserver = Callable[[ConnectionRecord], None]


class Recording:
    """A record in the making (facts, bytes, first reason), for C{observe}."""

    def __init__(self, service: str, clock: IReactorTime, observe: RecordObserver):
        self._clock, self._observe = clock, observe
        self.facts: dict[str, typing.Any] = {
            "id": os.urandom(16).hex(),
            "service": service,
            "opened": clock.seconds(),
        }
        self.from_client = self.to_client = 0
        self.reason: str | None = None

    def because(self, reason: str) -> None:
        """Note why the connection ends, unless a reason came first."""
        if self.reason is None:
            self.reason = reason

    def record(self, **changes: typing.Any) -> ConnectionRecord:
        """The record as it is now, with C{changes}."""
        return ConnectionRecord(
            **self.facts,
            bytes_from_client=self.from_client,
            bytes_to_client=self.to_client,
            **changes,
        )

    def opened(self) -> None:
        """Publish the C{open} record: the backend is connected."""
        self._observe(self.record(event="open"))

    def closed(self) -> None:
        """Publish the C{close} record: both sides are gone."""
        closed = self._clock.seconds()
        end = {"closed": closed, "duration": closed - self.facts["opened"]}
        self._observe(self.record(event="close", reason=self.reason, **end))


def fan_out(observers: list[RecordObserver]) -> RecordObserver:
    """One observer that hands each record to all of C{observers}, in order."""

    def observe(record: ConnectionRecord) -> None:
        for observer in observers:
            observer(record)

    return observe


def _endpoint(host: str | None, port: int | None) -> str:
    """C{host:port}; a UNIX socket's path alone; C{-} for none."""
    return "-" if host is None else host if port is None else f"{host}:{port}"


_log = Logger(namespace="tlsproxy")


def log_close(record: ConnectionRecord) -> None:
    """
    A line in twistd's log per closed connection, as stunnel's, control
    characters escaped (one f-string: Twisted's formatting costs 2.7 times).
    """
    if record.event == "close":
        client = _endpoint(record.client_host, record.client_port)
        local = _endpoint(record.backend_local_host, record.backend_local_port)
        backend = _endpoint(record.backend_host, record.backend_port)
        line = (
            f"[{record.service}] {record.id} from {client} via {local} to"
            f" {backend} closed: {record.reason}; {record.bytes_from_client} bytes"
            f" from client, {record.bytes_to_client} bytes to client in"
            f" {record.duration:.3f} s"
        )
        _log.info("{line}", line=printable(line), service=record.service)


class ConnectionLog:
    """
    A JSON line per record, one write(2) in append mode (never split;
    C{copytruncate} is safe), the file opened before twistd chroots.
    """

    def __init__(self, path: str, fd: int) -> None:
        self._path = path
        self._fd = fd

    @classmethod
    def open(cls, path: str) -> ConnectionLog:
        """Open or create (0640) C{path} to append, not by a link (OSError ELOOP)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        return cls(path, os.open(path, flags, 0o640))

    def __call__(self, record: ConnectionRecord) -> None:
        line = json.dumps(attrs.asdict(record), separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode("utf-8"))
        except OSError as e:
            _log.error(
                "[{service}] connection log {path}: {error}; record {id} not written",
                service=record.service,
                path=self._path,
                error=e.strerror,
                id=record.id,
            )

    def close(self) -> None:
        """Close the file (for tests and embedding; twistd exits instead)."""
        os.close(self._fd)
