#!/usr/bin/env bash
# A/B of two lockstep builds on a noisy machine: both run at the same time on core 0, each
# loaded by its own client on the last core, through the same two backends, and what is
# compared is each build's CPU time per request (user + system of all its threads, from
# /proc) over the same seconds. Whatever the machine does during a round (another tenant,
# frequency, cache) it does to both; interleaved rounds run one after the other cannot
# resolve a 5 % difference here (the same build measured 25-40k req/s from one round to the
# next, 2026-12-05). The rates are printed too, but they are not the measure: with two
# servers and two clients the client core is saturated as well, which pulls the rates
# together.
#
#   bench/ab.sh A_BIN B_BIN              # HTTP/1.1 keep-alive
#   MODE=h2 ROUNDS=8 bench/ab.sh A_BIN B_BIN
#   bench/ab.sh target/release/lockstep nginx   # B a peer (nginx or haproxy, WORKERS=1)
#
# MODE: h1 (wrk -t1 -c50, keep-alive), h2c (h2load -c10 -m10, prior knowledge), h2 (the same over TLS with ALPN). ROUNDS (5),
# SECONDS_PER_ROUND (5). Resolution, 2026-12-05: one build on both sides read 1.003-1.018
# (median 1.009, A the favoured side); the header change of f67186e read 1.016 as A and 0.984
# as B, round to round within +-0.4 %. Run both orders and average. No latency: a build's latency here includes waiting for the other's
# turns on the core (bench/proxy.sh measures p99 against the peers).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
peer=${PEER:-$here/../../shared/peers/peer}
run=${PEER_RUN:-/tmp/lockstep-peers}
export PEER_RUN=$run
a=${1:?usage: bench/ab.sh A_BIN B_BIN}
b=${2:?usage: bench/ab.sh A_BIN B_BIN}
rounds=${ROUNDS:-5}
secs=${SECONDS_PER_ROUND:-5}
mode=${MODE:-h1}
for tool in wrk:wrk h2load:nghttp2-client; do
  command -v "${tool%%:*}" >/dev/null || { echo "${tool%%:*} is missing (Debian ${tool#*:})" >&2; exit 1; }
done
last_cpu=$(( $(nproc) - 1 ))

mkdir -p "$run"
# Both builds in front of the peers' backends, as bench/proxy.sh configures lockstep: a plain
# listener (h1 and h2c) and a TLS one with the peers' certificate.
conf() { # conf PLAIN_PORT TLS_PORT ADMIN_PORT
  sed -n '/^listeners:/q;p' "$here/proxy.yaml"
  cat <<YAML
listeners:
  - name: http
    bind: "127.0.0.1:$1"
  - name: https
    bind: "127.0.0.1:$2"
    tls:
      certificates:
        - { cert: "$run/tls/farm.crt", key: "$run/tls/farm.key" }
YAML
  sed -n '/^routes:/,$p' "$here/proxy.yaml" | sed "s/127.0.0.1:9993/127.0.0.1:$3/"
}

# One backend instance, pinned with the clients: a second one left from another run would
# share the ports (SO_REUSEPORT) unpinned and preempt the builds (see bench/proxy.sh).
"$peer" stop backends >/dev/null 2>&1 || true
pkill -f "[n]ginx -c $run/backends.nginx.conf" 2>/dev/null && sleep 0.5 || true
"$peer" start backends >/dev/null
for m in $(pgrep -f "nginx -c $run/backends.nginx.conf"); do
  for p in "$m" $(pgrep -P "$m"); do taskset -a -p -c "$last_cpu" "$p" >/dev/null 2>&1 || true; done
done
[ -f "$run/tls/farm.crt" ] || { echo "no $run/tls/farm.crt: start a peer once (peer start nginx)" >&2; exit 1; }
conf 8090 8097 9993 >"$run/ab-a.yaml"
conf 8190 8197 9994 >"$run/ab-b.yaml"
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; }
RUST_LOG=warn "$a" serve -c "$run/ab-a.yaml" --workers 1 2>"$run/ab-a.log" & pa=$!
case $b in
  nginx | haproxy) # a peer: its ports (plain, h2c, TLS), all its processes counted
    WORKERS=1 "$peer" start "$b" >/dev/null
    trap 'kill $pa 2>/dev/null; "$peer" stop '"$b"'; "$peer" stop backends >/dev/null 2>&1' EXIT
    if [ "$b" = nginx ]; then
      ports=(8091 8095 8093); master=$(cat "$run/proxy.nginx.pid"); pb="$master $(pgrep -P "$master" | tr '\n' ' ')"
    else
      ports=(8092 8096 8094); pb=$(cat "$run/haproxy.pid")
    fi ;;
  *)
    RUST_LOG=warn "$b" serve -c "$run/ab-b.yaml" --workers 1 2>"$run/ab-b.log" & pb=$!
    trap 'kill $pa $pb 2>/dev/null; "$peer" stop backends >/dev/null 2>&1' EXIT
    ports=(8190 8190 8197) ;;
