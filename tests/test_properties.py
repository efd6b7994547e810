"""
Property tests (hypothesis): the command line, the PROXY header encoders and
tlsproxy-logjoin, each given any input drawn from a grammar that mixes good
values, bad values and noise.  (Hostile values into every sink:
tests/test_hostile.py.)

Trial shows neither the failing example hypothesis found (it is a note on
the exception) nor each of several distinct failures; to see them, run
C{python -m unittest -v tests.test_properties}.  No example database is
kept (C{database=None}): trial's working directory is thrown away anyway.
"""

from __future__ import annotations

import calendar
import datetime
import io
import ipaddress
import json
import math
import os
import re
import resource
import shutil
import socket
import string
import struct
import tempfile
import time
import unittest
from collections.abc import Callable, Sequence
from typing import NamedTuple

import trustme
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.python import usage

from tlsproxy import tap
from tlsproxy.logformat import LogFormatError, compile_format
from tlsproxy.logjoin import ConnectionIndex, join_line, main
from tlsproxy.proxyheader import V2_SIGNATURE, Addresses, no_header, v1, v2
from tlsproxy.proxyheader import parse as parse_header
from tlsproxy.record import ConnectionLog, ConnectionRecord

# ---------------------------------------------------------------------------
# The command line.
#
# A command line is drawn as items.  Each names the option it sets (None for
# noise, which is always an error), its arguments, its value, and whether the
# value is valid (True), invalid (False) or either (None: free text).  In an
# argument, "\0" stands for the directory of the files made in setUp; argv
# cannot hold a NUL, so free text never has one.

Validity = bool | None
Values = st.SearchStrategy[tuple[str, Validity]]


class Item(NamedTuple):
    option: str | None
    args: list[str]
    value: str
    valid: Validity


# Any argument: any character but NUL, and the lone surrogates that Python
# makes of bytes that are not UTF-8 in argv.
ARGV_TEXT = st.text(
    st.one_of(
        st.characters(exclude_characters="\0", exclude_categories=["Cs"]),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"]),
    ),
    max_size=20,
)


def tagged(values: st.SearchStrategy[str] | Sequence[str], valid: Validity) -> Values:
    """C{values}, each paired with its validity."""
    if not isinstance(values, st.SearchStrategy):
        values = st.sampled_from(values)
    return values.map(lambda value: (value, valid))


def choices(good: Values, bad: Values | None = None, free: bool = True) -> Values:
    """
    An option's values: C{good} ones two times in three (so that a command
    line reaches the later checks), else C{bad} ones or, if C{free}, any
    text.
    """
    others = [bad] if bad is not None else []
    others += [tagged(ARGV_TEXT, None)] if free else []
    return st.integers(0, 2).flatmap(lambda i: good if i < 2 else st.one_of(others))


