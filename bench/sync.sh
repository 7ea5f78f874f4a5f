#!/usr/bin/env bash
# Sync benchmark: flip skew across eight agents (two with clocks an hour off), wrong or mixed
# answers under load during flips, and the bytes a one-file change moves in a 10 000-file release.
#
#   bench/sync.sh
#
# 1. Skew: a hub (`lockstep serve`, cadence 1s, lead 1s) and AGENTS (8) agents on loopback, the
#    last two under `faketime -f +1h` and `faketime -f -1h`. FLIPS (20) releases are published,
#    each with `--at +2s` on the hub's clock; `flipwatch` (examples/flipwatch.rs) polls every
#    agent from outside, one thread per agent over a kept-alive connection, and notes for each
#    the window [last poll answered with the old release, first answered with the new one].
#    It is told each activation instant (at.txt, from `lockstep publish`'s answer) and polls
#    back to back from 2 ms before it until it sees the flip, so a window is one or two poll
#    round trips (~0.1 ms) wide; between flips it polls every 20 ms.
#    Skew of a flip: the spread of the windows' midpoints, and the least spread the windows
#    allow; the windows' width is the resolution (~1 ms: at the activation eight agents and
#    eight pollers want two cores). Finer, and as much from outside the agents: a uprobe on the
#    agents' flip (the `make_active` store, kept out of line for it) timestamps each agent's
#    flip on the kernel's monotonic clock (a tracefs instance with `trace_clock` mono; the
#    agents under faketime cannot shift it); the skew of a flip is the spread of those eight
#    instants, each checked to lie inside its agent's window from outside. Needs root and
#    uprobes (TRACE=0 skips it).
# 2. Load: `wrk` on two agents (one skewed) during LOAD_FLIPS (5) flips; a Lua check counts
#    answers whose body does not belong to the release in their X-Lockstep-Release header
#    (mixed) and non-200 answers; flipwatch measures the skew of these flips under the load.
# 3. Transfer: publish a 10 000-file release, change one file, publish again; report what the
#    publisher uploaded and what each agent fetched (its lockstep_agent_fetched_* metrics).
#
# Everything shares two cores, so the agents, the pollers and wrk compete: read the skew as an
# upper bound. Env: AGENTS, FLIPS, LOAD_FLIPS, FILES (10000), KEEP=1 keeps the working
# directory, EXP_RENICE=1 runs the hub's threads at nice 0 instead of its control thread's 10
# (the experiment in BENCHMARKS.md), BIN=PATH runs that lockstep binary instead of building
# one (A/B runs of two builds).
# CLUSTER=1: two appliances' hubs sharing the state in a three-member etcd (`sync.cluster`,
# Debian etcd-server), the agents given both hubs, publishing to the first; at the end the
# first hub is killed (kill -9) a second before an activation: that flip's skew, seen from
# outside, and the time until every agent uses the second hub are reported.
# TRUST=1: the farm as it runs between hosts: a farm CA (`lockstep ca`), mutual TLS on every
# link (hub, agents, publisher each with its own certificate), releases signed
# (`lockstep keygen`, `publish --sign-key`) and verified by every agent (`trusted_keys`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
agents=${AGENTS:-8}
flips=${FLIPS:-20}
load_flips=${LOAD_FLIPS:-5}
files=${FILES:-10000}
command -v faketime >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }

target=${CARGO_TARGET_DIR:-$root/target}/release
if [ -n "${BIN:-}" ]; then
  bin=$(realpath "$BIN")
else
  (cd "$root" && cargo build --release --quiet)
  bin=$target/lockstep
fi
(cd "$root" && cargo build --release --quiet --example flipwatch)
watch=$target/examples/flipwatch

