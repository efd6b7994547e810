"""
Compare tlsproxy with the C TLS terminators (stunnel, hitch, HAProxy, nginx's
stream module) and with the floor of its stack ("twisted": bench/forwarder.py)
on this machine: one command, one table, one chart.

    python bench/compare.py [--runs 3] [--quick] [--all-cores]
        [--peers twisted,stunnel,hitch,haproxy,nginx] [--chart bench/results.png]

Installs nothing: a missing peer is skipped with the apt-get line that brings
it.  Loopback only; every process it starts is in its own process group and is
stopped on the way out.  Per-core run (the default): each proxy on CPU 0 with
one worker, the backend and the load generators on CPU 1.  --all-cores: nothing
pinned, each proxy's default workers, and one tlsproxy process per CPU sharing
the port (--reuse-port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HOST = "127.0.0.1"
MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
HANDSHAKE_CLIENTS = 4  # openssl s_time processes at once
NGINX_MODULES = Path("/usr/lib/nginx/modules")
TOOLS = "openssl curl wrk nginx util-linux"  # util-linux: taskset


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one invocation measures, and for how long."""

    runs: int
    seconds: int  # each handshake and keep-alive measurement
    bulk: int  # bytes each way
    idle: tuple[int, ...]  # idle connection counts, after 0
    speed_seconds: int
    per_core: bool


@dataclasses.dataclass(frozen=True)
class Setup:
    """Where a proxy listens, what it relays to, and with which files."""

    tmp: Path
    port: int
    backend: int
    cert: Path  # the certificate alone
    key: Path
    pem: Path  # the key and the certificate in one file (hitch, HAProxy)
    per_core: bool


Configure = Callable[[Setup], list[str]]  # writes its files, gives the command


def free_port() -> int:
    """A free loopback port (nobody else binds on loopback meanwhile)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# The proxies: each writes its configuration and gives its command.


def tlsproxy(s: Setup) -> list[str]:
    """
    tlsproxy with its defaults (one close line per connection in its log);
    for all cores, one process per CPU sharing the port (C{--reuse-port}).
    """
    twistd = Path(sys.executable).parent / "twistd"

    def one(log: str) -> list[str]:
        return [
            str(twistd), "-n", "--pidfile=", f"--logfile={s.tmp}/{log}",
            "tlsproxy", f"--listen=tcp:{s.port}:interface={HOST}:backlog=1024",
            f"--connect=tcp:{HOST}:{s.backend}", f"--cert={s.cert}", f"--key={s.key}",
        ]  # fmt: skip

    if s.per_core:
        return one("tlsproxy.log")
    each = [[*one(f"tlsproxy-{n}.log"), "--reuse-port"] for n in range(cpus())]
    return ["sh", "-c", " & ".join(map(shlex.join, each)) + " & wait"]


def cpus() -> int:
    return os.cpu_count() or 1


def twisted(s: Setup) -> list[str]:
    """
    The floor: bench/forwarder.py, the least a TLS terminator on Twisted and
    pyOpenSSL does.  One process: per core runs only.
    """
    forwarder = Path(__file__).resolve().parent / "forwarder.py"
    return [sys.executable, str(forwarder), str(s.port), str(s.backend),
            str(s.cert), str(s.key)]  # fmt: skip


def stunnel(s: Setup) -> list[str]:
    """stunnel, threads (its default), notice-level log to a file."""
    conf = s.tmp / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\nsyslog = no\noutput = {s.tmp}/stunnel.log\n"
        f"debug = notice\n[bench]\naccept = {HOST}:{s.port}\n"
        f"connect = {HOST}:{s.backend}\ncert = {s.cert}\nkey = {s.key}\n"
        "sslVersionMin = TLSv1.2\nsslVersionMax = TLSv1.3\n"
    )
    return [_binary("stunnel"), str(conf)]


def hitch(s: Setup) -> list[str]:
    """hitch, one worker per core run (else one per CPU), no log per connection."""
    conf = s.tmp / "hitch.conf"
    workers = 1 if s.per_core else cpus()
    root = os.geteuid() == 0  # hitch's workers refuse to run as root
    as_nobody = 'user = "nobody"\ngroup = "nogroup"\n' if root else ""
    conf.write_text(
        f'frontend = "[{HOST}]:{s.port}"\nbackend = "[{HOST}]:{s.backend}"\n'
        f'pem-file = "{s.pem}"\nworkers = {workers}\nbacklog = 1024\n'
        "daemon = off\ntls-protos = TLSv1.2 TLSv1.3\nsyslog = off\n"
        f"{as_nobody}"
        f'ocsp-dir = "{s.tmp}"\n'
    )
    return [_binary("hitch"), f"--config={conf}"]


def haproxy(s: Setup) -> list[str]:
    """HAProxy in TCP mode, one thread per core run (else its default), no log."""
    conf = s.tmp / "haproxy.cfg"
    threads = "  nbthread 1\n" if s.per_core else ""
    conf.write_text(
        f"global\n{threads}  maxconn {(fd_limit() - 200) // 2}\n"
        "defaults\n  mode tcp\n  timeout connect 10s\n"
        "  timeout client 1h\n  timeout server 1h\n"
        f"frontend tls\n  bind {HOST}:{s.port} ssl crt {s.pem} ssl-min-ver TLSv1.2"
        " backlog 1024\n  default_backend plain\n"
        f"backend plain\n  server b {HOST}:{s.backend}\n"
    )
    return [_binary("haproxy"), "-db", "-f", str(conf)]


def nginx(s: Setup) -> list[str]:
    """nginx's stream module, one worker per core run (else auto), no access log."""
    workers = 1 if s.per_core else "auto"
    conf = s.tmp / "nginx-proxy.conf"
    conf.write_text(
        f"load_module {NGINX_MODULES}/ngx_stream_module.so;\n"
        f"{_nginx_main(s.tmp, 'nginx-proxy', workers)}"
        "stream {\n  server {\n"
        f"    listen {HOST}:{s.port} ssl backlog=1024;\n"
        f"    ssl_certificate {s.cert};\n    ssl_certificate_key {s.key};\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;\n    proxy_timeout 1h;\n"
        f"    proxy_pass {HOST}:{s.backend};\n  }}\n}}\n"
    )
    return _nginx_command(s.tmp, conf)


