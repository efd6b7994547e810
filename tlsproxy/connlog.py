"""
The connection log: each connection record as one line of JSON.

The file is opened once, at start-up (before twistd chroots), in append
mode, and each record is written with a single write(2): a line is never
split, and a reader sees it whole.  Append mode also makes logrotate's
C{copytruncate} safe: after the truncation the next record starts at the
beginning of the file, with no hole before it.
"""

from __future__ import annotations

import errno
import json
import os

import attrs
from twisted.logger import Logger

from .record import ConnectionRecord
from .values import ConfigError

_log = Logger(namespace="tlsproxy")


class ConnectionLog:
    """A record observer that appends JSON Lines to a file."""

    def __init__(self, path: str, fd: int) -> None:
        self._path = path
        self._fd = fd

    @classmethod
    def open(cls, path: str) -> ConnectionLog:
        """
        Open (or create, mode 0640) the log at C{path} for appending; not
        through a symbolic link (a user who can write the directory could
        otherwise point root's start-up at any file).

        @raise ConfigError: the file cannot be opened, or is a link.
        """
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o640)
        except OSError as e:
            why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise ConfigError(f"--connection-log {path}: {why}") from None
        return cls(path, fd)

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