work=$(mktemp -d /tmp/lockstep-sync-bench.XXXXXX)
pids=()
# faketime runs its agent as a child: kill by the working directory in the command lines too.
cleanup_trace=:
cleanup() { $cleanup_trace 2>/dev/null || true; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; pkill -f "$work/" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > agent.token
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > publish.token
hub_port=7790
cluster_yaml=""; hub_list=""
if [ -n "${CLUSTER:-}" ]; then
  command -v etcd >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }
  initial=""; endpoints=""
  for m in 0 1 2; do
    initial+="${initial:+,}m$m=http://127.0.0.1:$((23800 + m))"
    endpoints+="${endpoints:+, }http://127.0.0.1:$((23790 + m))"
  done
  for m in 0 1 2; do
    etcd --name "m$m" --data-dir "$work/etcd-$m" \
      --listen-client-urls "http://127.0.0.1:$((23790 + m))" --advertise-client-urls "http://127.0.0.1:$((23790 + m))" \
      --listen-peer-urls "http://127.0.0.1:$((23800 + m))" --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + m))" \
      --initial-cluster "$initial" --initial-cluster-state new --log-level warn 2> "etcd-$m.log" &
    pids+=($!)
  done
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:23790/health | grep -q true && break; sleep 0.1; done
  cluster_yaml="  cluster: { etcd: [$endpoints], name: NAME }"
fi
hub_tls=""; agent_tls() { :; }; pub_args=(--token-file publish.token); sign_args=()
curl_auth=(-H "Authorization: Bearer $(cat agent.token)")
scheme=http
if [ -n "${TRUST:-}" ]; then
  scheme=https
  "$bin" ca init --dir ca --farm bench > /dev/null
  mkdir -p pki
  "$bin" ca issue lb --role hub --ip 127.0.0.1 --dir ca --out pki > /dev/null
  "$bin" ca issue ci --role publisher --dir ca --out pki > /dev/null
  for i in $(seq 1 "$agents"); do "$bin" ca issue "web-$i" --role agent --ip 127.0.0.1 --dir ca --out pki > /dev/null; done
  "$bin" keygen --out publisher.key > /dev/null
  hub_tls="  tls:
    certificates: [{ cert: pki/lb.crt, key: pki/lb.key }]
    client_ca: ca/ca.crt
    crl: ca/crl.pem
  trusted_keys: [publisher.key.pub]"
  agent_tls() { printf 'tls: { ca: %s/ca/ca.crt, crl: %s/ca/crl.pem, cert: %s/pki/web-%s.crt, key: %s/pki/web-%s.key }\ntrusted_keys: [%s/publisher.key.pub]\n' "$work" "$work" "$work" "$1" "$work" "$1" "$work"; }
  pub_args=(--ca-file ca/ca.crt --cert pki/ci.crt --key pki/ci.key)
  sign_args=(--sign-key publisher.key)
  curl_auth=(--cacert ca/ca.crt --cert pki/ci.crt --key pki/ci.key)
fi
cat > hub.yaml <<EOF
sync:
  bind: "127.0.0.1:$hub_port"
  store: hub-store
  cadence: 1s
  lead: 1s
  agent_token_file: agent.token
  publish_token_file: publish.token
$hub_tls
${cluster_yaml/NAME/hub-a}
admin:
  bind: "127.0.0.1:9990"
EOF
NO_COLOR=1 "$bin" serve --workers 1 -c hub.yaml 2> hub.log &
hub_pid=$!
pids+=($hub_pid)
hub=$scheme://127.0.0.1:$hub_port
hub_list="\"$hub\""
if [ -n "${CLUSTER:-}" ]; then
  sed -e "s/:$hub_port\"/:$((hub_port + 1))\"/" -e 's/store: hub-store/store: hub-store-b/' \
      -e 's/name: hub-a/name: hub-b/' -e 's/127.0.0.1:9990/127.0.0.1:9991/' hub.yaml > hub-b.yaml
  NO_COLOR=1 "$bin" serve --workers 1 -c hub-b.yaml 2> hub-b.log &
  pids+=($!)
  hub_list="[\"$hub\", \"$scheme://127.0.0.1:$((hub_port + 1))\"]"
fi

ports=()
for i in $(seq 1 "$agents"); do
  port=$((8200 + i))
  ports+=("$port")
  cat > "agent-$i.yaml" <<EOF
