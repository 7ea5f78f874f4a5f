#!/usr/bin/env bash
# DNS response-rate limiting under a spoofed-source flood: what one prefix can make lockstep
# reflect, and whether a client elsewhere notices.
#
#   bench/dns-rrl.sh
#
# `lockstep serve` (release build) answers `www.farm.test` on 127.0.0.1:PORT with RRL at its
# defaults (200 answers/s per /24, slip 2). The flood comes from SOURCES (64) addresses inside
# 127.0.0.0/24, each socket bound to its own (on loopback that needs no spoofing: all of
# 127.0.0.0/8 is local), FLOOD_QPS (20000) queries/s in all; meanwhile a well-behaved client
# on 127.1.0.1 (another /24) asks CLIENT_QPS (50) queries/s, one at a time. Both run for
# DURATION (10) seconds. Prints, per prefix, what was sent and what came back (whole answers,
# truncated slips, nothing), and lockstep's own lockstep_dns_rrl_total. Everything shares the
# machine's cores, so the flood may not reach FLOOD_QPS: the sent column says what it did.
# Env: DURATION, SOURCES, FLOOD_QPS, CLIENT_QPS, PORT (5395), ADMIN_PORT (9395),
# BIN (a lockstep binary to use instead of building one).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
duration=${DURATION:-10}
sources=${SOURCES:-64}
flood_qps=${FLOOD_QPS:-20000}
client_qps=${CLIENT_QPS:-50}
port=${PORT:-5395}
admin_port=${ADMIN_PORT:-9395}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need python3 python3
need curl curl

if [ -z "${BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  BIN=${CARGO_TARGET_DIR:-$root/target}/release/lockstep
fi

work=$(mktemp -d /tmp/lockstep-dns-rrl.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cat >"$work/lockstep.yaml" <<EOF
dns:                                  # rrl: left out, so its defaults
  bind: "127.0.0.1:$port"
  zones:
    - name: farm.test
      records:
        - { name: www, addresses: ["10.0.0.1", "10.0.0.2", "10.0.0.3"] }
admin:
  bind: "127.0.0.1:$admin_port"
EOF
RUST_LOG=warn "$BIN" serve -c "$work/lockstep.yaml" 2>"$work/lockstep.log" &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin_port/ready" >/dev/null && break; sleep 0.1; done

# One client: `flood SOURCES QPS` from 127.0.0.1..SOURCES, or `client 1 QPS` from 127.1.0.1,
# paced to QPS for DURATION; prints "sent whole truncated".
cat >"$work/ask.py" <<'EOF'
import socket, struct, sys, time
mode, port, duration, n, qps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
query = lambda qid: struct.pack(">6H", qid, 0x0100, 1, 0, 0, 0) + b"\x03www\x04farm\x04test\x00\x00\x01\x00\x01"
got = {"whole": 0, "truncated": 0}
def count(reply):
    if len(reply) >= 12:
        got["truncated" if reply[2] & 0x02 else "whole"] += 1
def drain(socks):
    for s in socks:
        try:
            while True:
                count(s.recv(2048))
        except BlockingIOError:
            pass
addrs = [f"127.0.0.{i}" for i in range(1, n + 1)] if mode == "flood" else ["127.1.0.1"]
socks = []
for a in addrs:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, 0))
    s.setblocking(mode == "client")
    s.settimeout(1.0) if mode == "client" else None
    socks.append(s)
sent, start = 0, time.monotonic()
while (now := time.monotonic()) < start + duration:
    if mode == "client":
        socks[0].sendto(query(sent & 0xFFFF), ("127.0.0.1", port))
        sent += 1
        try:
            count(socks[0].recv(2048))
        except socket.timeout:
            pass
        time.sleep(max(0.0, start + sent / qps - time.monotonic()))
        continue
    due = min(int((now - start) * qps), sent + 256)
    while sent < due:
        try:
            socks[sent % n].sendto(query(sent & 0xFFFF), ("127.0.0.1", port))
        except BlockingIOError:
            pass
        sent += 1
    drain(socks)
end = time.monotonic() + 0.5
while time.monotonic() < end:
    drain(socks) if mode == "flood" else None
    time.sleep(0.01)
print(sent, got["whole"], got["truncated"])
EOF

python3 "$work/ask.py" client "$port" "$duration" 1 "$client_qps" >"$work/client.out" &
client=$!
python3 "$work/ask.py" flood "$port" "$duration" "$sources" "$flood_qps" >"$work/flood.out"
wait "$client"

echo "## DNS response-rate limiting"
echo
echo "\`bench/dns-rrl.sh\` (DURATION=$duration SOURCES=$sources FLOOD_QPS=$flood_qps CLIENT_QPS=$client_qps), RRL defaults (200/s per /24, slip 2), $(nproc) cores, $(date -u +%Y-%m-%d)."
echo
echo "| prefix | sources | queries sent | whole answers | whole/s | truncated (slip) | no answer |"
echo "|---|---:|---:|---:|---:|---:|---:|"
row() { # row PREFIX SOURCES FILE
  read -r sent whole tc <"$3"
  awk -v p="$1" -v n="$2" -v s="$sent" -v w="$whole" -v t="$tc" -v d="$duration" \
    'BEGIN {printf "| %s | %d | %d | %d | %.0f | %d | %d |\n", p, n, s, w, w / d, t, s - w - t}'
}
row "127.0.0.0/24 (flood)" "$sources" "$work/flood.out"
row "127.1.0.0/24 (client)" 1 "$work/client.out"
echo
echo "lockstep's counters:"
curl -s "http://127.0.0.1:$admin_port/metrics" | grep -E '^lockstep_dns_(rrl_total|queries_total)' | sed 's/^/    /'