esac
for port in 8090 8097 "${ports[@]}"; do wait_port "$port"; done
for p in $pa $pb; do
  kill -0 "$p" || { echo "a server did not start:" >&2; cat "$run"/ab-*.log >&2; exit 1; }
  for t in /proc/$p/task/*; do taskset -p -c 0 "${t##*/}" >/dev/null; done
done
case $mode in
  h1) ua=http://127.0.0.1:8090/; ub=http://127.0.0.1:${ports[0]}/ ;;
  h2c) ua=http://127.0.0.1:8090/; ub=http://127.0.0.1:${ports[1]}/ ;;
  h2) ua=https://127.0.0.1:8097/; ub=https://127.0.0.1:${ports[2]}/ ;;
  *) echo "MODE is h1, h2c or h2" >&2; exit 1 ;;
esac
# load URL SECONDS -> "requests rate" (or "failed")
load() {
  if [ "$mode" = h1 ]; then
    taskset -c "$last_cpu" wrk -t1 -c50 -d"$2"s "$1" |
      awk '/requests in/ {n=$1} /Requests\/sec/ {r=$2} /Non-2xx|Socket errors/ {f=1} END {print f ? "failed" : n " " r}'
  else
    taskset -c "$last_cpu" h2load -c 10 -m 10 -D "$2" "$1" 2>/dev/null |
      awk '/^finished in/ {gsub(/,/, ""); r=$4} /^requests:/ {n=$8; f=$10} END {print (f != 0) ? "failed" : n " " r}'
  fi
}
# ticks PID... -> user and system clock ticks of all their threads
ticks() { for p in "$@"; do cat /proc/"$p"/task/*/stat; done | awk '{sub(/^.*\) /, ""); u += $12; s += $13} END {print u, s}'; }
hz=$(getconf CLK_TCK)
for u in $ua $ub; do load "$u" 2 >/dev/null; done # warm
echo "## A/B, $mode: A=$a B=$b ($(date -u +%F), ${secs}s rounds, both on core 0 at once)"
ratios=
for r in $(seq "$rounds"); do
  read -r ua0 sa0 < <(ticks $pa); read -r ub0 sb0 < <(ticks $pb) # $pb unquoted: a peer's processes
  load "$ua" "$secs" >"$run/ab-ra" & j1=$!
  load "$ub" "$secs" >"$run/ab-rb" & j2=$!
  wait $j1 $j2
  read -r ua1 sa1 < <(ticks $pa); read -r ub1 sb1 < <(ticks $pb)
  read -r na ra <"$run/ab-ra"; read -r nb rb <"$run/ab-rb"
  [ "$na" != failed ] && [ "$nb" != failed ] || { echo "round $r: requests failed" >&2; exit 1; }
  # CPU µs per request (and its user part); the ratio B/A: above 1, A spends less per request.
  read -r a_us a_user b_us b_user ratio < <(awk -v hz=$hz -v na=$na -v nb=$nb \
    -v ua=$((ua1 - ua0)) -v sa=$((sa1 - sa0)) -v ub=$((ub1 - ub0)) -v sb=$((sb1 - sb0)) \
    'BEGIN {k = 1e6 / hz; a = (ua + sa) * k / na; b = (ub + sb) * k / nb
            printf "%.2f %.2f %.2f %.2f %.3f\n", a, ua * k / na, b, ub * k / nb, b / a}')
  ratios+="$ratio "
  echo "round $r: A $a_us us/req (user $a_user; $ra req/s), B $b_us us/req (user $b_user; $rb req/s), CPU per request B/A $ratio"
done
echo "CPU per request B/A, median: $(echo $ratios | tr ' ' '\n' | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}') (above 1: A spends less)"
