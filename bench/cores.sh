#!/bin/sh
# bench/cores.sh N [RUNS]: scaling with N tlsproxy processes sharing one port
# (--reuse-port), loopback only.  Prints, per run, keep-alive requests/s
# (wrk -t2 -c50, 10 s) and full TLS 1.3 handshakes/s (2 openssl s_time -new
# in parallel, 10 s; connections each counted once), then the resumption
# check: one session saved, resumed by 20 new connections.
# Run from the project directory with its .venv: sh bench/cores.sh 2 5
set -eu
n=${1:-1} runs=${2:-3}
py=.venv/bin/python twistd=.venv/bin/twistd port=18443
dir=$(mktemp -d)
pids=""
trap 'kill $pids 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT INT TERM

$py bench/bench.py --backend >"$dir/backend.port" &
pids="$pids $!"
while [ ! -s "$dir/backend.port" ]; do sleep 0.1; done
backend=$(cat "$dir/backend.port")
for i in $(seq "$n"); do
    $twistd -n --pidfile "$dir/$i.pid" --logfile "$dir/$i.log" tlsproxy \
        --reuse-port --listen "tcp:$port:interface=127.0.0.1" \
        --connect "tcp:127.0.0.1:$backend" --self-signed localhost &
    pids="$pids $!"
done
for i in $(seq "$n"); do
    until grep -q "starting on" "$dir/$i.log" 2>/dev/null; do sleep 0.1; done
done

for r in $(seq "$runs"); do
    rps=$(wrk -t2 -c50 -d10s "https://127.0.0.1:$port/" | sed -n 's/^Requests\/sec: *//p')
    st=""
    for j in 1 2; do
        openssl s_time -connect "127.0.0.1:$port" -new -time 10 \
            >"$dir/s_time.$j" 2>&1 &
        st="$st $!"
    done
    wait $st
    hs=$(cat "$dir"/s_time.* | sed -n 's/^\([0-9]*\) connections in \([0-9]*\) real.*/\1 \2/p' \
        | awk '{ c += $1; t = $2 } END { printf "%.0f", c / t }')
    echo "processes $n run $r: requests/s $rps, full handshakes/s $hs"
done

# A session resumes only in the process that made it (its own cache and
# ticket keys); an HTTP/1.0 request, so the ticket arrives before the end.
client() {
    printf 'GET / HTTP/1.0\r\n\r\n' | openssl s_client -ign_eof \
        -connect "127.0.0.1:$port" -servername localhost "$@" 2>/dev/null
}
for version in -tls1_2 -tls1_3; do
    client "$version" -sess_out "$dir/session.pem" >/dev/null
    reused=0
    for k in $(seq 20); do
        if client "$version" -sess_in "$dir/session.pem" | grep -q '^Reused'; then
            reused=$((reused + 1))
        fi
    done
    echo "processes $n $version: one saved session resumed by $reused of 20 new connections"
done
for i in $(seq "$n"); do
    echo "process $i logged $(cat "$dir/$i.log"* | grep -c 'closed:') connection(s)"
done
