#!/bin/sh
# tlsproxy under several Python environments (CPython, PyPy), same load:
#
#   sh bench/interpreters.sh .venv/bin /path/to/pypy-venv/bin
#
# Each BIN directory holds a twistd with tlsproxy installed.  The proxy runs
# on CPU 0, the nginx backend and the load (openssl s_time, wrk) on CPU 1.
# Every load runs twice (BENCH_SECONDS each, default 10), to warm up (PyPy's JIT)
# and then measured; rates are per second of the proxy's CPU (from /proc).  Loopback only; needs
# openssl, nginx, wrk and taskset (apt-get install nginx wrk util-linux).
set -eu
seconds=${BENCH_SECONDS:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
backend=""
trap '[ -z "$backend" ] || kill "$backend" 2>/dev/null; rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj /CN=localhost -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null
mkdir "$tmp/www"
head -c 1024 /dev/zero | tr '\0' x >"$tmp/www/1k"
cat >"$tmp/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $tmp/nginx.pid; error_log $tmp/nginx.err;
events {}
http { access_log off; keepalive_requests 10000000;
       server { listen 127.0.0.1:18080 backlog=4096; root $tmp/www; } }
EOF
taskset -c 1 nginx -c "$tmp/nginx.conf" -p "$tmp" &
backend=$!

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime

handshakes() {  # handshakes OPTIONS...: connections made by 4 s_time at once
    clients=""
    for i in 1 2 3 4; do
        taskset -c 1 openssl s_time -connect 127.0.0.1:18443 -time "$seconds" \
            "$@" >"$tmp/s_time.$i" 2>&1 &
        clients="$clients $!"
    done
    wait $clients
    cat "$tmp"/s_time.* | sed -n 's/^\([0-9]*\) connections in .* real.*/\1/p' |
        awk '{n += $1} END {print n}'
}

requests() {  # keep-alive requests made by wrk
    taskset -c 1 wrk -t1 -c50 -d"${seconds}s" https://127.0.0.1:18443/1k |
        awk '/^Requests\/sec/ {printf "%d", $2 * '"$seconds"'}'
}

measure() {  # measure PID NAME COMMAND...: COMMAND twice, the second timed
    pid=$1 name=$2
    shift 2
    "$@" >/dev/null
    before=$(ticks "$pid")
    count=$("$@")
    after=$(ticks "$pid")
    echo "$name $count $((after - before))" |
        awk '{gsub("_", " ", $1); printf "  %-28s %8.0f per CPU-second\n", $1, $2 * 100 / $3}'
}

for bin in "$@"; do
    echo "$("$bin/python" -c 'import sys; print(sys.version.split()[0], sys.implementation.name)')," \
        "$("$bin/python" -c 'from OpenSSL import SSL; print(SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode())')"
    PYTHONPATH=$repo taskset -c 0 "$bin/twistd" -n --pidfile= \
        --logfile="$tmp/tlsproxy.log" tlsproxy \
        --listen=tcp:18443:interface=127.0.0.1:backlog=1024 \
        --connect=tcp:127.0.0.1:18080 --cert="$tmp/cert.pem" --key="$tmp/key.pem" &
    proxy=$!
    sleep 4
    echo "  RSS at rest                  $(($(ps -o rss= -p "$proxy") / 1024)) MiB"
    measure "$proxy" "full_TLS_1.3_handshakes" handshakes -new
    measure "$proxy" "resumed_TLS_1.2_handshakes" handshakes -reuse -tls1_2
    measure "$proxy" "keep-alive_1_KiB_requests" requests
    kill "$proxy"
    wait "$proxy" || true
done
