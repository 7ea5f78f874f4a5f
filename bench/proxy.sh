#!/usr/bin/env bash
# Proxy benchmark: lockstep against the nginx and HAProxy peers, side by side, in one run.
#
#   bench/proxy.sh            # rounds of wrk (1 and 2 workers each), h2load, idle-connection memory
#
# Everything goes through the same two nginx backends (../shared/peers: `peer start backends`).
# Each server gets WORKERS worker threads/processes; wrk runs on the same 2-core machine, so the
# absolute numbers are low and noisy: read the ratios, which come from interleaved rounds
# (A B C A B C ...) and medians. Env: ROUNDS (3), DURATION (10s), CONNS (50), IDLE_CONNS (5000: the HAProxy peer config allows 8000 connections).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
rounds=${ROUNDS:-3}
duration=${DURATION:-10s}
conns=${CONNS:-50}
idle_conns=${IDLE_CONNS:-5000}
run=${PEER_RUN:-/tmp/lockstep-peers}
export PEER_RUN=$run

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need h2load nghttp2-client
need python3 python3

(cd "$root" && cargo build --release --quiet)
bin=$root/target/release/lockstep
ulimit -n 65536 2>/dev/null || true

lockstep_pid=
stop_all() {
  [ -n "$lockstep_pid" ] && kill "$lockstep_pid" 2>/dev/null && wait "$lockstep_pid" 2>/dev/null || true
  lockstep_pid=
  "$peer" stop nginx; "$peer" stop haproxy
}
trap 'stop_all; "$peer" stop backends' EXIT

wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

start_all() { # start_all WORKERS
  WORKERS=$1 "$peer" start nginx >/dev/null
  WORKERS=$1 "$peer" start haproxy >/dev/null
  RUST_LOG=warn "$bin" serve -c "$here/proxy.yaml" --workers "$1" 2>"$run/lockstep.log" &
  lockstep_pid=$!
  wait_port 8091; wait_port 8092; wait_port 8090
  # The port answering must be lockstep's: a peer on it would be measured in its place.
  kill -0 "$lockstep_pid" 2>/dev/null || { echo "lockstep did not start:" >&2; cat "$run/lockstep.log" >&2; exit 1; }
  # Warm every path (pools fill, health checks pass).
  for p in 8091 8092 8090; do wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$p/" >/dev/null; done
}

# wrk_once PORT -> "rps p99_ms"
wrk_once() {
  wrk -t1 -c"$conns" -d"$duration" --latency "http://127.0.0.1:$1/" | awk '
    /Requests\/sec/ {rps=$2}
    /^ +99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; p99=v}
    END {printf "%s %s\n", rps, p99}'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

bench_h1() { # bench_h1 WORKERS
  local w=$1
  start_all "$w"
  declare -A rps p99
  for r in $(seq "$rounds"); do
    for name in lockstep nginx haproxy; do
      case $name in lockstep) port=8090 ;; nginx) port=8091 ;; haproxy) port=8092 ;; esac
      read -r a b < <(wrk_once $port)
      rps[$name]+="$a "; p99[$name]+="$b "
      echo "  round $r $name: $a req/s, p99 $b ms" >&2
    done
  done
  echo "### HTTP/1.1, $w worker(s) each, wrk -t1 -c$conns -d$duration, $rounds interleaved rounds (medians)"
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
      'BEGIN {printf "- lockstep / %s: %.2fx req/s, p99 %.2fx\n", n, a/b, pa/pb}'
  done
  echo
  stop_all
}

bench_h2() {
  start_all 1
  echo "### h2c (prior knowledge), 1 worker, h2load -n 200000 -c 10 -m 10"
  echo
  echo "The nginx and HAProxy peers are configured for HTTP/1.1 only (their configs are used as they"
  echo "are), so this row has no peer; it shows lockstep's h2 path against its own h1 figure above."
  echo
  h2load -n 200000 -c 10 -m 10 "http://127.0.0.1:8090/" | awk '/^finished in/ {print "- lockstep h2c: " $0} /requests:/ {print "- " $0}'
  echo
  stop_all
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

bench_idle() {
  start_all 1
  echo "### Memory for $idle_conns idle keep-alive connections (1 worker; RSS of the proxy process)"
  echo
  echo "| server | RSS before (MiB) | RSS with connections (MiB) | per 10k connections (MiB) |"
  echo "|---|---:|---:|---:|"
  for name in lockstep nginx haproxy; do
    case $name in
      lockstep) port=8090; pid=$lockstep_pid ;;
      nginx) port=8091; pid=$(pgrep -f "nginx: worker process" -n || cat "$run/nginx.pid") ;;
      haproxy) port=8092; pid=$(cat "$run/haproxy.pid") ;;
    esac
    before=$(rss_kb "$pid")
    python3 "$here/idle_conns.py" "$port" "$idle_conns" "$pid" > "$run/idle.$name" &
    hold=$!
    for _ in $(seq 600); do [ -s "$run/idle.$name" ] && break; sleep 0.1; done
    after=$(cat "$run/idle.$name")
    kill $hold 2>/dev/null; wait $hold 2>/dev/null || true
    awk -v b="$before" -v a="$after" -v n="$idle_conns" -v s="$name" \
      'BEGIN {printf "| %s | %.1f | %.1f | %.1f |\n", s, b/1024, a/1024, (a-b)/1024*10000/n}'
  done
  echo
  stop_all
}

"$peer" start backends >/dev/null
echo "## Proxy ($(date -u +%F), $(nproc) cores, command: bench/proxy.sh)"
echo
bench_h1 1
bench_h1 2
bench_h2
bench_idle
