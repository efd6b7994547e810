"""
Endpoint strings as tlsproxy reads them: its prefixes (C{haproxy:}, C{tls:})
and what a listening endpoint binds, to tell two services apart.
"""

from __future__ import annotations

import re

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint

BALANCED = "haproxy:"  # --listen haproxy:ENDPOINT: a PROXY header comes first
TLS = "tls:"  # --connect tls:HOST:PORT: TCP, then TLS verified by tlsproxy
_ANY = ("", "0.0.0.0", "::")  # the interfaces that are every interface


def behind_balancer(listen: str) -> tuple[bool, str]:
    """Whether C{listen} has the C{haproxy:} prefix, and the endpoint after it."""
    balanced = listen[: len(BALANCED)].lower() == BALANCED
    return balanced, listen[len(BALANCED) :] if balanced else listen


def _fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    """The kind, positional and named arguments of an endpoint string."""
    kind, _, rest = description.partition(":")
    fields = [f.replace("\\:", ":") for f in re.split(r"(?<!\\):", rest)]
    named = dict(f.split("=", 1) for f in fields if "=" in f)
    return kind.lower(), [f for f in fields if "=" not in f] + ["", ""], named


def binds(listen: str) -> tuple[str, str, str]:
    """
    What C{listen} binds: C{("tcp", port, interface)} (for C{tcp6:} too),
    C{("unix", path, "")}, or its kind and the rest.
    """
    kind, plain, named = _fields(behind_balancer(listen)[1])
    if kind in ("tcp", "tcp6"):
        return "tcp", named.get("port", plain[0]), named.get("interface", plain[1])
    if kind == "unix":
        return kind, named.get("address", plain[0]), ""
    return kind, listen.partition(":")[2], ""


def overlap(one: str, other: str) -> bool:
    """Whether two listening endpoints bind one port (not 0) or one path."""
    (kind, where, interface), (kind2, where2, interface2) = binds(one), binds(other)
    return (kind, where) == (kind2, where2) != ("tcp", "0") and (
        interface == interface2 or interface in _ANY or interface2 in _ANY
    )


def client_from_string(reactor: object, text: str) -> IStreamClientEndpoint:
    """Twisted's C{clientFromString}, C{tls:} read as C{tcp:} (TLS goes on top)."""
    if text.startswith(TLS):
        text = "tcp:" + text[len(TLS) :]
    endpoint: IStreamClientEndpoint = clientFromString(reactor, text)
    return endpoint


def reaches(connect: str) -> tuple[str, int | None, bool]:
    """
    A parsed backend endpoint's host, TCP port (not TCP: None), and whether
    it binds its source address (C{bindAddress}, as stunnel's C{local}).
    """
    kind, plain, named = _fields(connect)
    port = int(named.get("port", plain[1])) if kind in ("tcp", "tls") else None
    return named.get("host", plain[0]), port, "bindAddress" in named
