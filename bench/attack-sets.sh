#!/usr/bin/env bash
# Which attacked listeners hurt the proxy's tail, and how much of it the machine makes by
# itself (issue 15, phase B). Not a test: loopback only, bounded in time and count.
#
#   bench/attack-sets.sh                       # prints one line per wrk run
#   SETS="none;8190 9994 7790 8181;8181" bench/attack-sets.sh
#
# bench/soak.sh's layout (one `lockstep serve --workers 1` with the proxy on :8190, the sync hub
# on :7790 and the admin API on :9994, alone on core 0; one `lockstep agent` serving :8181, the
# two benchmark backends, wrk and the attackers on core 1). For each set of attacked ports in
# SETS (";"-separated, "none" for no attack), examples/soakattack.rs holds IDLE idle, SLOW
# slowloris and H2C idle h2c connections against each port (nice 19), and after SETTLE seconds
# ROUNDS rounds run wrk (-t1 -c64 -d8s) through the proxy, then straight to one backend: the
# second is a path without lockstep in it, so the pair says how much of the tail is the
# proxy's and how much the attack's effect on the shared cores. Each line also has the TCP
# counters that would show lost packets (nstat) and the packets the kernel dropped because a
# core's input backlog was full (/proc/net/softnet_stat; loopback traffic goes through it).
# Env: SETS ("none;8190 9994 7790 8181;8190 9994 7790;8181"), IDLE (10000), SLOW (500),
#      H2C (200), SETTLE (20), ROUNDS (3), BIN (target/release/lockstep), ATTACK_CPU (the
#      attackers' core: the last; on loopback the kernel's work for their connections, both
#      ends, mostly runs on the core of the process that sends, so this also says where the
#      attack's retransmission timers and handshakes land).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
export PEER_RUN=${PEER_RUN:-/tmp/lockstep-peers}
idle=${IDLE:-10000}; slow=${SLOW:-500}; h2c=${H2C:-200}
settle=${SETTLE:-20}; rounds=${ROUNDS:-3}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need taskset util-linux
need nstat iproute2

. "$here/soak-farm.sh"
soak_farm_setup
# The appliance on core 0; the agent, the backends, wrk and the attackers on the last core.
last_cpu=$(( $(nproc) - 1 ))
on_appliance=(taskset -c 0); on_load=(taskset -c "$last_cpu"); backend_cpu=$last_cpu
soak_farm_start

# backlog_drops -> packets dropped so far at the cores' input backlogs (netdev_max_backlog)
backlog_drops() { local t=0 a b rest; while read -r a b rest; do t=$((t + 16#$b)); done </proc/net/softnet_stat; echo "$t"; }

# wrk_once URL -> "req/s p99"
wrk_once() {
  "${on_load[@]}" wrk -t1 -c64 -d8s --latency "$1" | awk '/Requests\/sec/ {r=$2} /^ +99%/ {p=$2} END {print r, p}'
}
"${on_load[@]}" wrk -t1 -c64 -d2s http://127.0.0.1:8190/ >/dev/null   # warm the pools
IFS=';' read -ra sets <<<"${SETS:-none;8190 9994 7790 8181;8190 9994 7790;8181}"
for set in "${sets[@]}"; do
  attackers=()
  if [ "$set" != none ]; then
    for port in $set; do
      taskset -c "${ATTACK_CPU:-$last_cpu}" nice -n 19 "$attacker" "$port" "$idle" "$slow" "$h2c" 600 >/dev/null &
      attackers+=($!)
    done
    sleep "$settle"
  fi
  for r in $(seq "$rounds"); do
    nstat -n >/dev/null
    drops0=$(backlog_drops)
    proxy=$(wrk_once http://127.0.0.1:8190/)
    direct=$(wrk_once http://127.0.0.1:9101/)
    drops=$(( $(backlog_drops) - drops0 ))
    counters=$(nstat 2>/dev/null | awk '$1 ~ /Retrans|LossProbe|ListenOverflows|TCPTimeouts/ {printf " %s=%s", $1, $2}')
    echo "[$set] round $r: proxy $proxy; straight to a backend $direct; backlog drops $drops;${counters:- no loss counters}"
  done
  if [ "${#attackers[@]}" -gt 0 ]; then
    kill "${attackers[@]}" 2>/dev/null || true
    for p in "${attackers[@]}"; do wait "$p" 2>/dev/null || true; done
    sleep 3
  fi
done