SECONDS = choices(
    st.one_of(
        tagged(st.floats(0, exclude_min=True, allow_infinity=False).map(repr), True),
        tagged(st.integers(1, 10**9).map(str), True),
        tagged(["1e3", " 2.5 ", "1_000", "+7", "0.001"], True),
    ),
    st.one_of(
        tagged(st.floats(max_value=0).map(repr), False),
        tagged(["0", "-0", "-1", "nan", "NaN", "inf", "-inf", "Infinity"], False),
        tagged(["1e999", "", "abc", "1,5", "0x10", "1s", "\u00bd"], False),
    ),
)
COUNTS = choices(
    tagged(st.integers(1, 10**6).map(str) | st.just("007"), True),
    tagged(["0", "00", "-1", "1.5", "", " 5", "+5", "1e3", "\u00b2"], False),
)
BAD_SERVER_ENDPOINTS = tagged(
    [
        "",
        ":",
        "bogus:1",
        "tcp",
        "tcp:",
        "tcp:https",
        "tcp:443:nosuch=1",
        "tcp:443:interface=::1",
        "unix:/run/x.sock:mode=9",
        "ssl:8443:privateKey=\0/missing.pem",
        "tcp:443\\",
    ],
    False,
)
LISTEN = choices(
    tagged(
        [
            "tcp:443",
            "tcp:0:interface=127.0.0.1",
            "tcp6:8443:interface=\\:\\:1",
            "tcp:port=8443:backlog=10",
            "unix:/run/tlsproxy.sock",
            "unix:\0/tlsproxy.sock:mode=660:lockfile=1",
            "haproxy:tcp:8443",
            "ssl:8443:privateKey=\0/both.pem",
        ],
        True,
    ),
    BAD_SERVER_ENDPOINTS,
)
METRICS = choices(
    tagged(["tcp:9100:interface=127.0.0.1", "tcp:0", "unix:/run/metrics.sock"], True),
    BAD_SERVER_ENDPOINTS,
)
CONNECT = choices(
    tagged(
        [
            "tcp:127.0.0.1:80",
            "tcp:host=backend.example:port=8080:timeout=5",
            "tcp:10.0.0.2:80:bindAddress=10.0.0.3",
            "tcp:\\:\\:1:80",
            "unix:/run/backend.sock",
            "unix:path=/run/backend.sock:timeout=3",
            "tls:backend.example:443",
        ],
        True,
    ),
    tagged(
        [
            "",
            ":",
            "bogus:1",
            "tcp",
            "tcp:backend.example",
            "tcp:backend.example:http",
            "tcp:h:1:timeout=x",
            "tcp:h:1:nosuch=2",
            "unix:/run/backend.sock:timeout=x",
            "tls:h:443:trustRoots=\0/missing",
            "tcp:h:1\\",
        ],
        False,
    ),
)
# What each file made in setUp holds that --cert and --key can use:
# "cert" (certificates) and "key" (the key of cert.pem's certificate).
PEM_FILES = {
    "\0/cert.pem": {"cert"},
    "\0/key.pem": {"key"},
    "\0/both.pem": {"cert", "key"},
    "\0/other-key.pem": set(),  # a key, of another certificate
    "\0/encrypted-key.pem": set(),
    "\0/garbage.pem": set(),  # PEM framing around bytes that are no DER
    "\0/noise.bin": set(),
    "\0/empty.pem": set(),
    "\0": set(),  # a directory
    "\0/missing.pem": set(),
}
PEM_PATHS = choices(tagged(sorted(PEM_FILES), True))
NAMES = choices(
    tagged(
        ["localhost", "tlsproxy.test", "xn--bcher-kva.example", "127.0.0.1", "::1"],
        True,
    )
)
VERSIONS = choices(
    tagged(["v1", "v2"], True),
    tagged(["", "v0", "v3", "V1", "v1 ", "1", "none"], False),
)
ALPN = choices(
    tagged(["", "http/1.1", "h2,http/1.1", "x" * 255], True),
    tagged([",", "h2,", "h2,,x", "a b", "\u00e9", "x" * 256], False),
)
TLS_VERSIONS = choices(
    tagged(["1.2", "1.3"], True),
    tagged(["1.1", "1", "TLSv1.3", "", " 1.2"], False),
)
CIPHERS = choices(
    tagged(
        ["ECDHE+AESGCM", "HIGH", "ECDHE-RSA-AES128-GCM-SHA256:ECDHE+CHACHA20"], True
    ),
    tagged(["", "NOTHING", "\u00e9"], False),
)
CLIENT_CAS = choices(
    tagged(["\0/cert.pem", "\0/both.pem"], True),
    tagged(["\0/key.pem", "\0/garbage.pem", "\0/missing.pem", "\0"], False),
)
BACKEND_CAS = choices(
    tagged(["\0/cert.pem", "\0/both.pem"], True),
    tagged(["\0/key.pem", "\0/garbage.pem", "\0/missing.pem", "\0"], False),
)
CONNECTION_LOGS = choices(
    tagged(["\0/connections.log"], True),
    tagged(["\0", "\0/missing/connections.log", "\0/cert.pem/connections.log"], False),
    free=False,
)
# Never valid here: a --config beside service options, or a file that is
# missing, a directory, or not INI (test_config tests good ones).
CONFIGS = choices(tagged(["\0/missing.conf", "\0", "\0/cert.pem"], False), free=False)
OPTIONS: dict[str, Values] = {
    "config": CONFIGS,
    "listen": LISTEN,
    "connect": CONNECT,
    "cert": PEM_PATHS,
    "key": PEM_PATHS,
    "self-signed": NAMES,
    "handshake-timeout": SECONDS,
    "connect-timeout": SECONDS,
    "idle-timeout": SECONDS,
    "drain-timeout": SECONDS,
    "max-connections": COUNTS,
    "max-connections-total": COUNTS,
    "proxy-protocol": VERSIONS,
    "connection-log": CONNECTION_LOGS,
    "metrics": METRICS,
    "alpn": ALPN,
    "tls-min": TLS_VERSIONS,
    "ciphers": CIPHERS,
    "client-ca": CLIENT_CAS,
    "backend-ca": BACKEND_CAS,
}
COUNT_OPTIONS = ["max-connections"]
# Options given more than once are all used (not only the last).
REPEATABLE = {"cert", "key"}
DEFAULTS: dict[str, str | None] = {
    str(name): default for name, _, default, _ in tap.Options.optParameters
}
# --client, a flag: plain TCP from the clients, TLS toward a tls: backend.
CLIENT = Item("client", ["--client"], "", True)
# --reuse-port, a flag: only with a --listen that is bound as TCP.
REUSE_PORT = Item("reuse-port", ["--reuse-port"], "", True)
# What --client may not have: the options of TLS toward the clients.
# (And --cert and --key, which are repeatable.)
SERVER_TLS = ["self-signed", "client-ca", "alpn", "tls-min", "ciphers"]
NOISE = [
    Item(None, ["--bogus"], "", False),
    Item(None, ["--bogus=1"], "", False),
    Item(None, ["-x"], "", False),
    Item(None, ["extra"], "", False),
]


@st.composite
def option_items(draw: st.DrawFn, name: str | None = None) -> Item:
    """One option, as C{--name value} or C{--name=value}."""
    if name is None:
        name = draw(st.sampled_from(sorted(OPTIONS)))
    value, valid = draw(OPTIONS[name])
    args = [f"--{name}={value}"] if draw(st.booleans()) else [f"--{name}", value]
    return Item(name, args, value, valid)


@st.composite
def command_lines(draw: st.DrawFn) -> list[Item]:
    """
    A command line: usually a --connect and a certificate, then any options
    and noise, in any order, and now and then an option without its value.
    """
    items = []
    if draw(st.integers(0, 9)):
        items.append(draw(option_items("connect")))
    certificate = draw(st.sampled_from(["self-signed", "cert", "cert key", ""]))
    items += [draw(option_items(name)) for name in certificate.split()]
    items += draw(st.lists(option_items(), max_size=4))
    items += draw(st.lists(st.sampled_from(NOISE), max_size=1))
    items += [CLIENT] if draw(st.integers(0, 4)) == 0 else []
    items += [REUSE_PORT] if draw(st.integers(0, 4)) == 0 else []
    items = list(draw(st.permutations(items)))
    if draw(st.integers(0, 19)) == 0:
        name = draw(st.sampled_from(sorted(OPTIONS)))
        items.append(Item(None, [f"--{name}"], "", False))
    return items


def conjunction(validities: Sequence[Validity]) -> Validity:
    """False if any is False, else None if any is None, else True."""
    if any(valid is False for valid in validities):
        return False
    return None if any(valid is None for valid in validities) else True


