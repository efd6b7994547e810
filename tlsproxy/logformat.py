"""
Apache LogFormat strings (mod_log_config) compiled into one regular
expression over the bytes of a log line.

Each directive, C{%[conditions][<>]{argument}[<>]letter}, becomes a pattern
for its kind of value: a word, a number, an escaped string (which may hold
spaces but no bare double quote), a time.  Only what tlsproxy-logjoin needs
is captured: the address fields C{%h} and C{%a}, the remote port
C{%{remote}p} with the space or colon beside it, and the first request time
that is complete.
"""

from __future__ import annotations

import calendar
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import attrs

# One directive, a bare "%" (an error), or literal text.
_TOKEN = re.compile(
    r"%(?P<conditions>[!<>0-9,]*)(?:\{(?P<argument>[^}]*)\})?[<>]*"
    r"(?P<letter>\^[a-zA-Z]{2}|[a-zA-Z%])|(?P<bad>%)|(?P<literal>[^%]+)"
)
# Apache's configuration parser turns \" into ", then mod_log_config turns
# \\, \n, \r and \t into one character.
_LITERAL_ESCAPE = re.compile(r'\\([\\"nrt])')
_UNESCAPED = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}

_WORD = r"\S+"
_NUMBER = r"-?[0-9]+"
_STRING = r'[^"\\]*(?:\\.[^"\\]*)*'
_BY_LETTER = dict.fromkeys("bBDIOSTkps", _NUMBER) | dict.fromkeys("aAhHlLmPvVX", _WORD)
_ADDRESSES = (("a", None), ("h", None))

_MONTHS = {
    name: number
    for number, name in enumerate(
        b"jan feb mar apr may jun jul aug sep oct nov dec".split(), 1
    )
}
_MONTH = "(?i:" + "|".join(name.decode() for name in _MONTHS) + ")"
# strftime conversions: (group name or "", pattern); any other is one word.
_CONVERSIONS = {
    "Y": ("Y", "[0-9]{4}"),
    "y": ("y", "[0-9]{2}"),
    "m": ("m", "[0-9]{2}"),
    "b": ("b", _MONTH),
    "h": ("b", _MONTH),
    "B": ("b", _MONTH + "[a-zA-Z]*"),
    "d": ("d", "[0-9]{2}"),
    "e": ("d", " ?[0-9]{1,2}"),
    "H": ("H", "[0-9]{2}"),
    "M": ("M", "[0-9]{2}"),
    "S": ("S", "[0-9]{2}"),
    "z": ("z", "[+-][0-9]{4}"),
    "s": ("s", "[0-9]+"),
    "%": ("", "%"),
    "n": ("", r"\s"),
    "t": ("", r"\s"),
}
_COMPOSITES = {"T": "%H:%M:%S", "F": "%Y-%m-%d", "D": "%m/%d/%y", "R": "%H:%M"}
_CONVERSION = re.compile(r"%([a-zA-Z%])")
# What a strftime time needs to tell the time, unless it has %s: one of each.
_DATE_AND_TIME = ({"Y", "y"}, {"m", "b"}, {"d"}, {"H"}, {"M"}, {"S"})
_EPOCH_UNITS = {"sec": 1, "msec": 1_000, "usec": 1_000_000}
_DEFAULT_TIME = "[%d/%b/%Y:%H:%M:%S %z]"


class LogFormatError(ValueError):
    """A LogFormat string that tlsproxy-logjoin cannot use."""


@attrs.frozen(kw_only=True)
class LogFormat:
    """
    A compiled LogFormat.  C{pattern} matches a whole line (without its
    line ending); C{edits} are the groups to rewrite, in line order, each
    with C{True} for an address (replaced) or C{False} for the remote port
    and its space (dropped); C{host_group} is the first address, C{port_group}
    the remote port; C{time_of} turns group C{time_group} into epoch seconds,
    or C{None} when the line's time cannot be told.
    """

    pattern: re.Pattern[bytes]
    edits: tuple[tuple[int, bool], ...]
    host_group: int
    port_group: int
    time_group: int
    time_of: Callable[[bytes], float | None]


def compile_format(log_format: str) -> LogFormat:
    """
    Compile C{log_format}; raise L{LogFormatError} for a bare C{%}, or when
    it has no C{%h} or C{%a}, or no C{%{remote}p}.
    """
    tokens: list[str | tuple[str, str | None]] = []
    for token in _TOKEN.finditer(log_format):
        if token["bad"]:
            raise LogFormatError(f"a bare % at offset {token.start()}")
        if token["literal"] is not None:
            tokens.append(_LITERAL_ESCAPE.sub(_unescape, token["literal"]))
        elif token["letter"] == "%":
            tokens.append("%")
        else:
            tokens.append((token["letter"], token["argument"]))
    if not any(t in _ADDRESSES for t in tokens):
        raise LogFormatError("no %h or %a: nothing to put the client address in")
    ports = [i for i, t in enumerate(tokens) if _is_remote_port(t)]
    if not ports:
        raise LogFormatError("no %{remote}p: nothing to join on")
    return _build(tokens, ports[0])


def _unescape(escape: re.Match[str]) -> str:
    return _UNESCAPED[escape[1]]


