#!/usr/bin/env bash
# DNS benchmark: lockstep against the Knot DNS, NSD and dnsmasq peers, side by side, in one run.
#
#   bench/dns.sh              # UDP then TCP, interleaved rounds, `www.farm.test A` (3 rotated addresses)
#
# Each server gets WORKERS (default 1) worker threads/processes; dnsperf runs on the same 2-core
# machine, so absolute numbers are low and noisy: read the ratios, which come from interleaved
# rounds (A B C D A B C D ...) and medians. dnsperf 2.10 prints no percentiles, and its -v
# (one line per query) caps it near 110k queries/s here, so each measurement is two runs:
# queries/s from a plain run of DURATION, average and p99 latency from a -v run of LAT_DURATION.
# The servers run on the first WORKERS cores and dnsperf on the last one (with WORKERS=1 on two
# cores: server on core 0, dnsperf on core 1). dnsperf then fills its core before any server
# fills its own (~130k queries/s here, servers at ~80 %), so queries/s compares how fast the
# load generator can go against each; what compares the servers is their CPU per query, taken
# from /proc over the plain run (user + system, all of the server's processes and threads).
# Env: ROUNDS (3), DURATION (10, seconds), LAT_DURATION (5), CLIENTS (10), OUTSTANDING (100),
# WORKERS (1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
rounds=${ROUNDS:-3}
duration=${DURATION:-10}
lat_duration=${LAT_DURATION:-5}
clients=${CLIENTS:-10}
outstanding=${OUTSTANDING:-100}
workers=${WORKERS:-1}
run=${PEER_RUN:-/tmp/lockstep-peers}
export PEER_RUN=$run WORKERS=$workers
mkdir -p "$run"

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need dnsperf dnsperf
need dig bind9-dnsutils
need taskset util-linux
last_cpu=$(( $(nproc) - 1 ))
server_cpus=0-$(( workers - 1 ))
[ "$workers" -gt "$last_cpu" ] && server_cpus=0-$last_cpu   # more workers than cores: all

(cd "$root" && cargo build --release --quiet)
bin=${CARGO_TARGET_DIR:-$root/target}/release/lockstep

lockstep_pid=
stop_all() {
  [ -n "$lockstep_pid" ] && kill "$lockstep_pid" 2>/dev/null && wait "$lockstep_pid" 2>/dev/null || true
  lockstep_pid=
  "$peer" stop knot || true; "$peer" stop nsd || true; "$peer" stop dnsmasq || true
}
trap stop_all EXIT

declare -A port=([lockstep]=5394 [knot]=5392 [nsd]=5393 [dnsmasq]=5391)
servers=(lockstep knot nsd dnsmasq)

wait_dns() { # wait_dns PORT: until www.farm.test answers
  for _ in $(seq 100); do
    dig @127.0.0.1 -p "$1" www.farm.test +short +time=1 +tries=1 2>/dev/null | grep -q . && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; return 1
}

"$peer" start knot >/dev/null
"$peer" start nsd >/dev/null
"$peer" start dnsmasq >/dev/null
RUST_LOG=warn "$bin" serve -c "$here/dns.yaml" --workers "$workers" 2>"$run/lockstep-dns.log" &
lockstep_pid=$!
for s in "${servers[@]}"; do wait_dns "${port[$s]}"; done
declare -A pids=([lockstep]=$lockstep_pid [knot]="$(pgrep -d ' ' -x knotd)" \
  [nsd]="$(pgrep -d ' ' -f "nsd -d -c $run")" [dnsmasq]="$(pgrep -d ' ' -x dnsmasq)")
for s in "${servers[@]}"; do
  [ -n "${pids[$s]}" ] || { echo "no process found for $s" >&2; exit 1; }
  for p in ${pids[$s]}; do taskset -a -p -c "$server_cpus" "$p" >/dev/null; done
done
# cpu_ticks "PIDS" -> user + system clock ticks of those processes so far (the fields after
# the command name, which may hold spaces: "nsd: server 1")
cpu_ticks() { local p; for p in $1; do sed 's/.*) //' "/proc/$p/stat"; done | awk '{t += $12 + $13} END {print t + 0}'; }