def certificate_validity(
    given: dict[str, tuple[str, Validity]], certs: list[str], keys: list[str]
) -> Validity:
    """
    Whether the certificate options are right: --self-signed alone, or one
    or more --cert files with certificates, and no --key (each --cert file
    then holds its key) or one --key per --cert with the key.
    """
    if "self-signed" in given:
        return not (certs or keys)
    if not certs or (keys and len(keys) != len(certs)):
        return False
    return conjunction(
        [
            # (Any other text is perhaps a file: who knows.)
            "cert" in PEM_FILES[cert] and "key" in PEM_FILES[key]
            if cert in PEM_FILES and key in PEM_FILES
            else None
            for cert, key in zip(certs, keys or certs, strict=True)
        ]
    )


def expected(items: list[Item]) -> tuple[Validity, dict[str, str]]:
    """
    Whether the command line of C{items} is valid, and the value each option
    has in it (the last one given).
    """
    given: dict[str, tuple[str, Validity]] = {}
    repeated: dict[str | None, list[str]] = {"cert": [], "key": []}
    validities: list[Validity] = []
    for item in items:
        if item.option is None:
            validities.append(False)
        else:
            given[item.option] = (item.value, item.valid)
            repeated.get(item.option, []).append(item.value)
    validities += [
        valid
        for name, (_, valid) in given.items()
        if name not in REPEATABLE | {"client", "reuse-port"}
    ]
    validities.append("connect" in given)
    tls = given.get("connect", ("",))[0].startswith("tls:")
    if "backend-ca" in given:
        validities.append(tls)
    if "reuse-port" in given:
        listen = given.get("listen", ("tcp:443",))[0]
        validities.append(bool(re.match("(haproxy:)?tcp6?:", listen, re.IGNORECASE)))
    if "client" in given:
        listen = given.get("listen", ("",))[0]
        validities.append(tls and not listen.startswith("haproxy:"))
        validities += [given[o][0] == DEFAULTS[o] for o in SERVER_TLS if o in given]
        validities.append(not (repeated["cert"] or repeated["key"]))
    else:
        validities.append(
            certificate_validity(given, repeated["cert"], repeated["key"])
        )
    return conjunction(validities), {name: value for name, (value, _) in given.items()}


def parse(args: list[str]) -> tap.Options:
    """The options of command line C{args}."""
    options = tap.Options()  # type: ignore[no-untyped-call]
    options.parseOptions(args)  # type: ignore[no-untyped-call]
    return options


