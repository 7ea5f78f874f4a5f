#!/usr/bin/env bash
# A/B of two lockstep binaries on the proxy path, in interleaved rounds (A B A B …), through the
# peers' two nginx backends (../shared/peers: `peer start backends`), each pinned to core 0 with
# wrk on core 1. For checking that a change did not cost throughput; bench/proxy.sh compares
# against nginx and HAProxy.
#
#   bench/ab.sh OLD_BIN NEW_BIN      # env: ROUNDS (5), DURATION (5s), CONNS (50), WORKERS (1)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
a=${1:?usage: bench/ab.sh OLD_BIN NEW_BIN}
b=${2:?usage: bench/ab.sh OLD_BIN NEW_BIN}
rounds=${ROUNDS:-5}
duration=${DURATION:-5s}
conns=${CONNS:-50}
workers=${WORKERS:-1}
run=${PEER_RUN:-/tmp/lockstep-peers}
export PEER_RUN=$run
command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install wrk" >&2; exit 1; }
"$peer" start backends >/dev/null
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; "$peer" stop backends' EXIT
port=8090 # bench/proxy.yaml's listener

once() { # once BIN -> "rps p99_ms"
  RUST_LOG=warn taskset -c 0 "$1" serve -c "$here/proxy.yaml" --workers "$workers" 2>"$run/ab.log" &
  pid=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null || { cat "$run/ab.log" >&2; exit 1; }
  taskset -c 1 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null
  taskset -c 1 wrk -t1 -c"$conns" -d"$duration" --latency "http://127.0.0.1:$port/" |
    awk '/Requests\/sec/ {r=$2} / 99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000} p=v} END {print r, p}'
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
: >"$run/ab.a"; : >"$run/ab.b"
for r in $(seq "$rounds"); do
  ra=$(once "$a"); rb=$(once "$b")
  echo "  round $r  A: $ra   B: $rb"
  echo "$ra" >>"$run/ab.a"; echo "$rb" >>"$run/ab.b"
done
ma=$(cut -d' ' -f1 "$run/ab.a" | median); mb=$(cut -d' ' -f1 "$run/ab.b" | median)
pa=$(cut -d' ' -f2 "$run/ab.a" | median); pb=$(cut -d' ' -f2 "$run/ab.b" | median)
echo "A $a: median $ma req/s, p99 $pa ms"
echo "B $b: median $mb req/s, p99 $pb ms"
awk -v a="$ma" -v b="$mb" 'BEGIN {printf "B / A: %.3fx req/s\n", b / a}'