# Every server must answer the benchmark query with three addresses, rotated.
for s in "${servers[@]}"; do
  n=$(dig @127.0.0.1 -p "${port[$s]}" www.farm.test +short | wc -l)
  [ "$n" -eq 3 ] || { echo "$s answers www.farm.test with $n addresses, not 3" >&2; exit 1; }
done

queries=$run/dns-queries.txt
echo "www.farm.test A" >"$queries"

# perf_once MODE PORT "PIDS" -> "qps avg_ms p99_ms server_us_per_query"
perf_once() {
  local out=$run/dnsperf.out qps t0 t1 answered
  t0=$(cpu_ticks "$3")
  taskset -c "$last_cpu" dnsperf -m "$1" -s 127.0.0.1 -p "$2" -d "$queries" -l "$duration" -c "$clients" -T 1 \
    -q "$outstanding" >"$out" 2>/dev/null || true
  t1=$(cpu_ticks "$3")
  qps=$(awk '/Queries per second:/ {print $4}' "$out")
  answered=$(awk '/Queries completed:/ {print $3}' "$out")
  taskset -c "$last_cpu" dnsperf -m "$1" -s 127.0.0.1 -p "$2" -d "$queries" -l "$lat_duration" -c "$clients" -T 1 \
    -q "$outstanding" -v >"$out" 2>/dev/null || true
  # Verbose lines: "> NOERROR www.farm.test A 0.000123" (latency in seconds, last field).
  awk '/^> / {print $NF}' "$out" | sort -g | awk -v qps="${qps:-0}" -v ticks=$((t1 - t0)) \
    -v hz="$(getconf CLK_TCK)" -v n="${answered:-0}" '
    {a[NR]=$1; s+=$1}
    END {
      us = n > 0 ? ticks / hz * 1e6 / n : 0
      if (NR == 0) {print qps, "nan", "nan", us; exit}
      i = int(NR * 0.99); if (i < 1) i = 1
      printf "%s %.3f %.3f %.2f\n", qps, s / NR * 1000, a[i] * 1000, us
    }'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

bench() { # bench MODE
  local mode=$1
  declare -A qps avg p99 cpq
  for r in $(seq "$rounds"); do
    for s in "${servers[@]}"; do
      read -r q a p c < <(perf_once "$mode" "${port[$s]}" "${pids[$s]}")
      qps[$s]+="$q "; avg[$s]+="$a "; p99[$s]+="$p "; cpq[$s]+="$c "
    done
  done
  echo "### $mode, $workers worker(s) each, dnsperf -c$clients -q$outstanding (-l$duration for queries/s, -l$lat_duration -v for latency), $rounds interleaved rounds (medians)"
  echo
  echo "| server | queries/s | avg (ms) | p99 (ms) | server CPU per query (µs) |"
  echo "|---|---:|---:|---:|---:|"
  declare -A mq ma mp mc
  for s in "${servers[@]}"; do
    mq[$s]=$(echo "${qps[$s]}" | tr ' ' '\n' | grep . | median)
    ma[$s]=$(echo "${avg[$s]}" | tr ' ' '\n' | grep . | median)
    mp[$s]=$(echo "${p99[$s]}" | tr ' ' '\n' | grep . | median)
    mc[$s]=$(echo "${cpq[$s]}" | tr ' ' '\n' | grep . | median)
    printf "| %s | %.0f | %.3f | %.3f | %.2f |\n" "$s" "${mq[$s]}" "${ma[$s]}" "${mp[$s]}" "${mc[$s]}"
  done
  echo
  for s in knot nsd dnsmasq; do
    awk -v n="$s" -v a="${mq[lockstep]}" -v b="${mq[$s]}" -v pa="${mp[lockstep]}" -v pb="${mp[$s]}" \
      -v ca="${mc[lockstep]}" -v cb="${mc[$s]}" \
      'BEGIN {printf "- lockstep / %s: %.2fx queries/s, p99 %.2fx; queries per CPU-second %.2fx\n", n, a/b, pa/pb, (ca > 0 ? cb/ca : 0)}'
  done
  echo
}

echo "## DNS"
echo
echo "\`bench/dns.sh\` (ROUNDS=$rounds DURATION=$duration LAT_DURATION=$lat_duration CLIENTS=$clients OUTSTANDING=$outstanding WORKERS=$workers), $(nproc) cores, $(date -u +%Y-%m-%d)."
echo
bench udp
bench tcp
