#!/usr/bin/env bash
# Tail latency under a connection attack, lockstep and HAProxy side by side (issue 15's "p99
# under attack ≤ 2× unloaded", against a peer under the same attack). Not a test.
#
#   bench/attack-p99.sh          # prints a Markdown table for BENCHMARKS.md
#
# Each proxy gets one worker pinned to core 0; the backends (../shared/peers `peer start
# backends`), wrk and the attacker (examples/soakattack.rs at nice 19) run on the last core. In each of
# ROUNDS interleaved rounds, for each proxy: wrk unloaded; then the attacker holds IDLE idle
# keep-alive and SLOW slowloris connections (no h2c: the HAProxy peer's plain listener speaks
# HTTP/1.1 only) and after SETTLE seconds wrk runs again; then the attacker is stopped (SIGSTOP)
# with its connections still open and wrk runs a third time (the cost of the held connections
# alone, without the attacker's traffic). IDLE defaults to 7000: the HAProxy peer's maxconn is
# 8000. Its `timeout client` (30 s) closes idle connections, so SETTLE + 2 runs + 1 s stay under it.
# ATTACK=all attacks, beside the proxy listener, two control listeners of the same process at
# once, each with a connection cap, as bench/soak.sh's phase B does (the agent's listener, on
# another machine in a farm, is left out): lockstep's admin (cap 64) and sync hub (cap 2048)
# listeners, and two frontends of an HAProxy started with this script's own configuration (the
# peer's, plus `tcp-request connection reject` at 64 and 2048 connections, as lockstep refuses
# at its caps; global maxconn raised to 9900, what the 20 000 descriptors allow).
# Env: ROUNDS (3), IDLE (7000), SLOW (500), SETTLE (5), DURATION (8s), CONNS (64), ATTACK (proxy).
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
attack=${ATTACK:-proxy}
export PEER_RUN=${PEER_RUN:-/tmp/lockstep-peers}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need taskset util-linux

(cd "$root" && cargo build --release --quiet --bins --example soakattack)
bin=${BIN:-$root/target/release/lockstep}
attacker=$root/target/release/examples/soakattack
ulimit -n "$(ulimit -Hn)"
last_cpu=$(( $(nproc) - 1 ))
load() { taskset -c "$last_cpu" "$@"; }

dir=$(mktemp -d)
serve_pid=""
haproxy_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  [ -n "$haproxy_pid" ] && kill "$haproxy_pid" 2>/dev/null || true
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
haproxy_pid=""
if [ "$attack" = all ]; then
  need haproxy haproxy
  cat > "$dir/haproxy.cfg" <<EOT
global
  nbthread 1
  maxconn 9900
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
frontend fe
  bind 127.0.0.1:8092
  default_backend farm
frontend admin
  bind 127.0.0.1:8097
  tcp-request connection reject if { fe_conn gt 64 }
  http-request return status 200 content-type text/plain string "ok"
frontend sync
  bind 127.0.0.1:8098
  tcp-request connection reject if { fe_conn gt 2048 }
  http-request return status 200 content-type text/plain string "ok"
backend farm
  balance roundrobin
  http-reuse always
  server b1 127.0.0.1:9101
  server b2 127.0.0.1:9102
EOT
  taskset -c 0 haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
  haproxy_pid=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/8098) 2>/dev/null && break; sleep 0.1; done
else
  WORKERS=1 "$peer" start haproxy >/dev/null
  taskset -a -p -c 0 "$(cat "$PEER_RUN/haproxy.pid")" >/dev/null
fi

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
if [ "$attack" = all ]; then
  head -c 32 /dev/urandom | base64 > "$dir/agent.token"
  head -c 32 /dev/urandom | base64 > "$dir/publish.token"
  chmod 600 "$dir"/*.token
  cat >> "$dir/lockstep.yaml" <<EOT
sync:
  bind: "127.0.0.1:7790"
  store: hub
  agent_token_file: agent.token
  publish_token_file: publish.token
  max_connections: 2048
admin:
  bind: "127.0.0.1:9994"
  max_connections: 64
EOT
fi
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
    targets=("$port")
    if [ "$attack" = all ]; then
      if [ "$port" = 8190 ]; then targets+=(9994 7790); else targets+=(8097 8098); fi
    fi
    attackers=()
    for t in "${targets[@]}"; do
      # Not through `load` (a function): $! must be the attacker itself, for SIGSTOP.
      taskset -c "$last_cpu" nice -n 19 "$attacker" "$t" "$idle" "$slow" 0 120 > "$dir/soak.$t.json" &
      attackers+=($!)
    done
    sleep "$settle"
    a=$(p99 "$port")
    kill -STOP "${attackers[@]}"; sleep 1
    s=$(p99 "$port")
    kill -CONT "${attackers[@]}"; kill "${attackers[@]}"; wait "${attackers[@]}" 2>/dev/null || true
    echo "$port $u $a $s" >> "$dir/rows"
    sleep 3
  done
done

echo "### p99 under attack, side by side ($(date -u +%F), $(nproc) cores, lockstep $(cd "$root" && git rev-parse --short HEAD), command: bench/attack-p99.sh)"
echo
echo "Each proxy one worker on core 0; backends, wrk (-t1 -c$conns -d$duration) and the attacker"
echo "(nice 19) on core $last_cpu. Attack: $idle idle keep-alive + $slow slowloris connections"
if [ "$attack" = all ]; then
  echo "against the proxy listener and as many against each of two capped control listeners (lockstep:"
  echo "admin, cap 64, and sync, cap 2048; HAProxy: two frontends rejecting above 64 and 2048)."
else
  echo "against the proxy listener."
fi
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
