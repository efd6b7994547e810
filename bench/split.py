"""
Where tlsproxy's CPU per connection goes over the floor's: the CPU
microseconds per connection of the floor (bench/forwarder.py), of the floor
with tlsproxy's TLS context, with its TLS protocol too (flow.py), and of
tlsproxy itself, with its defaults and with --quiet; runs interleaved, each
under four openssl s_time, the backend a sink of this script's that answers
each connection's request with 1 KiB and closes.

    python bench/split.py [ROUNDS [S_TIME OPTION...]]

Defaults: 3 rounds of 8 seconds, resumed TLS 1.3 handshakes with a request
(-reuse -tls1_3 -www /1k); "3 -new" measures full handshakes whose client
leaves at once.  Run it on a quiet machine, from the top of the tree.
"""

from __future__ import annotations

import os
import re
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
SECONDS = 8


class Reply(socketserver.BaseRequestHandler):
    """One request (read until its blank line), 1 KiB back, close."""

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            data += chunk
        body = b"x" * 1024
        head = b"HTTP/1.0 200 OK\r\nContent-Length: 1024\r\n\r\n"
        self.request.sendall(head + body)


def hybrid(port: str, backend: str, cert: str, key: str, parts: str) -> None:
    """The floor's relay under tlsproxy's context (and its TLS protocol)."""
    sys.path.insert(0, HERE)
    import forwarder
    from twisted.internet import protocol, reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tlsproxy.context import from_files
    from tlsproxy.listen import accepting

    clients = protocol.Factory.forProtocol(forwarder.Client)
    clients.backend_port = int(backend)  # type: ignore[attr-defined]
    context = from_files([cert], [key])
    if parts == "protocol":
        tls = accepting(clients, context, reactor)
    else:
        tls = TLSMemoryBIOFactory(context, False, clients)
    reactor.listenTCP(int(port), tls, backlog=1024, interface="127.0.0.1")
    reactor.run()


def commands(port: int, backend: int, cert: str, key: str) -> dict[str, list[str]]:
    ends = [str(port), str(backend), cert, key]
    tlsproxy = [os.path.join(os.path.dirname(PYTHON), "twistd"), "-n",
                "--logfile", os.path.join(os.path.dirname(cert), "twistd.log"),
                "--pidfile=", "tlsproxy", "--listen",
                f"tcp:{port}:interface=127.0.0.1", "--connect",
                f"tcp:127.0.0.1:{backend}", "--cert", cert, "--key", key]  # fmt: skip
    return {
        "floor": [PYTHON, os.path.join(HERE, "forwarder.py"), *ends],
        "+context": [PYTHON, __file__, "--hybrid", *ends, "context"],
        "+protocol": [PYTHON, __file__, "--hybrid", *ends, "protocol"],
        "tlsproxy": tlsproxy,
        "--quiet": [*tlsproxy, "--quiet"],
    }


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(command: list[str], port: int, how: list[str]) -> float:
    """CPU microseconds per connection of C{command} under four s_time."""
    proxy = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.5)
        before = cpu_seconds(proxy.pid)
        s_time = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}",
                  "-time", str(SECONDS), *how]  # fmt: skip
        clients = [subprocess.Popen(s_time, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
                   for _ in range(4)]  # fmt: skip
        outs = [client.communicate()[0] for client in clients]
        spent = cpu_seconds(proxy.pid) - before
    finally:
        proxy.terminate()
        proxy.wait()
    counts = [re.search(r"(\d+) connections in \d+ real", out) for out in outs]
    return 1e6 * spent / sum(int(m[1]) for m in counts if m)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    how = sys.argv[2:] or ["-reuse", "-tls1_3", "-www", "/1k"]
    sink = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Reply)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
                       check=True, capture_output=True)  # fmt: skip
        os.chmod(key, 0o600)
        results: dict[str, list[float]] = {}
        port = 19700
        names = list(commands(port, 0, cert, key))
        for _ in range(rounds):
            for name in names:
                port += 1  # (a fresh port: the last may linger in TIME_WAIT)
                command = commands(port, sink.server_address[1], cert, key)[name]
                results.setdefault(name, []).append(run(command, port, how))
    print(f"CPU us per connection, s_time {' '.join(how)}, medians of {rounds}:")
    for name, values in results.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:10} {statistics.median(values):7,.0f}   ({runs})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hybrid"]:
        hybrid(*sys.argv[2:7])
    else:
        main()
