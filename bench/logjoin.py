"""
Benchmark tlsproxy-logjoin: generate an access log (Combined plus
%{remote}p, times over one day, source ports reused) and the connection log
that goes with it, then join them in-process (timing the core loop) and with
the command line end to end.  Prints lines per second and peak RSS.

    /work/venv/bin/python bench/logjoin.py [--lines N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import calendar
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tlsproxy.logformat import compile_format
from tlsproxy.logjoin import DEFAULT_FORMAT, join_line, read_index

ZONE = 3600  # the web server's zone: +0100
DAY = calendar.timegm((2025, 11, 27, 0, 0, 0)) - ZONE
PATHS = ["/", "/index.html", "/style.css", "/app.js", "/logo.png", "/search?q=a+b"]
AGENTS = [
    "curl/8.5.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    'Mozilla/5.0 (compatible; Bot/1.0; "quoted" +https://example.org/bot)',
]
MONTHS = [
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
]


def clf_time(when: float) -> str:
    """Apache's %t for C{when} in the zone +0100."""
    t = time.gmtime(when + ZONE)
    return (
        f"[{t.tm_mday:02d}/{MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0100]"
    )


def record(
    event: str,
    key: int,
    client: str,
    port: int,
    opened: float,
    closed: float | None,
    sent: int,
) -> dict[str, object]:
    """A connection-log record as tlsproxy writes it."""
    return {
        "event": event,
        "id": f"{key:032x}",
        "service": "tlsproxy",
        "client_host": client,
        "client_port": 1024 + key % 60000,
        "listen_host": "192.0.2.1",
        "listen_port": 443,
        "backend_local_host": "127.0.0.1",
        "backend_local_port": port,
        "backend_host": "127.0.0.1",
        "backend_port": 8080,
        "opened": opened,
        "closed": closed,
        "duration": None if closed is None else round(closed - opened, 6),
        "bytes_from_client": 0 if closed is None else 300,
        "bytes_to_client": 0 if closed is None else sent,
        "tls_version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "sni": "www.example.org",
        "alpn": None,
        "client_cert": None,
        "reason": None if closed is None else "backend closed",
    }


def generate(directory: Path, lines: int) -> tuple[Path, Path, int]:
    """
    Write C{access.log} (C{lines} lines) and C{connections.log}; return their
    paths and the number of lines that should match.  One line in 200 comes
    from a client that did not go through the proxy (unmatched); the last
    connections have no close record (still open at the end).
    """
    rng = random.Random(1)
    clients = [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
        f"{rng.randrange(1, 255)}"
        for _ in range(20_000)
    ]
    busy: dict[int, float] = {}
    expected = written = key = 0
    per_connection = 4  # requests per connection on average (1 to 7)
    connections = lines // per_connection
    access_path, conn_path = directory / "access.log", directory / "connections.log"
    with open(access_path, "w") as access, open(conn_path, "w") as conn:
        while written < lines:
            key += 1
            opened = DAY + 86_400 * key / connections + rng.random()
            port = rng.randrange(32768, 61000)
            while busy.get(port, 0) > opened:
                port = rng.randrange(32768, 61000)
            client = rng.choice(clients)
            conn.write(json.dumps(record("open", key, client, port, opened, None, 0)))
            conn.write("\n")
            when, sent = opened + 0.01, 0
            for _ in range(min(rng.randrange(1, 8), lines - written)):
                size = rng.randrange(200, 50_000)
                sent += size
                host, remote = "127.0.0.1", port
                if written % 200 == 199:
                    host, remote = rng.choice(clients), rng.randrange(1024, 32768)
                else:
                    expected += 1
                access.write(
                    f'{host} - - {clf_time(when)} "GET {rng.choice(PATHS)} HTTP/1.1"'
                    f' 200 {size} "https://www.example.org/"'
                    f' "{rng.choice(AGENTS).replace(chr(34), chr(92) + chr(34))}"'
                    f" {remote}\n"
                )
                written += 1
                when += rng.uniform(0.05, 2.0)
            closed = when + rng.uniform(0.1, 5.0)
            busy[port] = closed
            if written < lines - 50:
                conn.write(
                    json.dumps(record("close", key, client, port, opened, closed, sent))
                )
                conn.write("\n")
    return access_path, conn_path, expected


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(access_path: Path, conn_path: Path, out_path: Path) -> Counter[str]:
    """Index and join in this process, timing each; return the outcomes."""
    rss_before = peak_rss_mib()
    log_format = compile_format(DEFAULT_FORMAT)
    started = time.perf_counter()
    with open(conn_path, "rb") as conn:
        index, records, skipped = read_index(conn)
    took = time.perf_counter() - started
    print(
        f"in-process: index of {records} records ({skipped} skipped) in"
        f" {took:.2f} s: {records / took:,.0f} records/s;"
        f" peak RSS {rss_before:.0f} MiB before, {peak_rss_mib():.0f} MiB after"
    )
    counts: Counter[str] = Counter()
    started = time.perf_counter()
    with open(access_path, "rb") as access, open(out_path, "wb") as out:
        write = out.write
        for line in access:
            joined, outcome = join_line(line, log_format, index)
            write(joined)
            counts[outcome] += 1
    took = time.perf_counter() - started
    lines = sum(counts.values())
    print(
        f"in-process: join of {lines} lines in {took:.2f} s:"
        f" {lines / took:,.0f} lines/s; {dict(counts)};"
        f" peak RSS {peak_rss_mib():.0f} MiB"
    )
    return counts