def open_files() -> int:
    """The number of file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


class OptionsTests(unittest.TestCase):
    """Any command line gives a configuration, or one line of error."""

    def setUp(self) -> None:
        """
        Make the files that --cert, --key and --connection-log name.  (Once
        for all the examples of a property: hypothesis runs them in one call.
        Trial runs no setUpClass.)
        """
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost")
        chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
        key = leaf.private_key_pem.bytes()
        loaded = serialization.load_pem_private_key(key, None)
        files = {
            "cert.pem": chain,
            "key.pem": key,
            "both.pem": chain + key,
            "other-key.pem": ca.issue_cert("localhost").private_key_pem.bytes(),
            "encrypted-key.pem": loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "garbage.pem": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
            b"-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\n"
            b"bm90IGEga2V5\n-----END PRIVATE KEY-----\n",
            "noise.bin": bytes(range(256)),
            "empty.pem": b"",
        }
        for name, content in files.items():
            with open(os.path.join(self.directory, name), "wb") as f:
                f.write(content)
        # The first parse imports and sets up what stays (the reactor).
        parse(["--connect", "tcp:h:1", "--self-signed", "x"])

    def test_grammar_complete(self) -> None:
        """The grammar below has values for every option that Options has."""
        self.assertEqual(set(OPTIONS), set(DEFAULTS) | REPEATABLE)
        for name in REPEATABLE:
            self.assertTrue(callable(getattr(tap.Options, f"opt_{name}")), name)

    @settings(max_examples=200, deadline=None, database=None)
    @given(command_lines())
    def test_value_or_one_line(self, items: list[Item]) -> None:
        """
        Any command line either gives the configuration it says, with every
        value checked, or raises UsageError with one line, and never anything
        else; a valid one is accepted, an invalid one refused, and no file is
        left open.
        """
        args = [arg.replace("\0", self.directory) for i in items for arg in i.args]
        valid, values = expected(items)
        values = {name: v.replace("\0", self.directory) for name, v in values.items()}
        before = open_files()
        try:
            options = parse(args)
        except usage.UsageError as e:
            message = str(e)
            self.assertRegex(message, r"\A[^\r\n]+\Z")
            self.assertIsNot(valid, True, f"a valid command line refused: {message}")
            self.assertEqual(open_files(), before)
            return
        logs = [o for o in options.observers if isinstance(o, ConnectionLog)]
        for log in logs:
            log.close()
        self.assertIsNot(valid, False, "an invalid command line accepted")
        self.assertEqual(open_files(), before)
        self.assertEqual(len(logs), "connection-log" in values)
        self.assert_config(options, values)

    def assert_config(self, options: tap.Options, values: dict[str, str]) -> None:
        """The configuration of C{options} has the C{values} given, or defaults."""

        def value(name: str) -> str:
            given = values.get(name, DEFAULTS[name])
            assert given is not None
            return given

        config = options.config
        self.assertEqual(config.listen, value("listen"))
        self.assertEqual(config.connect, value("connect"))
        self.assertEqual(config.certificates is None, "client" in values)
        self.assertEqual(config.reuse_port, "reuse-port" in values)
        self.assertEqual(config.backend_tls is not None, value("connect")[:4] == "tls:")
        durations = {
            "handshake-timeout": config.timeouts.handshake,
            "connect-timeout": config.timeouts.connect,
            "idle-timeout": config.timeouts.idle,
            "drain-timeout": config.limits.drain,
        }
        for name, duration in durations.items():
            self.assertTrue(math.isfinite(duration) and duration > 0, name)
            self.assertEqual(duration, float(value(name)), name)
        limits = [config.limits.total]
        for name, actual in zip(COUNT_OPTIONS, limits, strict=True):
            self.assertEqual(actual, int(values[name]) if name in values else math.inf)
        total = values.get("max-connections-total")
        derived = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64) // 2
        self.assertEqual(options.total, derived if total is None else int(total))
        header = {"v1": v1, "v2": v2}.get(values.get("proxy-protocol", ""), no_header)
        self.assertIs(config.header, header)
        self.assertEqual(options.fingerprint is not None, "self-signed" in values)
        self.assertEqual(options.metrics is not None, "metrics" in values)
        if "connection-log" in values:
            self.assertTrue(os.path.isfile(values["connection-log"]))


# ---------------------------------------------------------------------------
# The PROXY header encoders.


class Host(NamedTuple):
    text: str | None
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # no scope


def _not_an_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return True
    return False


# Twisted gives a link-local peer its scope: "fe80::1%eth0" (an interface
# name is at most 15 bytes).
INTERFACES = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=15)
HOSTS = st.one_of(
    st.ip_addresses(v=4).map(lambda a: Host(str(a), a)),
    st.ip_addresses(v=6).map(lambda a: Host(str(a), a)),
    st.ip_addresses(v=6).map(lambda a: Host(a.exploded, a)),
    st.builds(
        lambda a, scope: Host(f"{a}%{scope}", a),
        st.ip_addresses(network="fe80::/10"),
        INTERFACES,
    ),
    st.sampled_from([None, "", "/run/tlsproxy.sock"]).map(lambda t: Host(t, None)),
    st.text().filter(_not_an_address).map(lambda t: Host(t, None)),
)
TLV_VALUES = st.one_of(st.none(), st.text(max_size=255))


def ports_of(host: Host) -> st.SearchStrategy[int | None]:
    """Any port; or none, for a host that is not an IP address."""
    ports = st.integers(0, 65535)
    return ports if host.address is not None else ports | st.none()


@st.composite
def records(draw: st.DrawFn) -> tuple[ConnectionRecord, Host, Host]:
    """A record as the backend connects, and its client and listening hosts."""
    client, listen = draw(HOSTS), draw(HOSTS)
    ports = [draw(ports_of(host)) for host in (client, listen)]
    record = ConnectionRecord(
        event="open",
        id=draw(st.binary(max_size=64)).hex(),
        service="tlsproxy",
        client_host=client.text,
        client_port=ports[0],
        listen_host=listen.text,
        listen_port=ports[1],
        opened=0.0,
        tls_version=draw(TLV_VALUES),
        cipher=draw(TLV_VALUES),
        sni=draw(TLV_VALUES),
        alpn=draw(TLV_VALUES),
    )
    return record, client, listen


def one_family(client: Host, listen: Host) -> int | None:
    """The IP version of both addresses, or None if they do not share one."""
    if client.address is None or listen.address is None:
        return None
    version = client.address.version
    return version if version == listen.address.version else None


def packed(family: int, text: bytes) -> bytes | None:
    """The address C{text} as the C library reads it, or None if it cannot."""
    try:
        return socket.inet_pton(family, text.decode("ascii"))
    except (OSError, UnicodeDecodeError):
        return None


def endpoint(
    address: IAddress | None,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """The IP address and port of a Twisted address."""
    assert isinstance(address, IPv4Address | IPv6Address), address
    return ipaddress.ip_address(address.host), address.port


def tlvs(data: bytes) -> dict[int, bytes]:
    """
    The type-length-value entries that C{data} is made of, by type; each
    type at most once, and each entry whole.
    """
    found: dict[int, bytes] = {}
    while data:
        assert len(data) >= 3, f"a partial TLV: {data!r}"
        kind, length = struct.unpack("!BH", data[:3])
        assert len(data) >= 3 + length, f"a TLV past the end: {data!r}"
        assert kind not in found, f"type {kind:#x} twice"
        found[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return found


def present(pairs: list[tuple[int, str | None]]) -> dict[int, bytes]:
    """The values that are not None, in UTF-8, by type."""
    return {kind: value.encode("utf-8") for kind, value in pairs if value is not None}


def read(header: bytes) -> Addresses | None:
    """The addresses of a header that L{parse} takes whole."""
    parsed = parse_header(header)
    assert parsed is not None and parsed[0] == len(header), (header, parsed)
    return parsed[1]


class ProxyHeaderTests(unittest.TestCase):
    """Each encoder's header says what the record says, as it is read back."""

    @settings(max_examples=500, deadline=None, database=None)
    @given(records())
    def test_v1(self, drawn: tuple[ConnectionRecord, Host, Host]) -> None:
        """
        v1 names two IP addresses of one family in the spec's form (which
        reads back, with the ports) within the spec's length, or is exactly
        PROXY UNKNOWN.
        """
        record, client, listen = drawn
        header = v1(record)
        self.assertLessEqual(len(header), 107)
        version = one_family(client, listen)
        if version is None:
            self.assertEqual(header, b"PROXY UNKNOWN\r\n")  # (the spec's short form)
            return
        assert client.address is not None and listen.address is not None
        self.assertEqual(header[-2:], b"\r\n")
        words = header[:-2].split(b" ")
        self.assertEqual(words[:2], [b"PROXY", b"TCP%d" % version])
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        self.assertEqual(
            [packed(family, word) for word in words[2:4]],
            [client.address.packed, listen.address.packed],
            f"not two addresses in the spec's form: {header!r}",
        )
        self.assertLessEqual(len(header), 56 if version == 4 else 104, header)
        addresses = read(header)
        assert addresses is not None
        self.assertEqual(endpoint(addresses[0]), (client.address, record.client_port))
        self.assertEqual(endpoint(addresses[1]), (listen.address, record.listen_port))

    @settings(max_examples=500, deadline=None, database=None)
    @given(records())
    def test_v2(self, drawn: tuple[ConnectionRecord, Host, Host]) -> None:
        """
        v2 has a length that counts the rest, the addresses and ports as
        they read back (UNSPEC if not IP of one family), and exactly the
        TLVs of the values the record has, in UTF-8.
        """
        record, client, listen = drawn
        header = v2(record)
        self.assertEqual(header[:12], V2_SIGNATURE)
        command, family, length = struct.unpack("!BBH", header[12:16])
        self.assertEqual((command, length), (0x21, len(header) - 16))
        self.assertLessEqual(len(header), 16 + 0xFFFF)
        addresses = read(header)
        version = one_family(client, listen)
        if version is None:
            self.assertEqual(family, 0x00)
            self.assertIsNone(addresses)
        else:
            assert client.address is not None and listen.address is not None
            assert addresses is not None
            self.assertEqual(family, {4: 0x11, 6: 0x21}[version])
            self.assertEqual(
                endpoint(addresses[0]), (client.address, record.client_port)
            )
            self.assertEqual(
                endpoint(addresses[1]), (listen.address, record.listen_port)
            )
        size = {0x00: 0, 0x11: 12, 0x21: 36}[family]
        found = tlvs(header[16 + size :])
        ssl = found.pop(0x20)
        self.assertEqual(
            found, present([(0x01, record.alpn), (0x02, record.sni), (0x05, record.id)])
        )
        self.assertEqual(struct.unpack("!BI", ssl[:5]), (0x01, 0))
        self.assertEqual(
            tlvs(ssl[5:]), present([(0x21, record.tls_version), (0x23, record.cipher)])
        )


