"""
Benchmark tlsproxy, and stunnel beside it: throughput, handshake rate,
requests per second and memory.  Prints figures with the command behind
each; asserts nothing.

    /work/venv/bin/python bench/bench.py [--quick] [--stunnel]

Needs curl, openssl and wrk; stunnel4 for --stunnel.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from OpenSSL import SSL

from twisted import __version__ as twisted_version

MIB = 1 << 20
HOST = "127.0.0.1"
IDLE_CONNECTIONS = 1000
_SLICE = memoryview(b"x" * MIB)
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
T = TypeVar("T")
Parse = Callable[[str, float], str]  # (stdout, wall seconds) -> value
Launch = tuple[list[str], Callable[[], int]]  # (command, its port or 0 till ready)


def _head(length: int) -> bytes:  # the backend: HTTP/1.1, keep-alive
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """GET / -> 100 bytes; GET /bytes/N -> N bytes; POST -> the body's length."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, version = head.split(b"\r\n", 1)[0].split(b" ", 2)
            found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if method == b"POST":
                left = length = int(found[1]) if found else 0
                while left:
                    left -= len(await reader.readexactly(min(left, MIB)))
                writer.write(_head(len(b"%d\n" % length)) + b"%d\n" % length)
            elif path.startswith(b"/bytes/"):
                left = int(path[len(b"/bytes/") :])
                writer.write(_head(left))
                while left:
                    writer.write(_SLICE[: min(left, MIB)])
                    left -= min(left, MIB)
                    await writer.drain()
            else:
                writer.write(_head(100) + b"x" * 100)
            await writer.drain()
            if version == b"HTTP/1.0":
                break  # s_time -www reads until the connection closes
    writer.close()


async def _backend() -> None:
    server = await asyncio.start_server(_serve, HOST, 0, limit=MIB, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate C{process}; kill it if it has not ended within 10 s."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    process.kill()  # nothing, if it has ended
    process.wait()


def spawn(
    stack: contextlib.ExitStack, cmd: list[str], out: Path
) -> subprocess.Popen[bytes]:
    """Start C{cmd} with its output to C{out}; C{stack} stops it."""
    with out.open("wb") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    stack.callback(stop, process)
    return process


def wait_for(check: Callable[[], T | None], seconds: float, what: str) -> T:
    """Poll C{check} until it gives something other than None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {seconds} s")


def status(pid: int, field: str) -> int:
    """A kB figure such as VmRSS from /proc/PID/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text)[1])  # type: ignore[index]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of all of C{pid}'s threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int  # the proxy, or the backend: its CPU use is shown


def row(figure: str, target: str, value: str, cpu: str, command: str) -> None:
    print(f"{figure:<22} {target:<9} {value:>18} {cpu:>4}  $ {command}", flush=True)


