"""
C{tlsproxy-stunnel2conf STUNNEL_CONF}: a stunnel configuration as a
C{--config} file for tlsproxy, printed on standard output, with the twistd
command line that runs it in a comment on top.

stunnel's global options become twistd's (C{chroot}, C{setuid}, ...); its
service options given globally go in C{[DEFAULT]}, or in a service named
C{tlsproxy} when the file has no section.  Each translated line keeps the
stunnel line as a comment above it; a line with no equivalent is kept as a
comment saying so, for the operator to decide.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

_TWISTD = {
    "chroot": "--chroot",
    "setuid": "--uid",
    "setgid": "--gid",
    "pid": "--pidfile",
    "output": "--logfile",
}
_SAME = {
    "cert": "cert",
    "key": "key",
    "cafile": "client-ca",
    "checkhost": "allow-dns",
    "ciphers": "ciphers",
    "timeoutidle": "idle-timeout",
    "timeoutconnect": "connect-timeout",
}


def _endpoint(kind: str, text: str) -> str:
    """A stunnel C{[host:]port} (or a path) as a Twisted endpoint string."""
    if text.startswith("/"):
        return f"unix:{text}"
    host, _, port = text.rpartition(":")
    escaped = host.replace(":", "\\:")
    if kind == "connect":
        return f"tcp:{escaped or '127.0.0.1'}:{port}"
    six = "6" if ":" in host else ""
    return f"tcp{six}:{port}" + (f":interface={escaped}" if host else "")


_FLAGS = {"syslog": ["--syslog", "--prefix", "tlsproxy"], "foreground": ["-n"]}

# stunnel's debug levels (syslog's, by name or number): below notice, stunnel
# logs no line per connection, and neither does tlsproxy with --quiet.
_QUIET = {"emerg", "alert", "crit", "err", "warning", "0", "1", "2", "3", "4"}
_LOUD = {"notice", "info", "debug", "5", "6", "7"}


def _keys(key: str, value: str) -> list[tuple[str, str]] | None:
    """The tlsproxy keys for one stunnel service line, or None: no equivalent."""
    if key == "local":
        return []
    if key in _SAME:
        return [(_SAME[key], value)]
    if key in ("accept", "connect"):
        return [("listen" if key == "accept" else key, _endpoint(key, value))]
    if key == "sslversionmin" and value in ("TLSv1.2", "TLSv1.3"):
        return [("tls-min", value[4:])]
    if (key, value) == ("protocol", "proxy"):
        return [("proxy-protocol", "v1")]
    if key == "debug":  # [facility.]level
        level = value.rpartition(".")[2].lower()
        if level in _QUIET:
            return [("quiet", "yes")]
        if level in _LOUD:
            return []  # (tlsproxy's default)
    return None


def translate(lines: Iterable[str]) -> tuple[str, list[str]]:
    """
    The tlsproxy configuration of stunnel.conf C{lines}, and the twistd
    options it needs.

    @raise ValueError: a line is neither a section, a comment nor
        C{key = value}; its text names the line.
    """
    twistd: list[str] = []
    notes: list[str] = []
    sections: dict[str, list[str]] = {"DEFAULT": []}
    local: dict[str, str] = {}
    name = "DEFAULT"
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            sections[name] = []
            continue
        key, equals, value = (part.strip() for part in line.partition("="))
        if not equals:
            raise ValueError(f"line {number}: not 'key = value': {line}")
        said, lower = f"# stunnel: {key} = {value}", key.lower()
        if name == "DEFAULT" and lower in _TWISTD:
            twistd += [_TWISTD[lower], value]
            continue
        if lower in _FLAGS:
            twistd += _FLAGS[lower] if value.lower() == "yes" else []
            continue
        if lower == "local":  # the source address: bindAddress on connect
            local[name] = value
        keys = _keys(lower, value)
        if keys is None:
            (notes if name == "DEFAULT" else sections[name]).append(
                f"{said}: no tlsproxy equivalent"
            )
        else:
            sections[name] += [said] + [f"{k} = {v}" for k, v in keys]
    if len(sections) == 1:
        sections["tlsproxy"], sections["DEFAULT"] = sections["DEFAULT"], []
        local["tlsproxy"] = local.pop("DEFAULT", "")
    return _text(sections, local, notes), twistd


def _text(
    sections: dict[str, list[str]], local: dict[str, str], notes: list[str]
) -> str:
    out = notes[:]
    for name, lines in sections.items():
        bind = local.get(name) or local.get("DEFAULT")
        if bind:
            lines = [
                f"{line}:bindAddress={bind}"
                if line.startswith("connect = tcp:")
                else line
                for line in lines
            ]
        out += ["", f"[{name}]", *lines]
    return "\n".join(out) + "\n"


def main(
    argv: list[str] | None = None, write: Callable[[str], object] = sys.stdout.write
) -> int:
    """The command: C{tlsproxy-stunnel2conf STUNNEL_CONF > tlsproxy.conf}."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: tlsproxy-stunnel2conf STUNNEL_CONF > tlsproxy.conf\n")
        return 2
    try:
        with open(args[0], encoding="utf-8") as f:
            text, twistd = translate(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        reason = e.strerror if isinstance(e, OSError) else str(e)
        sys.stderr.write(f"tlsproxy-stunnel2conf: {args[0]}: {reason}\n")
        return 1
    command = " ".join(["twistd", *twistd, "tlsproxy", "--config", "tlsproxy.conf"])
    write(f"# From {args[0]} by tlsproxy-stunnel2conf.  Run as:\n#   {command}\n{text}")
    return 0