name: web-$i
hub: $hub_list
token_file: agent.token
store: agent-$i
serve: "127.0.0.1:$port"
$(agent_tls "$i")
EOF
  clock=()
  if [ "$i" -eq "$agents" ]; then clock=(faketime -f -1h); elif [ "$i" -eq $((agents - 1)) ]; then clock=(faketime -f +1h); fi
  NO_COLOR=1 "${clock[@]}" "$bin" agent -c "$work/agent-$i.yaml" 2> "agent-$i.log" &
  pids+=($!)
done
addrs=(); for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done

publish() { # DIR [AT] -> release id; its activation instant (µs since the epoch) goes to at.txt
  local at_args=(); [ -n "${2:-}" ] && at_args=(--at "$2")
  "$bin" publish --hub "$hub" "${pub_args[@]}" "${sign_args[@]}" "${at_args[@]}" "$1" > publish.last
  cat publish.last >> publish.log
  at=$(sed -n 's/^staged: activates at \([^ ]*\) .*/\1/p' publish.last)
  if [ -n "$at" ]; then date -u -d "$at" +%s%6N >> at.txt; fi
  awk '/^release /{print $2}' publish.last
}
wait_all() { # RELEASE
  for _ in $(seq 1 400); do
    ok=0
    for p in "${ports[@]}"; do
      r=$(curl -sI "http://127.0.0.1:$p/" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-lockstep-release"{print $2}')
      [ "$r" = "$1" ] && ok=$((ok + 1))
    done
    [ "$ok" -eq "${#ports[@]}" ] && return 0
    sleep 0.05
  done
  echo "not every agent serves $1" >&2; return 1
}
site() { # N -> a small site whose every file names flip N
  rm -rf site; mkdir -p site/css
  printf '<h1>flip %s</h1>\n' "$1" > site/index.html
  printf 'body{--flip:%s}\n' "$1" > site/css/site.css
}

sleep 1
if [ -n "${EXP_RENICE:-}" ]; then for t in /proc/$hub_pid/task/*; do renice -n 0 -p "${t##*/}" >/dev/null; done; fi
site 0; r=$(publish site +2s); wait_all "$r"
flip_trace=""
if [ "${TRACE:-1}" != 0 ]; then
  # The uprobe: the file offset of make_active's symbol in the agents' binary.
  tr=/sys/kernel/tracing
  [ -w "$tr/uprobe_events" ] || { echo "uprobes: $tr/uprobe_events is not writable (root and a kernel with uprobes; TRACE=0 skips it)" >&2; exit 1; }
  sym=$(nm "$bin" | awk '$3 ~ /8activate11make_active/ && !found {print $1; found = 1}')
  [ -n "$sym" ] || { echo "no make_active symbol in $bin (stripped?)" >&2; exit 1; }
  off=$(readelf -lW "$bin" | python3 -c '
import sys
a = int(sys.argv[1], 16)
for l in sys.stdin:
    f = l.split()
    if f[:1] == ["LOAD"] and int(f[2], 16) <= a < int(f[2], 16) + int(f[5], 16):
        print(hex(a - int(f[2], 16) + int(f[1], 16))); break' "$sym")
  [ -n "$off" ] || { echo "make_active (0x$sym) is in no LOAD segment of $bin" >&2; exit 1; }
  flip_trace=$tr/instances/lockstep-flips
  rmdir "$flip_trace" 2>/dev/null || true
  echo "-:lockstep_bench/flip" >> "$tr/uprobe_events" 2>/dev/null || true
  echo "p:lockstep_bench/flip $bin:$off" >> "$tr/uprobe_events"
  mkdir "$flip_trace"
  echo mono > "$flip_trace/trace_clock"
  echo 1 > "$flip_trace/options/record-tgid"
  echo 1 > "$flip_trace/events/lockstep_bench/flip/enable"
  untrace() { echo 0 > "$flip_trace/events/lockstep_bench/flip/enable"; rmdir "$flip_trace"; echo "-:lockstep_bench/flip" >> "$tr/uprobe_events"; }
  cleanup_trace=untrace
fi
echo "== skew: $agents agents (web-$((agents - 1)) at +1h, web-$agents at -1h), $flips flips =="
: > at.txt
"$watch" --seconds $((flips * 3 + 5)) --at-file at.txt "${addrs[@]}" > flips.jsonl &
watch_pid=$!
sleep 1
for n in $(seq 1 "$flips"); do
  site "$n"; r=$(publish site +2s); echo "$r" >> releases.txt
  sleep 3
done
wait "$watch_pid"
cat > skew.py <<'EOF'
# skew.py AGENTS RELEASES FLIPS_JSONL [TRACE AT]: the skew of each flip as flipwatch saw it,
# and, given the uprobe's trace and the activation instants, as the kernel timestamped it.
import json, re, sys
agents = int(sys.argv[1])
releases = [l.strip() for l in open(sys.argv[2]) if l.strip()]
seen, summary, mono_start_us = {}, [], None
for line in open(sys.argv[3]):
    d = json.loads(line)
    if "release" in d:
        seen.setdefault(d["release"], {})[d["agent"]] = (d["lo_us"], d["hi_us"])
    elif "mono_start_ns" in d:
        mono_start_us, wall_start_us = d["mono_start_ns"] / 1000, d["wall_start_ns"] / 1000
    else:
        summary.append(d)
mids, lows, widths, missing = [], [], [], []
for r in releases:
    got = seen.get(r, {})
    if len(got) < agents:
        missing.append(sorted(set(range(agents)) - set(got)))
        continue
    mid = [(lo + hi) / 2 for lo, hi in got.values()]
    mids.append(max(mid) - min(mid))
    # The least spread the observations allow: the latest possible first flip vs the
    # earliest possible last one.
    lows.append(max(0, max(lo for lo, _ in got.values()) - min(hi for _, hi in got.values())))
    widths.extend(hi - lo for lo, hi in got.values())
for xs in (mids, lows, widths):
    xs.sort()
pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
ms = lambda x: f"{x / 1000:.3f} ms"
print(f"flips observed on all agents: {len(mids)}/{len(releases)}" + (f" (agents missing a flip: {missing})" if missing else ""))
print(f"skew, window midpoints:        p50 {ms(pick(mids, .5))}  p99 {ms(pick(mids, .99))}  max {ms(mids[-1] if mids else 0)}")
print(f"skew, least the windows allow: p50 {ms(pick(lows, .5))}  p99 {ms(pick(lows, .99))}  max {ms(lows[-1] if lows else 0)}")
rt = sorted(s["median_round_trip_us"] for s in summary)
print(f"resolution: observation window p50 {ms(pick(widths, .5))}  p99 {ms(pick(widths, .99))}  max {ms(widths[-1] if widths else 0)}; median poll round trip {rt[0]}..{rt[-1]} us")
if len(sys.argv) < 5:
    sys.exit()
# The uprobe's events: "<comm>-<tid> (<tgid>) [cpu] <flags> <seconds>: flip: ...", seconds on
# CLOCK_MONOTONIC; the process is an agent, told apart by its config file's name.
agent_of, flips = {}, {}
for line in open(sys.argv[4]):
    m = re.search(r"-\d+\s+\(\s*(\d+)\)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): flip:", line)
    if not m:
        continue
    tgid = int(m.group(1))
    if tgid not in agent_of:
        try:
            cmd = open(f"/proc/{tgid}/cmdline", "rb").read().decode(errors="replace")
            agent_of[tgid] = int(re.search(r"agent-(\d+)\.yaml", cmd).group(1)) - 1
        except (OSError, AttributeError):
            agent_of[tgid] = None
    if agent_of[tgid] is not None:
        flips.setdefault(agent_of[tgid], []).append(float(m.group(2)) * 1e6 - mono_start_us)
# Each agent's traced flip must lie in its window from outside (the old answer's poll sent
# before it, the new answer received after it); 20 µs of slack for the probe's own trap.
# Lateness from outside: a traced flip after the activation instant nearest to it (at.txt: µs
# since the epoch on the hub's clock, which is this host's), per agent.
due = [int(l) - wall_start_us for l in open(sys.argv[5]) if l.strip()]
late = {}
skews, inside, outside, untraced = [], 0, [], 0
for r in releases:
    got = seen.get(r, {})
    at = []
    for a, (lo, hi) in got.items():
        hits = [t for t in flips.get(a, []) if lo - 20 <= t <= hi + 20]
        if hits:
            inside += 1
            at.append(hits[0])
            late.setdefault(a, []).append(hits[0] - min(due, key=lambda d: abs(d - hits[0])))
        else:
            near = min(flips.get(a, [float("inf")]), key=lambda t: abs(t - (lo + hi) / 2))
            outside.append((r[:12], a, lo, hi, near))
    if len(at) == agents:
        skews.append(max(at) - min(at))
    else:
        untraced += 1
skews.sort()
us = lambda x: f"{x:.0f} us"
print(f"skew, kernel timestamps of the flips (uprobe): p50 {us(pick(skews, .5))}  p99 {us(pick(skews, .99))}  max {us(skews[-1] if skews else 0)}  over {len(skews)} flips ({untraced} not traced on every agent)")
print(f"  each timestamp inside its agent's window from outside: {inside} of {inside + len(outside)}" + (f"; outside: {outside[:4]}" if outside else ""))
# Every flip's lateness per agent, for a closer look (KEEP=1 keeps the working directory): beside
# the agents' own "flipped ... lateness_us" log lines, the difference is each one's clock error.
with open(sys.argv[3] + ".lateness", "w") as f:
    for a in sorted(late):
        f.write(f"{a + 1} " + " ".join(f"{x:.0f}" for x in late[a]) + "\n")
print("  lateness from outside per agent (traced flip - activation instant), min / median / max:")
for a in sorted(late):
    xs = sorted(late[a])
    print(f"    agent {a + 1}: {us(xs[0])} / {us(pick(xs, .5))} / {us(xs[-1])}")
EOF
python3 skew.py "$agents" releases.txt flips.jsonl ${flip_trace:+"$flip_trace/trace" at.txt}
echo "hub: offsets and lateness as the agents reported them:"
"$bin" status --hub "$hub" "${pub_args[@]}" | sed -n '1,20p'

echo "== load: wrk on web-1 and web-$((agents - 1)) during $load_flips flips =="
cat > check.lua <<'EOF'
-- Per wrk thread: remember which body each release served; a release seen with two different
-- bodies is a mixed answer. done() sums the threads' counters.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) tags = {}; mixed = 0; bad = 0; total = 0 end
function response(status, headers, body)
  total = total + 1
  if status ~= 200 then bad = bad + 1; return end
  local rel = headers["X-Lockstep-Release"] or headers["x-lockstep-release"] or ""
  local tag = string.match(body, "flip (%d+)") or "?"
  if tags[rel] == nil then tags[rel] = tag elseif tags[rel] ~= tag then mixed = mixed + 1 end
end
function done(summary, latency, requests)
  local m, b, t = 0, 0, 0
  for _, th in ipairs(threads) do m = m + th:get("mixed"); b = b + th:get("bad"); t = t + th:get("total") end
  io.write(string.format("checked %d answers: %d mixed (body of another release), %d not 200\n", t, m, b))
end
EOF
dur=$((load_flips * 3 + 2))
"$watch" --seconds "$dur" --at-file at.txt "${addrs[@]}" > flips-load.jsonl &
wrk_pids=("$!")
for p in "${ports[0]}" "${ports[$((agents - 2))]}"; do
  wrk -t1 -c4 -d"${dur}s" -s check.lua "http://127.0.0.1:$p/index.html" > "wrk-$p.txt" 2>&1 &
  wrk_pids+=("$!")
done
for n in $(seq 101 $((100 + load_flips))); do site "$n"; publish site +2s >> releases-load.txt; sleep 3; done
for j in "${wrk_pids[@]}"; do wait "$j" 2>/dev/null || true; done
sleep 1
for p in "${ports[0]}" "${ports[$((agents - 2))]}"; do echo "agent :$p: $(grep -E 'Requests/sec' "wrk-$p.txt" | tr -s ' ')"; grep checked "wrk-$p.txt"; done
echo "skew of the flips under load (flipwatch on all $agents agents while wrk loads two):"
python3 skew.py "$agents" releases-load.txt flips-load.jsonl ${flip_trace:+"$flip_trace/trace" at.txt}
echo "hub: offsets and lateness as the agents reported them after the load:"
"$bin" status --hub "$hub" "${pub_args[@]}" | sed -n '1,20p'

echo "== transfer: $files-file release, then one file changed =="
rm -rf big; mkdir -p big
python3 - "$files" <<'EOF'
import os, sys
n = int(sys.argv[1])
for i in range(n):
    d = f"big/d{i // 500}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i}.html", "w") as f:
        f.write(f"<p>file {i}</p>\n" * 20)
