#!/usr/bin/env bash
# Proxy benchmark: lockstep against the nginx and HAProxy peers, side by side, in one run.
#
#   bench/proxy.sh            # every phase below
#   PHASES="h1 idle" bench/proxy.sh
#
# Phases: h1 (HTTP/1.1 keep-alive, 1 and 2 workers), tls (HTTP/1.1 over TLS), h2 (h2 over TLS
# by ALPN and h2c by prior knowledge, h2load), handshake (new TLS connections per second; wrk
# resumes its TLS session on each new connection, and what each server negotiates for a new
# and a resumed session is printed under the table: the protocols differ), idle (memory per
# idle keep-alive connection).
#
# Everything goes through the same two nginx backends (../shared/peers: `peer start backends`).
# Each server gets WORKERS worker threads/processes, pinned to the first WORKERS cores; the
# load generator and the backends run on the last core (a 2-core machine: server on core 0, wrk
# and the backends on core 1). In a farm the backends are other machines: left to float here, a
# backend woken by the proxy's request was placed on the proxy's core and preempted it (11 % of
# lockstep's time, 5 % of HAProxy's, measured with `perf record -e sched:sched_switch`), which
# measured the scheduler's choices more than the proxies. A backend instance left over from an
# earlier run is stopped first (two instances share the ports with SO_REUSEPORT, and the stray
# one is not pinned). Read the ratios, which come from interleaved
# rounds (A B C A B C ...) and medians; the absolute figures drift ~20 % over an hour here.
# Env: ROUNDS (3), DURATION (10s), CONNS (50), IDLE_CONNS (5000: the HAProxy peer config allows
# 8000 connections), IDLE_CONNS_LOCKSTEP (10000: lockstep alone), BIN (target/release/lockstep),
# PIN_WORKERS (set: lockstep started on the same cores with `--pin-workers`, one worker to a
# core; the peers' threads and processes float over those cores as before).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
rounds=${ROUNDS:-3}
duration=${DURATION:-10s}
conns=${CONNS:-50}
idle_conns=${IDLE_CONNS:-5000}
idle_alone=${IDLE_CONNS_LOCKSTEP:-10000}
phases=${PHASES:-h1 tls h2 handshake idle}
run=${PEER_RUN:-/tmp/lockstep-peers}
export PEER_RUN=$run

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need h2load nghttp2-client
need python3 python3
need taskset util-linux
need openssl openssl

if [ -z "${BIN:-}" ]; then (cd "$root" && cargo build --release --quiet); fi
bin=${BIN:-$root/target/release/lockstep}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
last_cpu=$(( $(nproc) - 1 ))
load() { taskset -c "$last_cpu" "$@"; }

# lockstep with the peers' certificate on a TLS listener (8097) beside the plain one (8090,
# which also takes h2c by prior knowledge).
config=$run/lockstep-proxy.yaml
mkdir -p "$run"
sed -n '/^listeners:/q;p' "$here/proxy.yaml" >"$config"
cat >>"$config" <<YAML
listeners:
  - name: http
    bind: "127.0.0.1:8090"
  - name: https
    bind: "127.0.0.1:8097"
    tls:
      certificates:
        - { cert: "$run/tls/farm.crt", key: "$run/tls/farm.key" }
YAML
sed -n '/^routes:/,$p' "$here/proxy.yaml" >>"$config"

lockstep_pid=
stop_all() {
  [ -n "$lockstep_pid" ] && kill "$lockstep_pid" 2>/dev/null && wait "$lockstep_pid" 2>/dev/null || true
  lockstep_pid=
  "$peer" stop nginx; "$peer" stop haproxy
}
trap 'stop_all; "$peer" stop backends' EXIT

wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

pin() { # pin PID WORKERS: the process and its threads on cores 0..WORKERS-1
  local cpus; cpus=$(seq -s, 0 $(( $2 - 1 )))
  for t in /proc/$1/task/*; do taskset -p -c "$cpus" "${t##*/}" >/dev/null 2>&1 || true; done
}