def _nginx_main(tmp: Path, name: str, workers: int | str) -> str:
    return (
        f"worker_processes {workers};\nuser root;\npid {tmp}/{name}.pid;\n"
        f"error_log {tmp}/{name}.err error;\nworker_rlimit_nofile {fd_limit()};\n"
        f"events {{ worker_connections {fd_limit()}; }}\n"
    )


def _nginx_command(tmp: Path, conf: Path) -> list[str]:
    return [_binary("nginx"), "-p", str(tmp), "-e", f"{tmp}/nginx.err", "-c",
            str(conf), "-g", "daemon off;"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Proxy:
    name: str
    configure: Configure
    binaries: tuple[str, ...]  # any of these names will do
    packages: str  # what apt-get installs
    needs: tuple[Path, ...] = ()
    per_core_only: bool = False


PROXIES = {
    p.name: p
    for p in (
        Proxy("tlsproxy", tlsproxy, (), ""),
        Proxy("twisted", twisted, (), "", per_core_only=True),
        Proxy("stunnel", stunnel, ("stunnel4", "stunnel"), "stunnel4"),
        Proxy("hitch", hitch, ("hitch",), "hitch"),
        Proxy("haproxy", haproxy, ("haproxy",), "haproxy"),
        Proxy("nginx", nginx, ("nginx",), "nginx libnginx-mod-stream",
              (NGINX_MODULES / "ngx_stream_module.so",)),
    )
}  # fmt: skip


def _binary(name: str) -> str:
    for candidate in PROXIES[name].binaries:
        if found := shutil.which(candidate):
            return found
    raise AssertionError(f"{name} was checked to exist")


def missing(proxy: Proxy) -> bool:
    """Whether C{proxy} cannot run here; says what apt-get would bring."""
    absent = proxy.binaries and not any(map(shutil.which, proxy.binaries))
    if absent or not all(p.exists() for p in proxy.needs):
        print(f"{proxy.name}: not installed, skipped: "
              f"apt-get install -y {proxy.packages}")  # fmt: skip
        return True
    return False


# Processes: each in its own group, stopped whole.


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Terminate C{process}'s group; kill it if it has not ended within 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group too
    process.wait()


def start(
    stack: contextlib.ExitStack, cmd: list[str], out: Path, cpu: int | None
) -> subprocess.Popen[bytes]:
    """Start C{cmd} (on CPU C{cpu}) in a new process group that C{stack} stops."""
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's tlsproxy
    with out.open("wb") as f:
        process = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    stack.callback(stop_group, process)
    return process


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {seconds} s")
        time.sleep(0.05)


def family(pid: int) -> list[int]:
    """C{pid} and its descendants (workers, children), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += parents.get(found[-1], [])
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of C{pid}'s family (all their threads)."""
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1]
            total += int(fields.split()[11]) + int(fields.split()[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of C{pid}'s family, summed (shared pages count once per process)."""
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError, TypeError):
            text = Path(f"/proc/{member}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", text)[1])  # type: ignore[index]
    return total


