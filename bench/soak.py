"""
Soak tlsproxy: N concurrent TLS clients for M minutes, each exchanging
checksummed messages with a backend through the proxy, now and then closing
and reconnecting or resetting mid-message.  Every S seconds prints the rate,
the errors, the latency and the proxy's RSS and open fds; at the end, totals.
Exits 1 on a checksum mismatch or a Traceback in the proxy's log.

    /work/venv/bin/python bench/soak.py --connections 1000 --minutes 10

Columns: the errors so far by kind (checksum mismatch, unexpected close,
timeout, handshake failure), the latency of the interval's exchanges, the
proxy's VmRSS and fds, the CPU use of the proxy (on CPU 0) and of the load
(the clients and the backend, on CPU 1: near 100% it is the bottleneck).
Not in CI.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import HOST, MIB, cpu_seconds, open_fds, spawn, status, stop, wait_for

FRAME = struct.Struct("!I32s")  # payload length, its SHA-256; then the payload
DATA = os.urandom(2 * MIB)  # payloads are slices of it, at random offsets
TIMEOUT = 30.0  # seconds for a handshake, an exchange, a close
RECONNECT, RESET = 0.05, 0.01  # chance, per exchange, of a close or a reset
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[], Awaitable[Streams]]
HEADER = (
    "    s  live exch/s csum  eof  tmo hshk  p50 ms  p99 ms RSS MiB   fds proxy  load"
)
KINDS = "checksum mismatch", "unexpected close", "timeout", "handshake failure"


def payload() -> bytes:
    """1 B to 256 KiB of random bytes, the size log-uniform."""
    start = random.randrange(MIB)
    return DATA[start : start + int(2 ** random.uniform(0, 18))]


def frame(body: bytes) -> bytes:
    return FRAME.pack(len(body), hashlib.sha256(body).digest()) + body


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """
    The backend: check each request and answer with a random payload, or,
    if the checksum does not hold, with an empty payload and a zero checksum
    (which the client then counts as a mismatch).
    """
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            length, digest = FRAME.unpack(await reader.readexactly(FRAME.size))
            body = await reader.readexactly(length)
            good = hashlib.sha256(body).digest() == digest
            writer.write(frame(payload()) if good else FRAME.pack(0, bytes(32)))
            await writer.drain()
    writer.close()


async def _backend() -> None:
    server = await asyncio.start_server(_answer, HOST, 0, limit=MIB, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


class Stats:
    """What the clients did, and what the reports saw."""

    def __init__(self) -> None:
        self.live = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []  # this interval's, in seconds
        self.run: list[float] = []  # the earlier intervals'
        self.seen: list[tuple[int, int]] = []  # the proxy's RSS and fds


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Send a framed payload; read the framed answer; whether its checksum holds."""
    writer.write(frame(payload()))
    await writer.drain()
    length, digest = FRAME.unpack(await reader.readexactly(FRAME.size))
    return bool(hashlib.sha256(await reader.readexactly(length)).digest() == digest)


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send an RST halfway through a request, or after a byte of its answer."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    message = frame(payload())
    halfway = random.random() < 0.5
    writer.write(message[: (FRAME.size + len(message)) // 2] if halfway else message)
    await writer.drain()
    if not halfway:
        await reader.read(1)
    writer.transport.abort()


async def converse(
    stats: Stats, streams: Streams, stop_at: float, pause: float
) -> None:
    """Exchange messages till C{stop_at}, a planned close or reset, or an error."""
    reader, writer = streams
    while time.monotonic() < stop_at:
        draw, started = random.random(), time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                if draw < RESET:
                    stats.events["resets"] += 1
                    return await reset(reader, writer)
                good = await exchange(reader, writer)
        except TimeoutError:
            return stats.errors.update(["timeout"])
        except (asyncio.IncompleteReadError, OSError):
            return stats.errors.update(["unexpected close"])
        if not good:
            return stats.errors.update(["checksum mismatch"])
        stats.latencies.append(time.monotonic() - started)
        if draw > 1 - RECONNECT:
            break
        await asyncio.sleep(random.uniform(0, 2 * pause))
    stats.events["closes"] += 1
    try:
        async with asyncio.timeout(TIMEOUT):
            writer.close()  # close_notify, and wait for the proxy's
            await writer.wait_closed()
    except TimeoutError:
        stats.errors["timeout"] += 1
    except OSError:
        stats.errors["unexpected close"] += 1


async def client(
    stats: Stats, connect: Connect, start_at: float, stop_at: float, pause: float
) -> None:
    """One client: connect (a full handshake each time) and converse, again."""
    await asyncio.sleep(start_at - time.monotonic())
    while time.monotonic() < stop_at:
        try:
            async with asyncio.timeout(TIMEOUT):
                streams = await connect()
        except (OSError, TimeoutError):
            stats.errors["handshake failure"] += 1
            await asyncio.sleep(1)
            continue
        stats.events["handshakes"] += 1
        stats.live += 1
        try:
            await converse(stats, streams, stop_at, pause)
        finally:
            stats.live -= 1
            streams[1].transport.abort()  # nothing, if it has closed


def percentile(values: list[float], p: float) -> float:
    """The C{p}th percentile of C{values}, in milliseconds."""
    if not values:
        return float("nan")
    return 1000 * sorted(values)[min(len(values) - 1, int(p / 100 * len(values)))]


def sample(pid: int) -> tuple[int, int, float]:
    """The proxy's VmRSS (KiB), open fds, CPU seconds."""
    return status(pid, "VmRSS"), open_fds(pid), cpu_seconds(pid)


def load_cpu(backend: int) -> float:
    times = os.times()
    return times.user + times.system + cpu_seconds(backend)


async def report(
    stats: Stats, pids: tuple[int, int], every: float, stop_at: float
) -> None:
    """Print a line every C{every} seconds till C{stop_at}."""
    print(HEADER)
    began = last = time.monotonic()
    proxy, load = sample(pids[0])[2], load_cpu(pids[1])
    while last < stop_at:
        await asyncio.sleep(min(last + every, stop_at) - time.monotonic())
        now, cpu2 = time.monotonic(), load_cpu(pids[1])
        rss, fds, cpu = sample(pids[0])
        lat, stats.latencies = stats.latencies, []
        stats.run += lat
        stats.seen.append((rss, fds))
        errors = " ".join(f"{stats.errors[kind]:4d}" for kind in KINDS)
        busy = [100 * (cpu - proxy) / (now - last), 100 * (cpu2 - load) / (now - last)]
        print(
            f"{now - began:5.0f} {stats.live:5d} {len(lat) / (now - last):6.0f} "
            f"{errors} "
            f"{percentile(lat, 50):7.1f} {percentile(lat, 99):7.1f} "
            f"{rss / 1024:7.1f} {fds:5d} {busy[0]:4.0f}% {busy[1]:4.0f}%"
        )
        last, proxy, load = now, cpu, cpu2


async def soak(args: argparse.Namespace, port: int, pids: tuple[int, int]) -> Stats:
    """Run the clients, ramped up over 10 s, and the reports; wait for the end."""
    stats, now = Stats(), time.monotonic()
    stop_at = now + 60 * args.minutes
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connect = functools.partial(
        asyncio.open_connection, HOST, port, ssl=context, limit=MIB,
        server_hostname="localhost",
    )  # fmt: skip
    clients = [
        client(stats, connect, now + 10 * i / args.connections, stop_at, args.pause)
        for i in range(args.connections)
    ]
    await asyncio.gather(report(stats, pids, args.interval, stop_at), *clients)
    stats.run += stats.latencies
    stats.events["exchanges"] = len(stats.run)
    return stats


def start_proxy(
    stack: contextlib.ExitStack, tmp: Path, backend: int
) -> tuple[int, int]:
    """Start tlsproxy on CPU 0; its pid and port, once it listens."""
    twistd, log = Path(sys.executable).parent / "twistd", tmp / "tlsproxy.log"
    cmd = ["taskset", "-c", "0", str(twistd), "-n", "--pidfile=", "--logfile", str(log)]
    cmd += ["tlsproxy", f"--listen=tcp:0:interface={HOST}", "--self-signed=localhost"]
    cmd += [f"--connect=tcp:{HOST}:{backend}", f"--connection-log={tmp}/conn.log"]
    process = spawn(stack, cmd, tmp / "tlsproxy.out")

    def port() -> int | None:
        if process.poll() is not None:
            raise RuntimeError(f"tlsproxy exited: {(tmp / 'tlsproxy.out').read_text()}")
        found = log.exists() and re.search(r"starting on (\d+)", log.read_text())
        return int(found[1]) if found else None

    return process.pid, wait_for(port, 30, "tlsproxy listening")


def summary(stats: Stats, idle: tuple[int, int], pid: int) -> None:
    """Print the totals, the latency, and the proxy's RSS and fds over the run."""
    with contextlib.suppress(TimeoutError):  # the proxy may take a moment to close
        wait_for(lambda: open_fds(pid) <= idle[1] or None, 30, "idle fds")
    (rss, fds, _), seen = sample(pid), stats.seen
    events = ("exchanges", "handshakes", "closes", "resets")
    print("\n" + ", ".join(f"{event} {stats.events[event]}" for event in events))
    print("errors:", ", ".join(f"{kind} {stats.errors[kind]}" for kind in KINDS))
    latency = [f"{p} {percentile(stats.run, p):.1f}" for p in (50, 99, 99.9, 100)]
    print("latency over the run, ms: p" + ", p".join(latency))
    kib = idle[0], seen[0][0], max(seen)[0], seen[-1][0], rss, status(pid, "VmHWM")
    print(
        "proxy RSS MiB: idle {:.1f}, under load {:.1f} first, {:.1f} peak, "
        "{:.1f} last; after {:.1f}, VmHWM {:.1f}".format(*(k / 1024 for k in kib))
    )
    print(
        f"proxy fds: idle {idle[1]}, under load {seen[0][1]} first, "
        f"{max(fds for _, fds in seen)} peak, {seen[-1][1]} last; after all "
        f"clients closed {fds} ({'the' if fds <= idle[1] else 'ABOVE the'} idle)"
    )


def proxy_logs(tmp: Path) -> int:
    """Print the close reasons and the log's size; the count of Tracebacks."""
    records = [json.loads(line) for line in (tmp / "conn.log").open()]
    reasons = collections.Counter(r["reason"] for r in records if r["event"] == "close")
    closes = reasons.total()
    print(f"connection log: {len(records) - closes} opens, {closes} closes, for:")
    for reason, count in reasons.most_common(10):
        print(f"  {count:7d} {reason}")
    logs = sorted(tmp.glob("tlsproxy.log*"))  # twistd rotates its log at 1 MB
    text = "".join(log.read_text() for log in logs)
    tracebacks = text.count("Traceback")
    print(
        f"proxy log: {len(text.splitlines())} lines in {len(logs)} files, "
        f"{tracebacks} Tracebacks, {text.count('#error]')} error lines"
    )
    if tracebacks:
        print(text[max(0, text.index("Traceback") - 200) :][:3000])
    return tracebacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--connections", type=int, default=100, metavar="N")
    parser.add_argument("--minutes", type=float, default=1, metavar="M")
    parser.add_argument("--interval", type=float, default=30, help="report period, s")
    parser.add_argument(
        "--pause", type=float, default=1, help="mean s between exchanges"
    )
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        return asyncio.run(_backend())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up on TERM too
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the proxy inherits
    if sorted(os.sched_getaffinity(0))[:2] != [0, 1]:
        sys.exit("needs CPUs 0 and 1: the proxy gets one, the clients the other")
    os.sched_setaffinity(0, {1})  # the backend inherits it
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        cmd = [sys.executable, __file__, "--backend"]
        backend = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        stack.callback(stop, backend)
        backend_port = int(backend.stdout.readline())  # type: ignore[union-attr]
        pid, port = start_proxy(stack, tmp, backend_port)
        time.sleep(1)
        idle = sample(pid)[:2]
        print(
            f"{args.connections} connections for {args.minutes:g} min, a mean "
            f"{args.pause:g} s between exchanges; fd limit {hard}; proxy pid "
            f"{pid}, idle: RSS {idle[0] / 1024:.1f} MiB, {idle[1]} fds"
        )
        stats = asyncio.run(soak(args, port, (pid, backend.pid)))
        summary(stats, idle, pid)
        failed = proxy_logs(tmp) or stats.errors["checksum mismatch"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