# ---------------------------------------------------------------------------
# tlsproxy-logjoin.

# 2025-11-27 09:00:00 UTC: connections and requests are around it.
BASE = calendar.timegm((2025, 11, 27, 9, 0, 0))
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
MONTHS = [datetime.date(2000, m, 1).strftime("%b") for m in range(1, 13)]
FULL_MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
PORTS = [40001, 40002, 40003]
LOCAL_HOSTS = ["127.0.0.1", "::ffff:127.0.0.1", "10.0.0.3", "10.0.0.4"]
ADDRESSES = st.ip_addresses().map(str)


def split_lines(data: bytes) -> list[bytes]:
    """The lines of C{data} as a binary file gives them: each up to C{\\n}."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


@st.composite
def connection_records(draw: st.DrawFn) -> dict[str, object]:
    """One record of tlsproxy's connection log, with values near BASE."""
    event = draw(st.sampled_from(["open", "close"]))
    opened = BASE + draw(st.floats(-1800, 1800))
    return {
        "event": event,
        "id": draw(st.sampled_from("abcdef")),
        "service": "tlsproxy",
        "client_host": draw(st.none() | st.just("") | ADDRESSES),
        "client_port": draw(st.integers(0, 65535)),
        "backend_local_host": draw(st.sampled_from([None, *LOCAL_HOSTS])),
        "backend_local_port": draw(st.sampled_from([None, *PORTS])),
        "opened": opened,
        "closed": None if event == "open" else opened + draw(st.floats(0, 3600)),
        "reason": None,
    }


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def connection_log_lines(draw: st.DrawFn) -> bytes:
    """A line of a connection log: a record, a damaged one, or noise."""
    record = draw(connection_records())
    kind = draw(st.sampled_from(["record", "field", "cut", "json", "bytes"]))
    if kind == "field":
        record[draw(st.sampled_from(sorted(record)))] = draw(JSON)
    elif kind == "json":
        return json.dumps(draw(JSON)).encode()
    elif kind == "bytes":
        return draw(st.binary(max_size=40))
    text = json.dumps(record).encode()
    return text[: draw(st.integers(0, len(text) - 1))] if kind == "cut" else text


def clients(connection_log: bytes) -> set[bytes]:
    """Every client address that a line of C{connection_log} could give."""
    found = {b"-"}
    for line in split_lines(connection_log):
        try:
            record = json.loads(line)
            found.add(record["client_host"].encode())
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
    return found


def apache_escape(text: str) -> bytes:
    """C{text} as Apache writes it in a quoted field."""
    return text.replace("\\", "\\\\").replace('"', '\\"').encode()


# A field's text: as Apache writes it, or any bytes (quotes, backslashes,
# CRs and bytes that are not UTF-8 included), but one line.
FIELDS = st.one_of(
    st.just(b"-"),
    st.text(max_size=20).map(apache_escape),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
)


OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59)


@st.composite
def times(draw: st.DrawFn) -> datetime.datetime:
    """Any time from 1970 on, in any zone, to the microsecond."""
    naive = draw(
        st.datetimes(datetime.datetime(1970, 1, 2), datetime.datetime(9999, 12, 30))
    )
    offset = datetime.timezone(datetime.timedelta(minutes=draw(OFFSETS)))
    return naive.replace(tzinfo=offset)


def seconds(when: datetime.datetime) -> int:
    """The whole epoch seconds of C{when}."""
    return (when - EPOCH) // datetime.timedelta(seconds=1)