def grab(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if not found:
        raise ValueError(f"no {pattern!r} in {text[-200:]!r}")
    return found[1]


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def serves_tls(port: int) -> bool:
    """Whether a TLS handshake on C{port} completes."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            client_context().wrap_socket(sock).close()
        return True
    except OSError:
        return False


# The backends, on the clients' CPU: nginx serves files, a Python thread sink
# swallows uploads.


def start_backend(stack: contextlib.ExitStack, tmp: Path, cpu: int | None) -> int:
    """nginx serving C{tmp}/www (/1k: 1 KiB; /bulk: the bulk size), keep-alive."""
    port = free_port()
    conf = tmp / "nginx-backend.conf"
    conf.write_text(
        f"{_nginx_main(tmp, 'nginx-backend', 1)}http {{\n  access_log off;\n"
        "  sendfile on;\n  keepalive_requests 10000000;\n"
        "  keepalive_timeout 3600s;\n  client_header_timeout 3600s;\n"
        f"  server {{\n    listen {HOST}:{port} backlog=4096;\n"
        f"    root {tmp}/www;\n  }}\n}}\n"
    )
    process = start(stack, _nginx_command(tmp, conf), tmp / "backend.out", cpu)
    wait_for(lambda: _accepts(port) or process.poll() is not None, 10, "backend")
    if process.poll() is not None:
        raise RuntimeError(f"nginx backend: {(tmp / 'backend.out').read_text()}")
    return port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def sink(port_out: list[int]) -> None:
    """A thread per connection: read HTTP requests, discard bodies, answer 200."""
    server = socket.create_server((HOST, 0), backlog=128)
    port_out.append(server.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        buffer = bytearray(MIB)
        with conn, contextlib.suppress(OSError):
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    if not (chunk := conn.recv(65536)):
                        return
                    pending += chunk
                head, pending = pending.split(b"\r\n\r\n", 1)
                found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                left = int(found[1]) if found else 0
                taken = min(left, len(pending))
                left, pending = left - taken, pending[taken:]
                while left > 0:
                    got = conn.recv_into(buffer, min(left, MIB))
                    if not got:
                        return
                    left -= got
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# The measurements: each runs the load and reads the proxy's CPU time.


@dataclasses.dataclass
class Load:
    """The proxy's CPU seconds and the wall seconds spent under C{measure}."""

    pid: int
    cpu: float = 0.0
    wall: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        cpu, started = cpu_seconds(self.pid), time.monotonic()
        yield
        self.wall = time.monotonic() - started
        self.cpu = max(cpu_seconds(self.pid) - cpu, 1e-9)

    @property
    def busy(self) -> float:
        return 100 * self.cpu / self.wall


def handshakes(
    pid: int, port: int, plan: Plan, tmp: Path, *how: str
) -> dict[str, float]:
    """Several C{openssl s_time} at once: handshakes per wall and CPU second."""
    cmd = ["openssl", "s_time", "-connect", f"{HOST}:{port}", "-time",
           str(plan.seconds), *how]  # fmt: skip
    outs = [tmp / f"s_time.{i}" for i in range(HANDSHAKE_CLIENTS)]
    load = Load(pid)
    with load.measure(), contextlib.ExitStack() as stack:
        clients = [start(stack, cmd, out, None) for out in outs]
        for client in clients:
            client.wait(plan.seconds + 60)
    texts = [out.read_text() for out in outs]
    count = sum(int(grab(r"(\d+) connections in \d+ real", t)) for t in texts)
    marks = "".join(re.findall(r"^[*r]+$", "".join(texts), re.MULTILINE))
    return {
        "rate": count / load.wall, "per_cpu": count / load.cpu,
        "cpu_us": 1e6 * load.cpu / count, "busy": load.busy,
        "resumed": 100 * marks.count("r") / max(len(marks), 1),
    }  # fmt: skip


def _ms(value: str) -> float:
    number, unit = grab(r"([\d.]+)", value), grab(r"[\d.]+(\w+)", value)
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def keep_alive(pid: int, port: int, plan: Plan) -> dict[str, float]:
    """wrk, one thread, 50 connections: 1 KiB responses, p50 and p99."""
    cmd = ["wrk", "-t1", "-c50", f"-d{plan.seconds}s", "--latency",
           f"https://{HOST}:{port}/1k"]  # fmt: skip
    load = Load(pid)
    with load.measure():
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    if os.environ.get("COMPARE_DEBUG") or re.search(r"Non-2xx|Socket errors", out):
        print(f"    wrk reported errors: {out!r}")
    count = int(grab(r"(\d+) requests in", out))
    return {
        "rate": float(grab(r"Requests/sec:\s+([\d.]+)", out)),
        "per_cpu": count / load.cpu, "busy": load.busy,
        "p50": _ms(grab(r"\s50%\s+(\S+)", out)),
        "p99": _ms(grab(r"\s99%\s+(\S+)", out)),
    }  # fmt: skip


def bulk(pid: int, port: int, plan: Plan, upload: Path | None) -> dict[str, float]:
    """One curl transfer of the bulk size, down (GET /bulk) or up (PUT)."""
    curl = ["curl", "-kfsS", "-o", "/dev/null", "-H", "Expect:"]
    if upload:
        curl += ["-w", "%{size_upload}", "-T", str(upload), f"https://{HOST}:{port}/up"]
    else:
        curl += ["-w", "%{size_download}", f"https://{HOST}:{port}/bulk"]
    load = Load(pid)
    with load.measure():
        run = subprocess.run(curl, capture_output=True, text=True, timeout=600)
    if run.returncode or int(float(run.stdout)) != plan.bulk:
        raise RuntimeError(f"{shlex.join(curl)}: {run.stdout} {run.stderr}")
    return {
        "mbs": plan.bulk / 1e6 / load.wall, "per_cpu": plan.bulk / 1e6 / load.cpu,
        "cpu_ms_mib": 1e3 * load.cpu / (plan.bulk / MIB), "busy": load.busy,
    }  # fmt: skip


def established(port: int) -> int:
    """Established TCP sockets whose local port is C{port} (IPv4)."""
    tail = f":{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        count += local.endswith(tail) and state == "01"
    return count


def idle(pid: int, port: int, backend: int, plan: Plan) -> dict[str, float]:
    """RSS with 0, then N idle established TLS connections: KB per connection."""
    return asyncio.run(_idle(pid, port, backend, plan))


async def _idle(pid: int, port: int, backend: int, plan: Plan) -> dict[str, float]:
    context, gate = client_context(), asyncio.Semaphore(100)
    writers: list[asyncio.StreamWriter] = []

    async def connect() -> None:
        async with gate:
            _, writer = await asyncio.open_connection(HOST, port, ssl=context)
            writers.append(writer)

    async def settle(count: int, base: int) -> None:
        deadline = time.monotonic() + 120
        while established(backend) < base + count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} backend connections not seen")
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)

    await asyncio.gather(*(connect() for _ in range(10)))  # warm up
    for writer in writers:
        writer.transport.abort()
    writers.clear()
    await asyncio.sleep(2)
    base = established(backend)
    figures = {"rss0_mib": (rss0 := rss_kib(pid)) / 1024}
    try:
        for count in plan.idle:
            await asyncio.gather(*(connect() for _ in range(count - len(writers))))
            await settle(count, base)
            figures[f"kb_{count}"] = (rss_kib(pid) - rss0) * 1.024 / count
    finally:
        for writer in writers:
            writer.transport.abort()
    return figures


