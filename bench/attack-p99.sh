#!/usr/bin/env bash
# Tail latency under a connection attack, lockstep and HAProxy side by side (issue 15's "p99
# under attack ≤ 2× unloaded", against a peer under the same attack). Not a test.
#
#   bench/attack-p99.sh          # prints a Markdown table for BENCHMARKS.md
#
# Each proxy gets one worker pinned to core 0; the backends (../shared/peers `peer start
# backends`), wrk and the attacker (bench/soak.py at nice 19) run on the last core. In each of
# ROUNDS interleaved rounds, for each proxy: wrk unloaded; then the attacker holds IDLE idle
# keep-alive and SLOW slowloris connections (no h2c: the HAProxy peer's plain listener speaks
# HTTP/1.1 only) and after SETTLE seconds wrk runs again; then the attacker is stopped (SIGSTOP)
# with its connections still open and wrk runs a third time (the cost of the held connections
# alone, without the attacker's traffic). IDLE defaults to 7000: the HAProxy peer's maxconn is
# 8000. Its `timeout client` (30 s) closes idle connections, so SETTLE + 2 runs + 1 s stay under it.
# Env: ROUNDS (3), IDLE (7000), SLOW (500), SETTLE (5), DURATION (8s), CONNS (64).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
rounds=${ROUNDS:-3}
idle=${IDLE:-7000}
slow=${SLOW:-500}
settle=${SETTLE:-5}
duration=${DURATION:-8s}
conns=${CONNS:-64}
export PEER_RUN=${PEER_RUN:-/tmp/lockstep-peers}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need python3 python3
need taskset util-linux

(cd "$root" && cargo build --release --quiet)
bin=$root/target/release/lockstep
ulimit -n "$(ulimit -Hn)"
last_cpu=$(( $(nproc) - 1 ))
load() { taskset -c "$last_cpu" "$@"; }

dir=$(mktemp -d)
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  "$peer" stop haproxy >/dev/null 2>&1 || true
  "$peer" stop backends >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
"$peer" stop backends >/dev/null 2>&1 || true   # a leftover instance would share the ports
"$peer" start backends >/dev/null
for m in $(pgrep -f "nginx -c $PEER_RUN/backends.nginx.conf"); do
  for p in "$m" $(pgrep -P "$m"); do taskset -a -p -c "$last_cpu" "$p" >/dev/null 2>&1 || true; done
done
"$peer" stop haproxy >/dev/null 2>&1 || true
WORKERS=1 "$peer" start haproxy >/dev/null
taskset -a -p -c 0 "$(cat "$PEER_RUN/haproxy.pid")" >/dev/null

cat > "$dir/lockstep.yaml" <<EOT
listeners:
  - name: http
    bind: "127.0.0.1:8190"
routes:
  - { path_prefix: "/", pool: farm }
pools:
  - name: farm
    backends:
      - { name: b1, address: "127.0.0.1:9101" }
      - { name: b2, address: "127.0.0.1:9102" }
    health: { path: /healthz, interval: 2s, timeout: 1s }
EOT
(cd "$dir" && RUST_LOG=warn exec taskset -c 0 "$bin" serve -c lockstep.yaml --workers 1 2>serve.log) &
serve_pid=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/8190) 2>/dev/null && break; sleep 0.1; done

p99() { # p99 PORT -> p99 in ms
  load wrk -t1 -c"$conns" -d"$duration" --latency "http://127.0.0.1:$1/" | awk '
    /^ +99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else {sub(/s/,"",v); v=v*1000}; print v}'
}
for port in 8190 8092; do load wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null; done
: > "$dir/rows"
for r in $(seq "$rounds"); do
  for port in 8190 8092; do
    u=$(p99 "$port")
    # Not through `load` (a function): $! must be the attacker itself, for SIGSTOP.
    taskset -c "$last_cpu" nice -n 19 python3 "$here/soak.py" "$port" "$idle" "$slow" 0 120 > "$dir/soak.json" &
    attacker=$!
    sleep "$settle"
    a=$(p99 "$port")
    kill -STOP "$attacker"; sleep 1
    s=$(p99 "$port")
    kill -CONT "$attacker"; kill "$attacker"; wait "$attacker" 2>/dev/null || true
    echo "$port $u $a $s" >> "$dir/rows"
    sleep 3
  done
done

echo "### p99 under attack, side by side ($(date -u +%F), $(nproc) cores, lockstep $(cd "$root" && git rev-parse --short HEAD), command: bench/attack-p99.sh)"
echo
echo "Each proxy one worker on core 0; backends, wrk (-t1 -c$conns -d$duration) and the attacker"
echo "(nice 19) on core $last_cpu. Attack: $idle idle keep-alive + $slow slowloris connections."
echo "$rounds interleaved rounds; medians (each round's figures in brackets)."
echo
echo "| proxy | p99 unloaded (ms) | p99 under attack (ms) | ratio | p99 with the attacker paused, connections held (ms) | ratio |"
echo "|---|---:|---:|---:|---:|---:|"
for port in 8190 8092; do
  name=lockstep; [ "$port" = 8092 ] && name=haproxy
  awk -v p="$port" -v n="$name" '
    function med(a, k,  i, j, t) {
      for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) {t=a[i]; a[i]=a[j]; a[j]=t}
      return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
    }
    $1 == p {k++; u[k]=$2; a[k]=$3; s[k]=$4; lu=lu sep $2; la=la sep $3; ls=ls sep $4; sep=", "}
    END {mu=med(u,k); ma=med(a,k); ms=med(s,k)
      printf "| %s | %.2f [%s] | %.2f [%s] | %.2fx | %.2f [%s] | %.2fx |\n", n, mu, lu, ma, la, ma/mu, ms, ls, ms/mu}' "$dir/rows"
done