def offset_of(when: datetime.datetime) -> str:
    """The UTC offset of C{when} as C{%z} writes it."""
    offset = when.utcoffset()
    assert offset is not None
    minutes = offset // datetime.timedelta(minutes=1)
    sign, minutes = ("-" if minutes < 0 else "+"), abs(minutes)
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def clf(when: datetime.datetime) -> str:
    """C{when} as C{%t} writes it (without its brackets)."""
    return (
        f"{when.day:02d}/{MONTHS[when.month - 1]}/{when.year:04d}:"
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} {offset_of(when)}"
    )


@st.composite
def wild_clf(draw: st.DrawFn) -> str:
    """Text of the shape of a C{%t} time, but any digits: not always a time."""
    day, year, hour, minute, second = (
        draw(st.integers(0, top)) for top in (99, 9999, 99, 99, 99)
    )
    month = draw(st.sampled_from(MONTHS + [m.upper() for m in MONTHS]))
    sign, offset = draw(st.sampled_from("+-")), draw(st.integers(0, 9999))
    return (
        f"{day:02d}/{month}/{year:04d}:{hour:02d}:{minute:02d}:{second:02d}"
        f" {sign}{offset:04d}"
    )


@st.composite
def access_times(draw: st.DrawFn) -> str:
    """A request time near BASE, or now and then text merely shaped like one."""
    if draw(st.integers(0, 4)) == 0:
        return draw(wild_clf())
    offset = datetime.timezone(datetime.timedelta(minutes=draw(OFFSETS)))
    when = BASE + draw(st.integers(-1900, 5500))
    return clf(datetime.datetime.fromtimestamp(when, offset))


@st.composite
def access_lines(draw: st.DrawFn) -> bytes:
    """
    A line of an access log, without its ending: in the default format with
    any fields, times and ports, or any bytes.
    """
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=60)).replace(b"\n", b"")
    host = draw(st.sampled_from(LOCAL_HOSTS) | ADDRESSES)
    port = draw(st.sampled_from(PORTS).map(str) | st.integers(0, 65535).map(str))
    status, size = draw(st.integers(100, 599)), draw(st.integers(0, 10**6))
    return b'%s - %s [%s] "%s" %d %d "%s" "%s" %s' % (
        host.encode(),
        draw(st.sampled_from([b"-", b"frank"])),
        draw(access_times()).encode(),
        draw(FIELDS),
        status,
        size,
        draw(FIELDS),
        draw(FIELDS),
        draw(st.just("-") | st.just(port)).encode(),
    )


@st.composite
def logs(draw: st.DrawFn, lines: st.SearchStrategy[bytes]) -> bytes:
    """
    A log of C{lines}, each ending in LF or CRLF, but the last maybe in
    nothing or in a CR (cut short as it was written).
    """
    drawn = draw(st.lists(lines, max_size=12))
    endings = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in drawn]
    if drawn:
        endings[-1] = draw(st.sampled_from([b"\n", b"\r\n", b"", b"\r"]))
    return b"".join(line + ending for line, ending in zip(drawn, endings, strict=True))


class LogJoinTests(unittest.TestCase):
    """tlsproxy-logjoin writes one line for each line it reads."""

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        logs(connection_log_lines()),
        st.lists(logs(access_lines()), min_size=1, max_size=3),
    )
    def test_one_line_each(
        self, connection_log: bytes, access_logs: list[bytes]
    ) -> None:
        """
        Any access logs joined with any connection log come out one line for
        each line in, in order: unmatched ones byte for byte (with an LF if
        they had none), matched ones with a client's address and no port;
        and the counts on standard error add up.
        """
        with tempfile.TemporaryDirectory() as directory:
            paths = []
            for i, content in enumerate([connection_log, *access_logs]):
                paths.append(os.path.join(directory, f"{i}.log"))
                with open(paths[-1], "wb") as f:
                    f.write(content)
            stdout, stderr = io.BytesIO(), io.StringIO()
            self.assertEqual(main(paths, None, stdout, stderr), 0)
        lines = [line for log in access_logs for line in split_lines(log)]
        out = split_lines(stdout.getvalue())
        self.assertEqual(len(out), len(lines), (lines, out))
        matched = 0
        candidates = clients(connection_log)
        for line, joined in zip(lines, out, strict=True):
            whole = line if line[-1:] == b"\n" else line + b"\n"
            if joined != whole:
                matched += 1
                body = line.rstrip(b"\r\n")
                host, ending = body.split(b" ", 1)[0], whole[len(body) :]
                rest = body[len(host) : body.rfind(b" ")] + ending
                self.assertIn(
                    joined,
                    {client + rest for client in candidates},
                    f"{line!r} came out as {joined!r}: neither as it was nor joined",
                )
        summary = stderr.getvalue().splitlines()
        read = re.fullmatch(
            r"tlsproxy-logjoin: connection log: (\d+) records, (\d+) skipped",
            summary[0],
        )
        assert read is not None, summary
        self.assertEqual(int(read[1]) + int(read[2]), len(split_lines(connection_log)))
        counts = re.fullmatch(
            r"tlsproxy-logjoin: matched (\d+), unmatched (\d+), unparsable (\d+),"
            r" not an address (\d+)",
            summary[1],
        )
        assert counts is not None, summary
        self.assertEqual(sum(map(int, counts.groups())), len(lines))
        self.assertEqual(int(counts[1]), matched)


# The LogFormat compiler.  Formats are built from directives with any
# conditions, modifiers and arguments, and literal text.