# One proxy, one run.


@contextlib.contextmanager
def serving(proxy: Proxy, setup: Setup) -> Iterator[int]:
    """Run C{proxy} for C{setup}; give its pid once it serves TLS."""
    with contextlib.ExitStack() as stack:
        out = setup.tmp / f"{proxy.name}.out"
        cpu = 0 if setup.per_core else None
        process = start(stack, proxy.configure(setup), out, cpu)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{proxy.name} exited: {out.read_text()[-2000:]}")
            return serves_tls(setup.port)

        wait_for(ready, 30, f"{proxy.name} serving")
        yield process.pid


def bench_proxy(
    proxy: Proxy, plan: Plan, files: Path, ports: dict[str, int]
) -> dict[str, float]:
    """Every measurement of C{proxy}, each on a fresh process of it."""
    figures: dict[str, float] = {}

    def setup(cert: str, backend: str) -> Setup:
        tmp = Path(tempfile.mkdtemp(prefix=f"{proxy.name}-", dir=files))
        return Setup(
            tmp=tmp, port=free_port(), backend=ports[backend],
            cert=files / f"{cert}.crt", key=files / f"{cert}.key",
            pem=files / f"{cert}.pem", per_core=plan.per_core,
        )  # fmt: skip

    def note(prefix: str, values: dict[str, float]) -> None:
        figures.update({f"{prefix}_{k}": v for k, v in values.items()})
        shown = ", ".join(f"{k} {v:,.1f}" for k, v in values.items())
        clock = time.strftime("%H:%M:%S")
        print(f"  {clock} {proxy.name:<9} {prefix:<10} {shown}", flush=True)

    with serving(proxy, s := setup("ecdsa", "files")) as pid:
        note("idle", idle(pid, s.port, s.backend, plan))
    with serving(proxy, s := setup("ecdsa", "files")) as pid:
        note("full_ec", handshakes(pid, s.port, plan, s.tmp, "-new"))
        # TLS 1.3 tickets come after the handshake: s_time reads them with a reply.
        how = ("-reuse", "-tls1_3", "-www", "/1k")
        note("resumed", handshakes(pid, s.port, plan, s.tmp, *how))
        note("keepalive", keep_alive(pid, s.port, plan))
        note("down", bulk(pid, s.port, plan, None))
    with serving(proxy, s := setup("rsa", "files")) as pid:
        note("full_rsa", handshakes(pid, s.port, plan, s.tmp, "-new"))
    with serving(proxy, s := setup("ecdsa", "sink")) as pid:
        note("up", bulk(pid, s.port, plan, files / "www" / "bulk"))
    return figures


