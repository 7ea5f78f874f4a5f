#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: the same figure on every
# run whatever the machine's noise (it counts; it does not time), so a change to the request
# path can be judged by a difference of a few per cent that no timed run here resolves. The
# kernel's share (about 60 % of the proxy's CPU on loopback) is not in it: read syscalls and
# wake-ups per request for that (`perf stat -e 'syscalls:sys_enter_*'`).
#
#   bench/callgrind.sh                          # target/release/lockstep, HTTP/1.1
#   BIN=/tmp/lockstep-before MODE=h2c bench/callgrind.sh
#
# Env: BIN, MODE (h1: h2load --h1 -c50 -m1; h2c: h2load -c10 -m10), N (20000 requests
# counted, after 2000 uncounted). Prints the total, the instructions per request and the top
# functions; the profile stays in $PEER_RUN/callgrind.<pid> for callgrind_annotate.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer=${PEER:-$root/../shared/peers/peer}
run=${PEER_RUN:-/tmp/lockstep-peers}
export PEER_RUN=$run
bin=${BIN:-$root/target/release/lockstep}
mode=${MODE:-h1}
n=${N:-20000}
for tool in valgrind:valgrind h2load:nghttp2-client; do
  command -v "${tool%%:*}" >/dev/null || { echo "${tool%%:*} is missing (Debian ${tool#*:})" >&2; exit 1; }
done
case $mode in
  h1) load=(h2load --h1 -c 50 -m 1) ;;
  h2c) load=(h2load -c 10 -m 10) ;;
  *) echo "MODE is h1 or h2c" >&2; exit 1 ;;
esac
mkdir -p "$run"
sed 's/127.0.0.1:9993/127.0.0.1:9995/; s/127.0.0.1:8090/127.0.0.1:8290/' "$here/proxy.yaml" >"$run/callgrind.yaml"
"$peer" stop backends >/dev/null 2>&1 || true
"$peer" start backends >/dev/null
out=$run/callgrind.out
rm -f "$out"*
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
  "$bin" serve -c "$run/callgrind.yaml" --workers 1 2>"$run/callgrind.log" &
vg=$!
trap 'kill $vg 2>/dev/null; "$peer" stop backends >/dev/null 2>&1' EXIT
for _ in $(seq 600); do (echo >/dev/tcp/127.0.0.1/8290) 2>/dev/null && break; sleep 0.1; done
url=http://127.0.0.1:8290/
"${load[@]}" -n 2000 "$url" >/dev/null 2>&1 # warm: pools filled, first-use paths taken
callgrind_control -i on "$vg" >/dev/null 2>&1
done_n=$("${load[@]}" -n "$n" "$url" 2>/dev/null | awk '/^requests:/ {print $8}')
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 1
[ "$done_n" = "$n" ] || { echo "only $done_n of $n requests succeeded" >&2; exit 1; }
profile=$(ls -S "$out"* | head -1)
total=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(/,/, "", $1); print $1}')
echo "## callgrind, $mode, $(basename "$bin") ($(date -u +%F)): $total instructions for $n requests, $(( total / n )) per request"
callgrind_annotate "$profile" 2>/dev/null | awk '/file:function/ {p=1; getline; next} p && NF' | head -15 |
  sed 's#/root/.cargo/registry/src/index.crates.io-[0-9a-f]*/##'
echo "(profile: $profile)"