STRFTIME = st.lists(
    st.sampled_from(["%" + c for c in string.ascii_letters + "%"])
    | st.text(max_size=3).filter(lambda t: "}" not in t),
    max_size=8,
).map("".join)
ARGUMENTS = st.one_of(
    st.none(),
    st.sampled_from(["remote", "Remote", "local", "c", "User-Agent", ""]),
    st.sampled_from(["sec", "msec", "usec", "begin:sec", "end:usec", "msec_frac"]),
    STRFTIME,
    st.text(max_size=10).filter(lambda t: "}" not in t),
)
DIRECTIVES = st.builds(
    lambda conditions, argument, modifier, letter: (
        f"%{conditions}{'' if argument is None else '{' + argument + '}'}"
        f"{modifier}{letter}"
    ),
    st.text("!<>0123456789,", max_size=5),
    ARGUMENTS,
    st.sampled_from(["", "<", ">"]),
    st.sampled_from([*string.ascii_letters, "%", "^ti", "^to", "^FB"]),
)
FORMATS = st.lists(
    DIRECTIVES
    | st.text(max_size=8)
    | st.sampled_from(["%h", "%a", "%{remote}p", "%t", " ", '"', "\\", "%"]),
    max_size=12,
).map("".join)


# The round trip.  A format of fields separated by single spaces, each with a
# renderer of its text; an address, the remote port and a complete time also
# say what the compiled format must read back.


class Rendered(NamedTuple):
    text: bytes
    role: str  # "address", "port", "time" (a complete time), or ""
    value: bytes | float | None  # of an address, a port or a time


Renderer = Callable[[st.DrawFn, bool], Rendered]


def _address_field(draw: st.DrawFn, wild: bool) -> Rendered:
    hostname = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
    text = draw(ADDRESSES | hostname).encode()
    return Rendered(text, "address", text)


def _port_field(draw: st.DrawFn, wild: bool) -> Rendered:
    text = draw(st.integers(0, 65535).map(str) | st.just("-")).encode()
    return Rendered(text, "port", text)


def _word_field(draw: st.DrawFn, wild: bool) -> Rendered:
    word = st.binary(min_size=1, max_size=12).filter(lambda b: re.fullmatch(rb"\S+", b))
    return Rendered(draw(word | st.just(b"-")), "", None)


def _number_field(draw: st.DrawFn, wild: bool) -> Rendered:
    return Rendered(draw(st.integers().map(b"%d".__mod__) | st.just(b"-")), "", None)


def _quoted_field(draw: st.DrawFn, wild: bool) -> Rendered:
    plain = st.binary(max_size=8).map(lambda b: re.sub(rb'["\\\n]', b"", b))
    escape = st.binary(min_size=1, max_size=1).filter(lambda b: b != b"\n")
    chunks = draw(st.lists(plain | escape.map(lambda b: b"\\" + b), max_size=4))
    return Rendered(b'"' + b"".join(chunks) + b'"', "", None)


def _string_field(draw: st.DrawFn, wild: bool) -> Rendered:
    word = st.binary(min_size=1, max_size=12).filter(
        lambda b: re.fullmatch(rb'[^\s"\\]+', b)
    )
    return Rendered(draw(word | st.just(b"-")), "", None)


def _time_field(
    render: Callable[[datetime.datetime], tuple[str, float | None]],
    wild: st.SearchStrategy[str],
) -> Renderer:
    """
    A time directive's renderer: C{render} gives the text of a time and the
    epoch seconds it tells (None if it alone does not tell the time);
    C{wild} is text of the same shape with any digits.
    """
    complete = render(EPOCH)[1] is not None

    def field(draw: st.DrawFn, is_wild: bool) -> Rendered:
        role = "time" if complete else ""
        if draw(st.integers(0, 9)) == 0:
            return Rendered(b"-", role, None)
        if is_wild:
            return Rendered(draw(wild).encode(), role, None)
        text, value = render(draw(times()))
        return Rendered(text.encode(), role, value)

    return field


def _digits(low: int, high: int) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=low, max_size=high)


@st.composite
def _wild_iso(draw: st.DrawFn) -> str:
    year, month, day, hour, minute, second, offset = (
        draw(st.integers(0, top)) for top in (9999, 99, 99, 99, 99, 99, 9999)
    )
    return (
        f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
        f"{draw(st.sampled_from('+-'))}{offset:04d}"
    )


@st.composite
def _wild_named(draw: st.DrawFn) -> str:
    day, year, hour, minute, second, offset = (
        draw(st.integers(0, top)) for top in (99, 9999, 99, 99, 99, 9999)
    )
    month = draw(st.sampled_from(FULL_MONTHS))
    return (
        f"{day:2d} {month} {year:04d} {hour:02d}:{minute:02d}:{second:02d}"
        f" {draw(st.sampled_from('+-'))}{offset:04d}"
    )


def _micros(when: datetime.datetime) -> int:
    return seconds(when) * 1_000_000 + when.microsecond


