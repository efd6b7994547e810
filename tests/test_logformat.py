"""
Unit tests for the Apache LogFormat compiler of tlsproxy-logjoin.
"""

from __future__ import annotations

import calendar
import os
import time

from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.logformat import LogFormatError, compile_format

COMBINED_PORT = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i" %{remote}p'
LINE = (
    b'127.0.0.1 - frank [27/Nov/2025:10:00:00 +0100] "GET /a\\"b c HTTP/1.1"'
    b' 200 2326 "https://example.org/" "Mozilla/5.0 (X11) \\"x\\"" 40001'
)
# 2025-11-27 09:00:00 UTC
NINE_UTC = calendar.timegm((2025, 11, 27, 9, 0, 0))


def fields(
    log_format: str, line: bytes
) -> tuple[list[bytes], bytes, float | None] | None:
    """
    The address fields, remote port and time of C{line} in C{log_format}, or
    C{None} if it does not parse.
    """
    compiled = compile_format(log_format)
    match = compiled.pattern.fullmatch(line)
    if match is None:
        return None
    addresses = [match[group] for group, is_address in compiled.edits if is_address]
    port = match[compiled.port_group]
    return addresses, port, compiled.time_of(match[compiled.time_group])


def restore_zone(zone: str | None) -> None:
    """Set C{TZ} back to C{zone} (C{None}: unset)."""
    if zone is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = zone
    time.tzset()


class DirectiveTests(SynchronousTestCase):
    """Each kind of directive matches the values Apache writes for it."""

    def assertParses(self, directive: str, value: bytes) -> None:
        line = b"192.0.2.7 " + value + b" 40001"
        self.assertIsNotNone(
            fields(f"%h {directive} %{{remote}}p", line), (directive, value)
        )

    def assertRejects(self, directive: str, value: bytes) -> None:
        line = b"192.0.2.7 " + value + b" 40001"
        self.assertIsNone(
            fields(f"%h {directive} %{{remote}}p", line), (directive, value)
        )

    def test_combined(self) -> None:
        """The default format gives the address, the port and %t's time."""
        self.assertEqual(
            fields(COMBINED_PORT, LINE), ([b"127.0.0.1"], b"40001", NINE_UTC)
        )

    def test_words(self) -> None:
        """Word directives take one word without spaces, or C{-}."""
        for directive in ["%l", "%A", "%v", "%V", "%H", "%m", "%X", "%L", "%P"]:
            self.assertParses(directive, b"HTTP/1.1")
            self.assertParses(directive, b"-")
            self.assertRejects(directive, b"two words")
        self.assertParses("%{c}a", b"10.0.0.9")
        self.assertParses("%{hextid}P", b"7f3a")

    def test_numbers(self) -> None:
        """Number directives, with or without C{<} and C{>}, take digits or C{-}."""
        for directive in ["%b", "%B", "%D", "%T", "%s", "%>s", "%<s", "%I", "%O"]:
            self.assertParses(directive, b"404")
            self.assertParses(directive, b"-")
            self.assertRejects(directive, b"4o4")
        for directive in ["%S", "%k", "%p", "%{local}p", "%{ms}T"]:
            self.assertParses(directive, b"0")

    def test_strings(self) -> None:
        """
        String directives take escaped text with spaces, and a quoted one
        ends at the first quote that is not escaped.
        """
        directives = ["%r", "%{X}i", "%{X}o", "%{X}e", "%{X}n", "%{X}C", "%U", "%q"]
        directives += ["%f", "%R", "%u", "%{X}x", "%{X}c", "%{X}^ti", "%^FB"]
        for directive in directives:
            self.assertParses(directive, b"a b\\x7f \\\\ \\n")
            self.assertParses(f'"{directive}"', b'"GET /a\\"b HTTP/1.1"')
            self.assertParses(f'"{directive}"', b'"-"')
            self.assertRejects(f'"{directive}"', b'"GET /a"b HTTP/1.1"')
            self.assertRejects(f'"{directive}"', b'"ends in a backslash\\"')

    def test_bytes(self) -> None:
        """Bytes that are not UTF-8 match like any other."""
        self.assertParses('"%{User-Agent}i"', b'"caf\xe9 \xff\xfe"')

    def test_conditions(self) -> None:
        """Status conditions are understood; their C{-} matches."""
        for directive in ["%400,501{User-agent}i", "%!200,304,302{Referer}i"]:
            self.assertParses(f'"{directive}"', b'"-"')
            self.assertParses(f'"{directive}"', b'"curl/8.5.0"')

    def test_percent(self) -> None:
        """C{%%} is one percent sign."""
        self.assertParses("100%%", b"100%")
        self.assertRejects("100%%", b"100%%")

    def test_format_escapes(self) -> None:
        """
        A format as written in Apache's configuration, with C{\\"}, C{\\t} and
        C{\\\\}, means what Apache makes of it.
        """
        self.assertParses('\\"%r\\"', b'"GET / HTTP/1.1"')
        self.assertParses("a\\tb\\\\", b"a\tb\\")
        self.assertRejects("a\\tb", b"a\\tb")

    def test_addresses(self) -> None:
        """C{%h} and C{%a} are addresses to replace; C{%{c}a} is not."""
        line = b"10.0.0.3 10.0.0.4 10.0.0.5 40001"
        self.assertEqual(
            fields("%h %a %{c}a %{remote}p", line),
            ([b"10.0.0.3", b"10.0.0.4"], b"40001", None),
        )

    def test_remote_port(self) -> None:
        """C{%{remote}p} is found in any case; it is digits or C{-}."""
        self.assertEqual(
            fields("%{Remote}p %h", b"40001 ::1"), ([b"::1"], b"40001", None)
        )
        self.assertEqual(fields("%{remote}p %h", b"- ::1"), ([b"::1"], b"-", None))
        self.assertIsNone(fields("%{remote}p %h", b"4000l ::1"))