start_all() { # start_all WORKERS
  WORKERS=$1 "$peer" start nginx >/dev/null
  WORKERS=$1 "$peer" start haproxy >/dev/null
  if [ -n "${PIN_WORKERS:-}" ]; then
    # lockstep binds each worker to one of the cores it is started on.
    RUST_LOG=warn taskset -c "$(seq -s, 0 $(( $1 - 1 )))" "$bin" serve -c "$config" --workers "$1" --pin-workers 2>"$run/lockstep.log" &
  else
    RUST_LOG=warn "$bin" serve -c "$config" --workers "$1" 2>"$run/lockstep.log" &
  fi
  lockstep_pid=$!
  wait_port 8091; wait_port 8092; wait_port 8090; wait_port 8097
  # The port answering must be lockstep's: a peer on it would be measured in its place.
  kill -0 "$lockstep_pid" 2>/dev/null || { echo "lockstep did not start:" >&2; cat "$run/lockstep.log" >&2; exit 1; }
  [ -n "${PIN_WORKERS:-}" ] || pin "$lockstep_pid" "$1"
  pin "$(cat "$run/haproxy.pid")" "$1"
  local master; master=$(cat "$run/proxy.nginx.pid")
  for p in "$master" $(pgrep -P "$master"); do pin "$p" "$1"; done
  # Warm every path (pools fill, health checks pass).
  for p in 8091 8092 8090; do load wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$p/" >/dev/null; done
}

# wrk_once URL [ARGS] -> "rps p99_ms"
wrk_once() {
  local url=$1; shift
  load wrk -t1 -c"$conns" -d"$duration" --latency "$@" "$url" | awk '
    /Requests\/sec/ {rps=$2}
    /^ +99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; p99=v}
    END {printf "%s %s\n", rps, p99}'
}