EOF
fetched() { curl -s "http://127.0.0.1:${ports[0]}/.lockstep/metrics" | awk '/^lockstep_agent_fetched_bytes_total/{b=$2} /^lockstep_agent_fetched_blobs_total/{n=$2} END{printf "%d %d", b, n}'; }
# The agents' CPU (user+system, all of them, from /proc) while they stage and verify it.
agent_cpu() { for p in $(pgrep -f "$work/agent-"); do awk '{s += $14 + $15} END {print s}' "/proc/$p/stat"; done | awk '{s += $1} END {printf "%.2f", s / 100}'; }
cpu0=$(agent_cpu); t0=$(date +%s.%N)
r=$(publish big)
t1=$(date +%s.%N)
wait_all "$r"
set -- $(fetched); b0=$1; n0=$2
echo "first publish: $(grep -E '^files' publish.log | tail -1)"
echo "the $files-file release: publish (hash, upload${TRUST:+, sign}) took $(python3 -c "print(f'{$t1 - $t0:.2f}')") s; the agents spent $(python3 -c "print(f'{$(agent_cpu) - $cpu0:.2f}')") s of CPU staging it"
changed=big/d$(( files / 2 / 500 ))/f$(( files / 2 )).html
printf '<p>changed</p>\n' > "$changed"
r=$(publish big); wait_all "$r"
set -- $(fetched); b1=$1; n1=$2
echo "one file changed: $(grep -E '^files' publish.log | tail -1)"
manifest=$(curl -s "${curl_auth[@]}" "$hub/sync/v1/releases/$r" | wc -c)
echo "web-1 fetched $((n1 - n0)) blob(s), $((b1 - b0)) bytes of blobs, plus the manifest ($manifest bytes); the changed file is $(stat -c %s "$changed") bytes"