# The physical limit: openssl speed, on the proxy's CPU.


def ceilings(plan: Plan) -> dict[str, float]:
    """Per core: AEAD MB/s at 16 KiB; full-handshake ceilings from sign + ECDH."""

    def speed(*what: str) -> list[str]:
        cmd = ["taskset", "-c", "0", "openssl", "speed", "-mr",
               "-seconds", str(plan.speed_seconds), *what]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        return grab(r"(?m)^(\+F\d*:.*)$", out.replace("\r", "\n")).split(":")

    sizes = ["-bytes", "16384", "-evp"]
    ecdsa, rsa = float(speed("ecdsap256")[3]), float(speed("rsa2048")[3])
    x25519 = float(speed("ecdhx25519")[3])
    exchange = 2 / x25519  # key generation counted as one more X25519 operation
    return {
        "aes_256_gcm_mbs": float(speed(*sizes, "aes-256-gcm")[3]) / 1e6,
        "chacha20_poly1305_mbs": float(speed(*sizes, "chacha20-poly1305")[3]) / 1e6,
        "ecdsa_sign_per_s": ecdsa, "rsa_sign_per_s": rsa, "x25519_per_s": x25519,
        "full_ec": 1 / (1 / ecdsa + exchange), "full_rsa": 1 / (1 / rsa + exchange),
    }  # fmt: skip