def command_line(conn_path: Path, access_path: Path, out_path: Path) -> None:
    """
    Run the command line on the whole access log and on an empty one, under
    GNU time when there is one (the peak RSS of the command itself: the
    RSS a child of this big process reports includes ours at its exec).
    """
    empty = out_path.with_name("empty.log")
    empty.touch()
    timer = ["/usr/bin/time", "-f", "%e %M"] if Path("/usr/bin/time").exists() else []
    for name, access_log in [("index only", empty), ("end to end", access_path)]:
        command = [sys.executable, "-m", "tlsproxy.logjoin", str(conn_path)]
        started = time.perf_counter()
        with open(out_path, "wb") as out:
            done = subprocess.run(
                [*timer, *command, str(access_log)],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                check=True,
            )
        took = time.perf_counter() - started
        summary = [line.split(": ", 1)[1] for line in done.stderr.splitlines()[:2]]
        rss = int(done.stderr.split()[-1]) / 1024 if timer else math.nan
        with open(access_log, "rb") as lines:
            count = sum(1 for _ in lines)
        rate = f", {count / took:,.0f} lines/s" if count else ""
        print(
            f"command line, {name}: {took:.2f} s{rate};"
            f" peak RSS {rss:.0f} MiB; {'; '.join(summary)}"
        )
    print(
        "by hand, with --keep DIR: cd DIR && time tlsproxy-logjoin"
        f" {conn_path.name} {access_path.name} > combined.log"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--keep", metavar="DIR", help="write the logs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(args.keep or temp)
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        access_path, conn_path, expected = generate(directory, args.lines)
        with open(conn_path, "rb") as conn:
            records = sum(1 for _ in conn)
        print(
            f"generated {args.lines} access-log lines"
            f" ({access_path.stat().st_size / 2**20:.0f} MiB) and {records}"
            f" connection records ({conn_path.stat().st_size / 2**20:.0f} MiB)"
            f" in {time.perf_counter() - started:.1f} s; {expected} should match"
        )
        command_line(conn_path, access_path, directory / "combined.log")
        counts = in_process(access_path, conn_path, directory / "combined.log")
        assert counts["matched"] == expected, (counts, expected)


if __name__ == "__main__":
    main()