def _is_remote_port(token: str | tuple[str, str | None]) -> bool:
    return (
        isinstance(token, tuple)
        and token[0] == "p"
        and (str(token[1]).lower() == "remote")
    )


def _build(tokens: list[str | tuple[str, str | None]], port_index: int) -> LogFormat:
    """
    The compiled format of C{tokens}, whose remote port is at C{port_index}:
    the port goes with the space or colon before it, or else with the space
    after it.
    """
    before = after = ""
    previous, following = tokens[port_index - 1 : port_index], tokens[port_index + 1 :]
    if previous and isinstance(previous[0], str) and previous[0][-1:] in (" ", ":"):
        before, tokens[port_index - 1] = previous[0][-1], previous[0][:-1]
    elif following and isinstance(following[0], str) and following[0][:1] == " ":
        after, tokens[port_index + 1] = " ", following[0][1:]
    regex, edits, groups = "", [], 0
    host_group = port_group = time_group = 0
    time_of: Callable[[bytes], float | None] = _no_time
    for index, token in enumerate(tokens):
        if isinstance(token, str):
            regex += re.escape(token)
        elif index == port_index:
            regex += f"({re.escape(before)}([0-9]+|-){after})"
            edits.append((groups + 1, False))
            port_group = groups = groups + 2
        elif token in _ADDRESSES:
            regex += f"({_WORD})"
            groups += 1
            edits.append((groups, True))
            host_group = host_group or groups
        elif token[0] == "t":
            pattern, parse = _time(token[1])
            if parse is None or time_group:
                regex += f"(?:{pattern}|-)"
            else:
                regex += f"({pattern}|-)"
                time_group = groups = groups + 1
                time_of = functools.lru_cache(256)(parse)
        else:
            regex += f"(?:{_BY_LETTER.get(token[0], _STRING)}|-)"
    return LogFormat(
        pattern=re.compile(regex.encode("utf-8", "surrogateescape"), re.DOTALL),
        edits=tuple(edits),
        host_group=host_group,
        port_group=port_group,
        time_group=time_group,
        time_of=time_of,
    )


def _no_time(text: bytes) -> None:
    """The time of a line whose format has no complete time: unknown."""


def _time(argument: str | None) -> tuple[str, Callable[[bytes], float | None] | None]:
    """
    The pattern of a C{%t} or C{%{...}t} directive, and the function that
    reads its text, or C{None} when it alone does not tell the time.
    """
    spec = re.sub("^(?:begin|end):", "", argument or _DEFAULT_TIME)
    if spec in _EPOCH_UNITS:
        return _strftime("%s", _EPOCH_UNITS[spec])
    if spec.endswith("_frac"):
        return "[0-9]+", None
    return _strftime(spec, 1)


def _strftime(
    spec: str, divisor: int
) -> tuple[str, Callable[[bytes], float | None] | None]:
    """The pattern and reader of the times strftime writes with C{spec}."""
    spec = _CONVERSION.sub(lambda m: _COMPOSITES.get(m[1], m[0]), spec)
    plain = named = ""
    names: set[str] = set()
    for i, part in enumerate(_CONVERSION.split(spec)):
        if i % 2 == 0:
            plain, named = plain + re.escape(part), named + re.escape(part)
            continue
        name, pattern = _CONVERSIONS.get(part, ("", r"\S+?"))
        plain += f"(?:{pattern})"
        fresh = name not in names
        named += f"(?P<{name}>{pattern})" if name and fresh else f"(?:{pattern})"
        names.add(name)
    if "s" not in names and not all(names & one_of for one_of in _DATE_AND_TIME):
        return plain, None
    reader = re.compile(named.encode("utf-8", "surrogateescape"))
    return plain, functools.partial(_seconds, reader, divisor)


def _seconds(reader: re.Pattern[bytes], divisor: int, text: bytes) -> float | None:
    """
    The epoch seconds that C{text} says, or C{None} for a C{-} or a time
    that cannot be (month 13, year 0, more digits than a float holds).
    """
    match = reader.fullmatch(text)
    if match is None:
        return None
    try:
        return _epoch(match.groupdict(), divisor)
    except (ValueError, OverflowError):
        return None


def _epoch(fields: dict[str, Any], divisor: int) -> float:
    if fields.get("s") is not None:
        return int(fields["s"]) / divisor
    year = int(fields["Y"]) if fields.get("Y") else _full_year(int(fields["y"]))
    month = int(fields["m"]) if fields.get("m") else _MONTHS[fields["b"][:3].lower()]
    day, hour = int(fields["d"]), int(fields["H"])
    minute, second = int(fields["M"]), int(fields["S"])
    zone = fields.get("z")
    if zone is None:
        return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
    offset = int(zone[1:3]) * 3600 + int(zone[3:5]) * 60
    utc = calendar.timegm((year, month, day, hour, minute, second))
    return utc - (offset if zone[:1] == b"+" else -offset)


def _full_year(two_digits: int) -> int:
    """POSIX's century for C{%y}: 69 to 99 are 1969 to 1999, 00 to 68 2000 on."""
    return two_digits + (1900 if two_digits >= 69 else 2000)