# The table and the chart.


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    title: str
    digits: int = 0
    lower_is_better: bool = False


HEADLINE = (
    Column("full_ec_per_cpu", "full HS ECDSA /cpu-s"),
    Column("full_rsa_per_cpu", "full HS RSA /cpu-s"),
    Column("resumed_per_cpu", "resumed HS+1k /cpu-s"),
    Column("keepalive_per_cpu", "1 KiB req /cpu-s"),
    Column("keepalive_p99", "p99 ms", 2, True),
    Column("down_per_cpu", "download MB/cpu-s"),
    Column("up_per_cpu", "upload MB/cpu-s"),
    Column("idle_kb_last", "KB/idle conn", 1, True),
)
DETAIL = (
    Column("full_ec_rate", "full ECDSA /s"),
    Column("full_ec_cpu_us", "cpu us/HS", 0, True),
    Column("full_ec_busy", "cpu %"),
    Column("full_rsa_rate", "full RSA /s"),
    Column("full_rsa_cpu_us", "cpu us/HS", 0, True),
    Column("resumed_rate", "resumed /s"),
    Column("resumed_cpu_us", "cpu us/HS", 0, True),
    Column("resumed_resumed", "% resumed"),
    Column("keepalive_rate", "req/s"),
    Column("keepalive_busy", "cpu %"),
    Column("keepalive_p50", "p50 ms", 2, True),
    Column("down_mbs", "down MB/s"),
    Column("down_busy", "cpu %"),
    Column("up_mbs", "up MB/s"),
    Column("up_busy", "cpu %"),
    Column("idle_rss0_mib", "RSS 0 MiB", 1, True),
    Column("idle_kb_first", "KB/conn 1st N", 1, True),
)


def medians(runs: list[dict[str, float]], plan: Plan) -> dict[str, float]:
    keys = set().union(*runs)
    result = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    result["idle_kb_first"] = result[f"idle_kb_{plan.idle[0]}"]
    result["idle_kb_last"] = result[f"idle_kb_{plan.idle[-1]}"]
    return result