class TimeTests(SynchronousTestCase):
    """Time directives give the request's time in epoch seconds."""

    def time_of(self, time_format: str, text: bytes) -> float | None:
        parsed = fields(f"{time_format} %h %{{remote}}p", text + b" ::1 40001")
        assert parsed is not None, (time_format, text)
        return parsed[2]

    def test_impossible_times(self) -> None:
        """A time that cannot be (year 0, month 13, too many digits) is unknown."""
        self.assertIsNone(self.time_of("%t", b"[01/Jan/0000:00:00:00 +0000]"))
        self.assertIsNone(
            self.time_of("%{%d/%m/%Y:%H:%M:%S %z}t", b"01/13/2025:00:00:00 +0000")
        )
        self.assertIsNone(self.time_of("%{sec}t", b"9" * 400))

    def test_zones(self) -> None:
        """C{%t}'s zone is honoured: one instant in +0100, -0500 and +0000."""
        for text in [
            b"[27/Nov/2025:10:00:00 +0100]",
            b"[27/Nov/2025:04:00:00 -0500]",
            b"[27/NOV/2025:09:00:00 +0000]",
        ]:
            self.assertEqual(self.time_of("%t", text), NINE_UTC)

    def test_epoch(self) -> None:
        """C{%{sec}t}, C{%{msec}t} and C{%{usec}t}, also with C{begin:} or C{end:}."""
        self.assertEqual(self.time_of("%{sec}t", b"1764234000"), 1764234000)
        self.assertEqual(self.time_of("%{msec}t", b"1764234000250"), 1764234000.25)
        self.assertEqual(self.time_of("%{usec}t", b"1764234000000500"), 1764234000.0005)
        self.assertEqual(
            self.time_of("%{begin:msec}t", b"1764234000250"), 1764234000.25
        )
        self.assertEqual(self.time_of("%{end:sec}t", b"1764234000"), 1764234000)

    def test_strftime(self) -> None:
        """A strftime C{%{...}t} with a date, a time and a zone is read."""
        self.assertEqual(
            self.time_of("%{%d/%b/%Y:%H:%M:%S %z}t", b"27/Nov/2025:10:00:00 +0100"),
            NINE_UTC,
        )
        self.assertEqual(
            self.time_of("%{%F %T %z}t", b"2025-11-27 04:00:00 -0500"), NINE_UTC
        )
        self.assertEqual(
            self.time_of("%{%e %B %y %R:%S%z}t", b" 27 November 25 09:00:00+0000"),
            NINE_UTC,
        )
        self.assertEqual(
            self.time_of("%{%D %T %z}t", b"11/27/99 09:00:00 +0000"),
            calendar.timegm((1999, 11, 27, 9, 0, 0)),
        )

    def test_other_conversions(self) -> None:
        """
        Conversions that do not help tell the time, and repeated ones, match
        their text; C{%%}, C{%n} and C{%t} are literal.
        """
        self.assertEqual(
            self.time_of(
                "%{%a %d %b %Y %H:%M:%S %Z %z (%Y) 100%%%n%t}t",
                b"Thu 27 Nov 2025 10:00:00 CET +0100 (2025) 100%\t ",
            ),
            NINE_UTC,
        )

    def test_local_time(self) -> None:
        """A strftime time without C{%z} is in the local zone (C{TZ})."""
        self.addCleanup(restore_zone, os.environ.get("TZ"))
        os.environ["TZ"] = "LOGJOIN+05"
        time.tzset()
        self.assertEqual(
            self.time_of("%{%Y-%m-%d %H:%M:%S}t", b"2025-11-27 04:00:00"), NINE_UTC
        )

    def test_incomplete(self) -> None:
        """A time without a date, or fractions alone, do not tell the time."""
        self.assertIsNone(self.time_of("%{%H:%M:%S}t", b"10:00:00"))
        self.assertIsNone(self.time_of("%{%Y-%m-%d %H:%M}t", b"2025-11-27 10:00"))
        self.assertIsNone(self.time_of("%{msec_frac}t", b"250"))
        self.assertIsNone(self.time_of("%{end:usec_frac}t", b"250000"))

    def test_first_complete(self) -> None:
        """The first time directive that tells the time is the one read."""
        self.assertEqual(
            self.time_of("%{%H:%M:%S}t %{sec}t.%{msec_frac}t %t", b"10:00:00 1.250 -"),
            1,
        )

    def test_no_time(self) -> None:
        """A time field of C{-} (a condition not met) leaves the time unknown."""
        self.assertIsNone(self.time_of("%200t", b"-"))


class ErrorTests(SynchronousTestCase):
    """Formats that cannot be joined are refused with one clear message."""

    def assertRefused(self, log_format: str, message: str) -> None:
        with self.assertRaises(LogFormatError) as caught:
            compile_format(log_format)
        self.assertEqual(str(caught.exception), message)

    def test_no_address(self) -> None:
        """A format without C{%h} or C{%a} has nowhere to put the client."""
        self.assertRefused(
            "%{c}a %l %{remote}p", "no %h or %a: nothing to put the client address in"
        )

    def test_no_port(self) -> None:
        """A format without C{%{remote}p} has nothing to join on."""
        self.assertRefused("%h %p %{local}p", "no %{remote}p: nothing to join on")

    def test_bare_percent(self) -> None:
        """A C{%} that starts no directive is refused with its offset."""
        self.assertRefused("%h %{remote}p %", "a bare % at offset 14")
        self.assertRefused("%h %{remote", "a bare % at offset 3")
        self.assertRefused("%h %-s %{remote}p", "a bare % at offset 3")