# Epoch times of any length: a few digits, or more than a float holds.
EPOCH_DIGITS = _digits(1, 12) | _digits(309, 320)
TIME_FIELDS: dict[str, Renderer] = {
    "%t": _time_field(
        lambda w: (f"[{clf(w)}]", seconds(w)), wild_clf().map("[{}]".format)
    ),
    "%{%d/%b/%Y:%H:%M:%S %z}t": _time_field(lambda w: (clf(w), seconds(w)), wild_clf()),
    "%{%Y-%m-%dT%H:%M:%S%z}t": _time_field(
        lambda w: (f"{w:%Y-%m-%dT%H:%M:%S}{offset_of(w)}", seconds(w)), _wild_iso()
    ),
    "%{%e %B %Y %T %z}t": _time_field(
        lambda w: (
            f"{w.day:2d} {FULL_MONTHS[w.month - 1]} {w.year:04d}"
            f" {w:%H:%M:%S} {offset_of(w)}",
            seconds(w),
        ),
        _wild_named(),
    ),
    "%{%Y-%m-%d %H:%M:%S}t": _time_field(
        lambda w: (
            f"{w:%Y-%m-%d %H:%M:%S}",
            time.mktime((*w.timetuple()[:6], 0, 0, -1)),
        ),
        _wild_iso().map(lambda t: t[:19].replace("T", " ")),
    ),
    "%{sec}t": _time_field(lambda w: (str(seconds(w)), seconds(w)), EPOCH_DIGITS),
    "%{begin:msec}t": _time_field(
        lambda w: (str(_micros(w) // 1000), _micros(w) // 1000 / 1000), EPOCH_DIGITS
    ),
    "%{end:usec}t": _time_field(
        lambda w: (str(_micros(w)), _micros(w) / 1_000_000), EPOCH_DIGITS
    ),
    "%{msec_frac}t": _time_field(
        lambda w: (f"{w.microsecond // 1000:03d}", None), _digits(1, 3)
    ),
    "%{%H:%M:%S}t": _time_field(
        lambda w: (f"{w:%H:%M:%S}", None), _digits(2, 2).map(lambda d: f"{d}:{d}:{d}")
    ),
}
FIELD_KINDS: dict[str, Renderer] = {
    **dict.fromkeys(["%h", "%a", "%>h", "%<a", "%400,501h"], _address_field),
    **dict.fromkeys(["%l", "%v", "%{c}a", "%A", "%H", "%m", "%P"], _word_field),
    **dict.fromkeys(["%b", "%>s", "%D", "%T", "%{local}p", "%I"], _number_field),
    **dict.fromkeys(
        ['"%r"', '"%{Referer}i"', '"%{User-Agent}i"', '"%q"'], _quoted_field
    ),
    **dict.fromkeys(["%u", "%f", "%{X}n"], _string_field),
    **TIME_FIELDS,
}


@st.composite
def rendered_lines(draw: st.DrawFn, wild: bool) -> tuple[str, list[Rendered]]:
    """
    A format (an address, the remote port, and any fields and literal words,
    in any order, separated by spaces) and the fields of a line in it.  If
    C{wild}, its times are any digits of their shape, not always a time.
    """
    directives = ["%h", "%{remote}p"]
    directives += draw(st.lists(st.sampled_from(sorted(FIELD_KINDS)), max_size=6))
    literal = st.text(
        st.characters(exclude_characters='%"\\', exclude_categories=["Z", "C"]),
        min_size=1,
        max_size=5,
    )
    directives += draw(st.lists(literal, max_size=2))
    directives = list(draw(st.permutations(directives)))
    fields = []
    for directive in directives:
        if directive in FIELD_KINDS:
            fields.append(FIELD_KINDS[directive](draw, wild))
        elif directive == "%{remote}p":
            fields.append(_port_field(draw, wild))
        else:  # a literal word
            fields.append(Rendered(directive.encode(), "", None))
    return " ".join(directives), fields


class LogFormatTests(unittest.TestCase):
    """The LogFormat compiler refuses formats clearly and reads back lines."""

    @settings(max_examples=500, deadline=None, database=None)
    @given(FORMATS | st.text())
    def test_compiles_or_refuses(self, log_format: str) -> None:
        """
        Any format of directives and text compiles to a pattern with an
        address and a port group, or raises LogFormatError, nothing else.
        """
        try:
            compiled = compile_format(log_format)
        except LogFormatError:
            return
        self.assertTrue(0 < compiled.host_group <= compiled.pattern.groups)
        self.assertTrue(0 < compiled.port_group <= compiled.pattern.groups)
        self.assertTrue(any(is_address for _, is_address in compiled.edits))

    @settings(max_examples=300, deadline=None, database=None)
    @given(rendered_lines(wild=False))
    def test_round_trip(self, drawn: tuple[str, list[Rendered]]) -> None:
        """
        A line written in a format reads back its addresses, its remote port
        and its first complete time; joined, it has the client in place of
        each address and no remote port.
        """
        log_format, fields = drawn
        compiled = compile_format(log_format)
        line = b" ".join(field.text for field in fields)
        match = compiled.pattern.fullmatch(line)
        assert match is not None, (log_format, line)
        addresses = [match[group] for group, is_address in compiled.edits if is_address]
        self.assertEqual(addresses, [f.value for f in fields if f.role == "address"])
        [port] = [field.text for field in fields if field.role == "port"]
        self.assertEqual(match[compiled.port_group], port)
        told = [field.value for field in fields if field.role == "time"]
        self.assertEqual(
            compiled.time_of(match[compiled.time_group]), (told or [None])[0]
        )
        index = ConnectionIndex({port: [(-math.inf, math.inf, None, b"192.0.2.7")]})
        joined = b" ".join(
            b"192.0.2.7" if field.role == "address" else field.text
            for field in fields
            if field.role != "port"
        )
        self.assertEqual(
            join_line(line + b"\n", compiled, index), (joined + b"\n", "matched")
        )

    @settings(max_examples=300, deadline=None, database=None)
    @given(rendered_lines(wild=True), st.booleans())
    def test_any_time(self, drawn: tuple[str, list[Rendered]], crlf: bool) -> None:
        """
        A line whose times are only shaped like times (any digits) is joined
        or left as it is, as one line, and never raises.
        """
        log_format, fields = drawn
        line = b" ".join(field.text for field in fields) + (b"\r\n" if crlf else b"\n")
        [port] = [field.text for field in fields if field.role == "port"]
        index = ConnectionIndex({port: [(-math.inf, math.inf, None, b"192.0.2.7")]})
        joined, outcome = join_line(line, compile_format(log_format), index)
        self.assertEqual(split_lines(joined), [joined])
        self.assertTrue(joined.endswith(line[-2:] if crlf else b"\n"))
        if outcome != "matched":
            self.assertEqual(joined, line)