def table(
    results: dict[str, dict[str, float]], columns: tuple[Column, ...], ratios: bool
) -> str:
    """
    Markdown: a row per proxy, each figure and (with C{ratios}) its ratio to
    stunnel's and to the floor's (the "twisted" column: bench/forwarder.py).
    """
    bases = {b: results.get(b, {}) for b in ("stunnel", "twisted")} if ratios else {}
    head = ["proxy"]
    for c in columns:
        head += [c.title, *(f"x {b}" for b in bases)]
    lines = [head]
    for name, figures in results.items():
        cells = [name]
        for c in columns:
            value = figures.get(c.key)
            cells.append("-" if value is None else f"{value:,.{c.digits}f}")
            for base in bases.values():
                known = value is not None and base.get(c.key)
                cells.append(f"{value / base[c.key]:.2f}" if known else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def chart(results: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Grouped bars: each headline figure of each proxy as a ratio to stunnel's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"chart skipped: matplotlib is missing: {sys.executable} -m pip "
              "install matplotlib")  # fmt: skip
        return
    base = results.get("stunnel")
    if not base:
        print("chart skipped: it shows ratios to stunnel, which did not run")
        return
    names = list(results)
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ratios = [results[name].get(c.key, 0) / base[c.key] for c in HEADLINE]
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(HEADLINE))]
        ax.bar(xs, ratios, width, label=name)
    ax.axhline(1, color="black", linewidth=0.8)
    labels = [c.title + ("\n(lower is better)" if c.lower_is_better else "")
              for c in HEADLINE]  # fmt: skip
    ax.set_xticks(range(len(HEADLINE)), labels, fontsize=8)
    ax.set_ylabel("ratio to stunnel")
    wrapped = [textwrap.fill(line, 150) for line in title.splitlines()]
    ax.set_title("\n".join(wrapped), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


def ceiling_line(limits: dict[str, float]) -> str:
    v = {k: f"{n:,.0f}" for k, n in limits.items()}
    return (
        f"ceiling per core (openssl speed): AES-256-GCM {v['aes_256_gcm_mbs']} MB/s,"
        f" ChaCha20-Poly1305 {v['chacha20_poly1305_mbs']} MB/s at 16 KiB;"
        f" full TLS 1.3 handshakes {v['full_ec']}/s ECDSA P-256,"
        f" {v['full_rsa']}/s RSA-2048, = 1 / (sign + 2 X25519) (signatures"
        f" {v['ecdsa_sign_per_s']}/s and {v['rsa_sign_per_s']}/s,"
        f" X25519 {v['x25519_per_s']}/s)"
    )


# The machine, and the whole run.


def machine() -> str:
    def version(cmd: list[str], pattern: str) -> str:
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return grab(pattern, done.stdout + done.stderr)
        return "-"

    cpu = grab(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    python = [sys.executable, "-c", "import twisted; print(twisted.__version__)"]
    ours = [sys.executable, "-c", "from OpenSSL import SSL; print("
            "SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode())"]  # fmt: skip
    tools = [
        f"{platform.python_version()}, Twisted {version(python, '(.+)')}",
        f"{version(ours, '(.+)')} (tlsproxy's, in the cryptography wheel)",
        f"{version(['openssl', 'version'], '(OpenSSL [^ ]+)')} (the system's:"
        " the C proxies', the clients')",
        version([_which("stunnel"), "-version"], r"(stunnel \S+)"),
        "hitch " + version([_which("hitch"), "--version"], r"hitch (\S+)"),
        "HAProxy " + version([_which("haproxy"), "-v"], r"version (\S+)"),
        "nginx " + version([_which("nginx"), "-v"], r"nginx/(\S+)"),
        version(["wrk", "-v"], r"(wrk \S+)"),
        version(["curl", "-V"], r"(curl \S+)"),
    ]
    return (
        f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, Linux "
        f"{platform.release()}, Python {', '.join(tools)}"
    )


def _which(name: str) -> str:
    return next(filter(None, map(shutil.which, PROXIES[name].binaries)), name)


def prepare(files: Path, plan: Plan) -> None:
    """Certificates (ECDSA P-256, RSA-2048) and the files the backend serves."""
    for name, key in (
        ("ecdsa", "ec -pkeyopt ec_paramgen_curve:P-256"),
        ("rsa", "rsa:2048"),
    ):
        subprocess.run(
            shlex.split(f"openssl req -x509 -newkey {key} -nodes -subj /CN=localhost "
                        f"-keyout {files}/{name}.key -out {files}/{name}.crt"),
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        pem = (files / f"{name}.key").read_bytes() + (
            files / f"{name}.crt"
        ).read_bytes()
        (files / f"{name}.pem").write_bytes(pem)
    (files / "www").mkdir()
    (files / "www" / "1k").write_bytes(b"x" * 1024)
    with (files / "www" / "bulk").open("wb") as f:
        f.truncate(plan.bulk)  # sparse: reading it costs no disk
    # Read it once, into the page cache: the first download of a file not yet
    # there runs at a fifth of the speed, through a proxy or not.
    with (files / "www" / "bulk").open("rb") as f:
        while f.read(MIB):
            pass


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit(idle: int) -> int:
    """Raise our descriptor limit, which the proxies inherit; the idle count it allows.

    A proxy holds two descriptors per connection (client, backend) and stunnel
    serves at most 125/256 of its limit, so 10,000 connections need a limit of
    20,500 or more: with less, the largest count is the limit's 45%.
    """
    want = 2 * idle + 500
    with contextlib.suppress(ValueError, OSError):  # the hard limit too, if allowed
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard >= want:
        return idle
    print(f"descriptor limit {hard} (ulimit -Hn; raising it needs CAP_SYS_RESOURCE):"
          f" {hard * 45 // 100} idle connections instead of {idle}")  # fmt: skip
    return hard * 45 // 100


def parse() -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--runs", type=int, help="median of this many (3; --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s loads, 256 MiB, 1,000 idle connections")  # fmt: skip
    parser.add_argument("--peers", default="twisted,stunnel,hitch,haproxy,nginx")
    parser.add_argument("--chart", type=Path, help="write the PNG chart here")
    parser.add_argument("--all-cores", action="store_true",
                        help="no pinning; each proxy's default workers")  # fmt: skip
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    plan = Plan(
        runs=args.runs or (1 if quick else 3), seconds=3 if quick else 8,
        bulk=(256 if quick else 1024) * MIB,
        idle=(1000,) if quick else (1000, 10_000),
        speed_seconds=1 if quick else 3, per_core=not args.all_cores,
    )  # fmt: skip
    return args, plan


def main() -> None:
    args, plan = parse()
    if args.sink:
        port: list[int] = []
        threading.Thread(target=sink, args=(port,), daemon=True).start()
        wait_for(lambda: bool(port), 10, "sink")
        print(port[0], flush=True)
        threading.Event().wait()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up on TERM too
    most = raise_fd_limit(plan.idle[-1])
    plan = dataclasses.replace(plan, idle=(*plan.idle[:-1], most))
    names = ["tlsproxy", *(p for p in args.peers.split(",") if p)]
    unknown = [n for n in names if n not in PROXIES]
    if unknown:
        sys.exit(f"unknown peer(s): {', '.join(unknown)}; known: {', '.join(PROXIES)}")
    for tool in ("openssl", "curl", "wrk", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed: apt-get install -y {TOOLS}")
    proxies = [PROXIES[n] for n in names if not missing(PROXIES[n])]
    if plan.per_core:
        if sorted(os.sched_getaffinity(0))[:2] != [0, 1]:
            sys.exit("needs CPUs 0 and 1: the proxy gets one, the clients the other")
        os.sched_setaffinity(0, {1})  # the backends and the load generators inherit it
    else:
        proxies = [p for p in proxies if not p.per_core_only]
    about = machine()
    print(about, flush=True)
    started = time.monotonic()
    runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in proxies}
    with contextlib.ExitStack() as stack:
        files = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-"))
        )
        prepare(files, plan)
        limits = ceilings(plan)
        ports = {"files": start_backend(stack, files, 1 if plan.per_core else None)}
        sink_cmd = [sys.executable, __file__, "--sink"]
        start(stack, sink_cmd, files / "sink.out", 1 if plan.per_core else None)
        wait_for(lambda: (files / "sink.out").read_text().strip() != "", 10, "sink")
        ports["sink"] = int((files / "sink.out").read_text())
        for run in range(plan.runs):
            print(f"run {run + 1} of {plan.runs}", flush=True)
            for proxy in proxies:
                try:
                    runs[proxy.name].append(bench_proxy(proxy, plan, files, ports))
                except (
                    OSError,
                    RuntimeError,
                    ValueError,
                    subprocess.SubprocessError,
                ) as e:
                    print(f"  {proxy.name} FAILED in this run: {e}", flush=True)
    results = {name: medians(runs[name], plan) for name in runs if runs[name]}
    mode = "per core: proxy on CPU 0, clients and backend on CPU 1" if plan.per_core \
        else "all cores, unpinned, default workers, a tlsproxy per CPU"  # fmt: skip
    idle = ", ".join(map(str, plan.idle))
    print(f"\n{about}\n{mode}; medians of {plan.runs} run(s); "
          f"{plan.bulk // MIB} MiB each way; idle connections: {idle}\n")  # fmt: skip
    print("Rates per second of the proxy's CPU (/cpu-s), ratios to stunnel's:")
    print(table(results, HEADLINE, True), "\n")
    print("Details: rates per wall second; cpu % is the proxy's CPU use (under 100:")
    print("the load generators were the bottleneck); us/HS: its CPU per handshake:")
    print(table(results, DETAIL, False), "\n")
    print(ceiling_line(limits))
    if args.chart:
        chart(results, args.chart, f"{mode}\n{about}")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