def grab(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if not found:
        raise ValueError(f"no {pattern!r} in the output")
    return found[1]


def measure(target: Target, figure: str, cmd: list[str], parse: Parse) -> None:
    """Run C{cmd} (within 3 minutes); print what C{parse} finds, and CPU use."""
    cpu, started = cpu_seconds(target.pid), time.monotonic()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if run.returncode:
            raise ValueError(f"exit {run.returncode}: {run.stderr.strip()[-60:]}")
        value = parse(run.stdout, time.monotonic() - started)
    except (subprocess.SubprocessError, ValueError) as e:
        value = f"FAILED: {e}"
    busy = 100 * (cpu_seconds(target.pid) - cpu) / (time.monotonic() - started)
    row(figure, target.name, value, f"{busy:.0f}%", shlex.join(cmd))


def curl_speed(out: str, wall: float) -> str:
    return f"{float(out) / MIB:.0f} MiB/s"


def s_time(out: str, wall: float) -> str:
    """Connections per wall second; s_time marks each * (new) or r (resumed)."""
    count = int(grab(r"(\d+) connections in \d+ real seconds", out))
    marks = "".join(re.findall(r"^[*r]+$", out, re.MULTILINE))
    resumed = 100 * marks.count("r") / max(len(marks), 1)
    return f"{count / wall:.0f}/s {resumed:.0f}% res"


def wrk(out: str, wall: float) -> str:
    rate = float(grab(r"Requests/sec:\s+([\d.]+)", out))
    p99 = grab(r"\s99%\s+(\S+)", out)
    errors = " ERRORS" if re.search(r"Non-2xx|Socket errors", out) else ""
    return f"{rate:.0f}/s p99 {p99}{errors}"


def start_tlsproxy(tmp: Path, connect: str) -> Launch:
    log, twistd = tmp / "tlsproxy.log", Path(sys.executable).parent / "twistd"
    cmd = [str(twistd), "-n", "--pidfile=", "--logfile", str(log), "tlsproxy"]
    cmd += [f"--listen=tcp:0:interface={HOST}", f"--connect=tcp:{connect}"]
    cmd += [f"--cert={tmp / 'cert.pem'}", f"--key={tmp / 'key.pem'}"]

    def port() -> int:
        found = log.exists() and re.search(r"starting on (\d+)", log.read_text())
        return int(found[1]) if found else 0

    return cmd, port


def start_stunnel(tmp: Path, connect: str) -> Launch:
    with socket.socket() as s:  # a free port, on loopback nobody else takes it
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    (tmp / "stunnel.conf").write_text(
        f"foreground = yes\npid =\nsyslog = no\noutput = {tmp}/stunnel.log\n"
        f"debug = notice\n[bench]\naccept = {HOST}:{port}\nconnect = {connect}\n"
        f"cert = {tmp}/cert.pem\nkey = {tmp}/key.pem\n"
    )

    def accepting() -> int:
        with socket.socket() as s:
            return port if s.connect_ex((HOST, port)) == 0 else 0

    return [str(STUNNEL), f"{tmp}/stunnel.conf"], accepting


def idle_connections(target: Target, port: int) -> None:
    """Print the proxy's RSS growth per idle TLS connection, and after."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    pid, sockets = target.pid, []
    rss, fds = status(pid, "VmRSS"), open_fds(pid)
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.create_connection((HOST, port), timeout=10)
            sockets.append(context.wrap_socket(sock))
        more = 2 * IDLE_CONNECTIONS  # a client and a backend socket each
        wait_for(lambda: open_fds(pid) >= fds + more or None, 60, "backend sockets")
        time.sleep(1)
        per = (status(pid, "VmRSS") - rss) / IDLE_CONNECTIONS
    finally:
        for sock in sockets:
            sock.close()
    how = f"{IDLE_CONNECTIONS} idle TLS connections (Python ssl): VmRSS delta/count"
    row("RSS per idle TLS conn", target.name, f"{per:.1f} KiB", "", how)
    wait_for(lambda: open_fds(pid) <= fds + 10 or None, 60, "connections closed")
    time.sleep(1)
    mib = f"{status(pid, 'VmRSS') / 1024:.1f} MiB"
    row("RSS after closing them", target.name, mib, "", "VmRSS")


def bench_target(target: Target, quick: bool, upload: Path) -> None:
    """Throughput, then (over TLS) handshakes, then requests, for one URL."""
    size, url = (256 if quick else 1024) * MIB, target.url
    curl = ["curl", "-kfsS", "-o", "/dev/null", "-w"]
    s_time_ = ["openssl", "s_time", "-connect", url[8:-1], "-time", "10"]
    runs: list[tuple[str, list[str], Parse]] = [
        ("download", [*curl, "%{speed_download}", f"{url}bytes/{size}"], curl_speed),
        ("upload", [*curl, "%{speed_upload}", "-H", "Expect:", "--data-binary",
                    f"@{upload}", url], curl_speed),
        ("handshakes 1.3 full", [*s_time_, "-new"], s_time),
        ("handshakes 1.2 resumed", [*s_time_, "-reuse", "-tls1_2"], s_time),
        ("1.3 resumed + GET /", [*s_time_, "-reuse", "-www", "/"], s_time),
        ("requests (wrk)", ["wrk", "-t2", "-c50", "-d10s", "--latency", url], wrk),
    ]  # fmt: skip
    for figure, cmd, parse in runs:
        if url.startswith("https:") or "s_time" not in cmd:
            measure(target, figure, cmd, parse)


def bench_proxy(
    name: str,
    start: Callable[[Path, str], Launch],
    connect: str,
    quick: bool,
    tmp: Path,
) -> None:
    """Start proxy C{name} on CPU 0; measure it; stop it."""
    cmd, port_of = start(tmp, connect)
    with contextlib.ExitStack() as stack:
        out = tmp / f"{name}.out"
        process = spawn(stack, ["taskset", "-c", "0", *cmd], out)

        def ready() -> int | None:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {out.read_text()}")
            return port_of() or None

        port = wait_for(ready, 30, f"{name} listening")
        target = Target(name, f"https://{HOST}:{port}/", process.pid)
        time.sleep(1)
        mib = f"{status(process.pid, 'VmRSS') / 1024:.1f} MiB"
        row("RSS idle", name, mib, "", f"VmRSS in /proc/{process.pid}/status")
        idle_connections(target, port)
        bench_target(target, quick, tmp / "upload.bin")
        for field, figure in (("VmRSS", "RSS after load"), ("VmHWM", "RSS peak")):
            mib = f"{status(process.pid, field) / 1024:.1f} MiB"
            row(figure, name, mib, "", field)
        logs = list(tmp.glob(f"{name}.log*"))  # twistd rotates its log at 1 MB
        lines = sum(len(f.read_bytes().splitlines()) for f in logs)
        row("log lines written", name, str(lines), "", f"wc -l {name}.log*")


CPUS = """\
CPUs: each proxy is pinned to CPU 0 (taskset); the backend, curl, openssl s_time,
  wrk and this script share CPU 1.  tlsproxy is one Python thread; stunnel is
  threaded but gets the same one core.  "cpu" is the proxy's CPU use (the
  backend's on backend rows): well under 100% means CPU 1, the clients, was the
  bottleneck, not the proxy.
"""


def header() -> None:
    def first(pattern: str, *cmd: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return grab(pattern, done.stdout + done.stderr)

    limit = os.sysconf("SC_OPEN_MAX")
    print(f"nproc {os.cpu_count()}, {platform.platform()}, fd limit {limit}")
    openssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    print(f"Python {platform.python_version()}, Twisted {twisted_version}, ", end="")
    print(f"tlsproxy's OpenSSL (via pyOpenSSL/cryptography): {openssl}")
    stunnel = first(r"(stunnel \S+)", STUNNEL, "-version") if STUNNEL else "-"
    print(
        "openssl CLI:",
        first("(.+)", "openssl", "version"),
        first(r"(curl \S+)", "curl", "-V"),
    )
    print(first(r"(wrk \S+)", "wrk", "-v"), stunnel)
    print(CPUS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="256 MiB download")
    parser.add_argument("--stunnel", action="store_true", help="stunnel4 too")
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        return asyncio.run(_backend())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up on TERM too
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the proxies inherit
    if sorted(os.sched_getaffinity(0))[:2] != [0, 1]:
        sys.exit("needs CPUs 0 and 1: the proxy gets one, the clients the other")
    os.sched_setaffinity(0, {1})  # the backend and the load generators inherit it
    header()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        req = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
        req += f" -subj /CN=localhost -keyout {tmp}/key.pem -out {tmp}/cert.pem"
        subprocess.run(shlex.split(req), check=True, capture_output=True, timeout=30)
        with (tmp / "upload.bin").open("wb") as f:
            f.truncate(256 * MIB)
        cmd = [sys.executable, __file__, "--backend"]
        backend = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        stack.callback(stop, backend)
        port = int(backend.stdout.readline())  # type: ignore[union-attr]
        print(f"backend: {shlex.join(cmd)}, port {port}\n")
        row("figure", "target", "value", "cpu", "command")
        plain = Target("backend", f"http://{HOST}:{port}/", backend.pid)
        bench_target(plain, args.quick, tmp / "upload.bin")
        connect = f"{HOST}:{port}"
        bench_proxy("tlsproxy", start_tlsproxy, connect, args.quick, tmp)
        if args.stunnel and STUNNEL:
            bench_proxy("stunnel", start_stunnel, connect, args.quick, tmp)
        elif args.stunnel:
            print("stunnel: not installed, skipped")
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