if [ -n "${CLUSTER:-}" ]; then
  echo "== failover: kill -9 of the agents' hub 1 s before an activation =="
  site 999; r=$(publish site +3s); echo "$r" > releases-kill.txt
  at_us=$(tail -n1 at.txt)
  "$watch" --seconds 8 --at-file at.txt "${addrs[@]}" > flips-kill.jsonl &
  kill_watch=$!
  # Until a second before the activation, on this host's clock (the hub's: same host).
  python3 -c "import time; time.sleep(max(0, ($at_us / 1e6 - 1) - time.time()))"
  t0=$(date +%s%N)
  kill -9 "$hub_pid"
  # Nothing else runs while the flip is watched: the move to the other hub is read afterwards
  # from the agents' own log times (those under faketime shifted back by their offset).
  wait "$kill_watch"
  echo "the flip a second after the kill, from outside (flipwatch on all $agents agents):"
  python3 skew.py "$agents" releases-kill.txt flips-kill.jsonl ${flip_trace:+"$flip_trace/trace" at.txt}
  python3 - "$t0" "$agents" <<'PY'
import datetime, re, sys
t0, agents = int(sys.argv[1]), int(sys.argv[2])
moved = []
for i in range(1, agents + 1):
    shift = {agents - 1: 3600, agents: -3600}.get(i, 0)   # faketime +1h / -1h
    for line in open(f"agent-{i}.log", errors="replace"):
        if "moved to the next" not in line:
            continue
        stamp = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d+)Z", line)
        if not stamp:
            continue
        t = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
        ns = int(t.timestamp()) * 10**9 + int(stamp.group(2).ljust(9, "0")[:9]) - shift * 10**9
        if ns >= t0 - 10**9:
            moved.append((ns - t0) / 1e9)
            break
print(f"{len(moved)} of {agents} agents moved to the other hub, the last {max(moved) if moved else float('nan'):.2f} s after the kill (their log times; the long poll is 25 s)")
PY
fi