# h2_once URL -> "rps"
h2_once() {
  load h2load -n 200000 -c 10 -m 10 "$1" 2>/dev/null | awk '/^finished in/ {gsub(/,/,""); print $4}'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# compare TITLE KIND URL_LOCKSTEP URL_NGINX URL_HAPROXY [WRK ARGS]; KIND: wrk or h2
compare() {
  local title=$1 kind=$2 ul=$3 un=$4 uh=$5; shift 5
  declare -A rps p99 url=([lockstep]=$ul [nginx]=$un [haproxy]=$uh)
  for r in $(seq "$rounds"); do
    for name in lockstep nginx haproxy; do
      if [ "$kind" = wrk ]; then read -r a b < <(wrk_once "${url[$name]}" "$@"); else a=$(h2_once "${url[$name]}"); b=0; fi
      rps[$name]+="$a "; p99[$name]+="$b "
      echo "  $title round $r $name: $a req/s, p99 $b ms" >&2
    done
  done
  echo "### $title"
  echo
  echo "| server | req/s | p99 (ms) |"
  echo "|---|---:|---:|"
  declare -A mr mp
  for name in lockstep nginx haproxy; do
    mr[$name]=$(echo ${rps[$name]} | tr ' ' '\n' | median)
    mp[$name]=$(echo ${p99[$name]} | tr ' ' '\n' | median)
    echo "| $name | ${mr[$name]} | ${mp[$name]} |"
  done
  echo
  for name in nginx haproxy; do
    awk -v a="${mr[lockstep]}" -v b="${mr[$name]}" -v pa="${mp[lockstep]}" -v pb="${mp[$name]}" -v n="$name" \
      'BEGIN {printf "- lockstep / %s: %.2fx req/s", n, a/b; if (pb > 0) printf ", p99 %.2fx", pa/pb; printf "\n"}'
  done
  echo
}

bench_h1() { # WORKERS
  start_all "$1"
  compare "HTTP/1.1 keep-alive, $1 worker(s) each, wrk -t1 -c$conns -d$duration, $rounds interleaved rounds (medians)" wrk \
    http://127.0.0.1:8090/ http://127.0.0.1:8091/ http://127.0.0.1:8092/
  stop_all
}

bench_tls() {
  start_all 1
  compare "HTTP/1.1 over TLS (keep-alive), 1 worker each, wrk -t1 -c$conns -d$duration, $rounds rounds" wrk \
    https://127.0.0.1:8097/ https://127.0.0.1:8093/ https://127.0.0.1:8094/
  stop_all
}

bench_h2() {
  start_all 1
  compare "h2 over TLS (ALPN), 1 worker each, h2load -n 200000 -c 10 -m 10, $rounds rounds" h2 \
    https://127.0.0.1:8097/ https://127.0.0.1:8093/ https://127.0.0.1:8094/
  compare "h2c (prior knowledge), 1 worker each, h2load -n 200000 -c 10 -m 10, $rounds rounds" h2 \
    http://127.0.0.1:8090/ http://127.0.0.1:8095/ http://127.0.0.1:8096/
  stop_all
}

# negotiated PORT -> what a new session and a resumed one get from the server on PORT
negotiated() {
  local sess req='GET / HTTP/1.1\r\nHost: farm.test\r\nConnection: close\r\n\r\n' first second
  sess=$(mktemp)
  first=$(printf "$req" | timeout 10 openssl s_client -connect "127.0.0.1:$1" -sess_out "$sess" -ign_eof 2>/dev/null \
    | awk '/^New, / {p=$2; c=$NF} /^Server Temp Key/ {k=$4} END {gsub(",", "", p); gsub(",", "", k); printf "%s %s, key exchange %s", p, c, k}')
  second=$(printf "$req" | timeout 10 openssl s_client -connect "127.0.0.1:$1" -sess_in "$sess" -ign_eof 2>/dev/null \
    | awk '/^Reused, / {r=1} /^Server Temp Key/ {k=$4} END {gsub(",", "", k); printf "%s, key exchange %s", r ? "resumed" : "not resumed", k ? k : "none"}')
  rm -f "$sess"
  echo "$first; next connection: $second"
}

bench_handshake() {
  start_all 1
  compare "New TLS connections (one request each, Connection: close; wrk resumes its session), 1 worker each, wrk -t1 -c$conns -d$duration, $rounds rounds" wrk \
    https://127.0.0.1:8097/ https://127.0.0.1:8093/ https://127.0.0.1:8094/ -H "Connection: close"
  echo "What each negotiates (\`openssl s_client\`, a new session then the same one again):"
  echo
  echo "- lockstep: $(negotiated 8097)"
  echo "- nginx: $(negotiated 8093)"
  echo "- haproxy: $(negotiated 8094)"
  echo
  stop_all
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

idle_row() { # idle_row NAME PORT PID COUNT
  local before after hold
  before=$(rss_kb "$3")
  python3 "$here/idle_conns.py" "$2" "$4" "$3" > "$run/idle.$1" &
  hold=$!
  for _ in $(seq 900); do [ -s "$run/idle.$1" ] && break; sleep 0.1; done
  after=$(cat "$run/idle.$1")
  kill $hold 2>/dev/null; wait $hold 2>/dev/null || true
  awk -v b="$before" -v a="$after" -v n="$4" -v s="$1" \
    'BEGIN {printf "| %s | %d | %.1f | %.1f | %.2f |\n", s, n, b/1024, a/1024, (a-b)/n}'
}

bench_idle() {
  start_all 1
  echo "### Memory per idle keep-alive connection (1 worker; RSS of the proxy process)"
  echo
  echo "| server | connections | RSS before (MiB) | RSS with connections (MiB) | KiB per connection |"
  echo "|---|---:|---:|---:|---:|"
  idle_row lockstep 8090 "$lockstep_pid" "$idle_conns"
  idle_row nginx 8091 "$(pgrep -P "$(cat "$run/proxy.nginx.pid")" -n)" "$idle_conns"
  idle_row haproxy 8092 "$(cat "$run/haproxy.pid")" "$idle_conns"
  stop_all
  start_all 1
  idle_row lockstep 8090 "$lockstep_pid" "$idle_alone"
  echo
  stop_all
}

"$peer" stop backends >/dev/null 2>&1 || true
pkill -f "nginx -c $run/backends.nginx.conf" 2>/dev/null && sleep 0.5 || true
"$peer" start backends >/dev/null
for m in $(pgrep -f "nginx -c $run/backends.nginx.conf"); do # the master and its workers
  for p in "$m" $(pgrep -P "$m"); do taskset -a -p -c "$last_cpu" "$p" >/dev/null 2>&1 || true; done
done
echo "## Proxy ($(date -u +%F), $(nproc) cores, lockstep $(cd "$root" && git rev-parse --short HEAD), command: bench/proxy.sh)"
echo
for phase in $phases; do
  case $phase in
    h1) bench_h1 1; bench_h1 2 ;;
    tls) bench_tls ;;
    h2) bench_h2 ;;
    handshake) bench_handshake ;;
    idle) bench_idle ;;
  esac
done
