#!/usr/bin/env bash
# Forward benchmark: how long after one file is edited on one machine every other machine serves
# the new content — lockstep's `watch` in `mode: immediate` against lsyncd + rsync.
#
#   bench/forward.sh
#
# 1. lsyncd (the peer, used as it is): `../shared/peers/peer start lsyncd` replicates
#    $PEER_RUN/lsyncd/src to lsyncd/dst-1 and lsyncd/dst-2 with rsync at its smallest batching
#    delay (delay = 0). The edited file is src/page.html; the targets are the two copies, read
#    as files.
# 2. lockstep: a hub (`lockstep serve`, only for the agents' registry and a base release) and
#    three agents on loopback, each watching its own aN/edit in `mode: immediate` (debounce
#    DEBOUNCE). The edited file is a1/edit/page.html; the targets are agents 2 and 3, polled
#    with `GET /page.html` over HTTP (what a client would see, not a file on their disks).
# Each side gets EDITS (100) single-file edits by `editwatch` (examples/editwatch.rs): write
# the file in place (truncate + write + close), then poll every target (one thread each,
# POLL_US between polls) until it returns exactly the new bytes; the edit's latency is the time
# from just before the write until the last target serves it; PAUSE_MS between edits; an edit
# not everywhere within TIMEOUT_MS is a failure. The edits run in ROUNDS (4) interleaved rounds
# (lsyncd then lockstep, then lockstep then lsyncd, …); each round prints its line, then one
# line per side over all its edits (nearest-rank percentiles: with 100 edits p99 is the 99th
# smallest) and lockstep's p99 / lsyncd's p99. Target: that ratio below 1.
#
# The page's size changes by a few bytes from one edit to the next (SIZE + edit mod 16): rsync
# skips a file whose size and whole-second mtime match the copy's, so lsyncd would miss about
# every other same-size edit made within a second (SAME_SIZE=1 shows it: those edits time out).
#
# Caveats: everything (three agents, the hub, lsyncd and its rsyncs, the pollers) shares the two
# cores; an observed time includes up to one poll period (POLL_US plus a round trip, ~0.1–0.3
# ms) — the lsyncd targets are polled with a file read, the lockstep ones over HTTP, which costs
# a loopback round trip more. Before measuring, a seed page is written and must reach both
# targets (SEED_TIMEOUT seconds), so a build without the watcher fails here instead of timing
# out 100 times. Before it, the hub publishes a base release (index.html, also in every aN/edit,
# as in an editor's checkout of the site); BASE=0 skips it.
#
# TRUST=1: the lockstep side as it runs between hosts: a farm CA, mutual TLS on every link
# (agents reach each other over TLS with their own certificates), changesets signed by their
# origin and checked by every receiver, the base release signed by a publisher key.
#
# Env: EDITS (100), ROUNDS (4), PAUSE_MS (100), POLL_US (100), TIMEOUT_MS (10000), SIZE (2048:
# bytes of the edited page, plus 0–15), SAME_SIZE=1, DEBOUNCE (2ms — lockstep's window, as small as lsyncd's `delay = 0`; the agent's default is 50ms; empty: no `debounce:` key),
# SEED_TIMEOUT (20), BASE (1), SKIP_LOCKSTEP=1 / SKIP_LSYNCD=1 (measure one side only),
# LOCKSTEP_BIN (use this binary instead of building one), PEER_RUN (/tmp/lockstep-peers, the
# peer's directory), KEEP=1 keeps the working directory (raw-*.txt: every edit's times).
# Processes of an earlier run that was killed are stopped at the start (by the pids it noted in
# /tmp/lockstep-forward-bench.pids), and so is an lsyncd peer left running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
edits=${EDITS:-100}
rounds=${ROUNDS:-4}
pause_ms=${PAUSE_MS:-100}
poll_us=${POLL_US:-100}
timeout_ms=${TIMEOUT_MS:-10000}
size=${SIZE:-2048}
debounce=${DEBOUNCE-2ms}
seed_timeout=${SEED_TIMEOUT:-20}
base=${BASE:-1}
skip_lockstep=${SKIP_LOCKSTEP:-}
skip_lsyncd=${SKIP_LSYNCD:-}
peer=$root/../shared/peers/peer
export PEER_RUN=${PEER_RUN:-/tmp/lockstep-peers}
lsrc=$PEER_RUN/lsyncd
if [ "$rounds" -lt 1 ] || [ "$edits" -lt "$rounds" ]; then echo "forward.sh: need EDITS >= ROUNDS >= 1" >&2; exit 2; fi

(cd "$root" && cargo build --release --quiet --example editwatch)
target=${CARGO_TARGET_DIR:-$root/target}/release
watch=$target/examples/editwatch
bin=${LOCKSTEP_BIN:-$target/lockstep}
if [ -z "$skip_lockstep" ] && [ -z "${LOCKSTEP_BIN:-}" ]; then (cd "$root" && cargo build --release --quiet); fi

# Processes of an earlier run that did not get cleaned up (killed script): their pids are in
# $pidfile; kill those whose command line still names a working directory of this benchmark.
pidfile=/tmp/lockstep-forward-bench.pids
if [ -f "$pidfile" ]; then
  while read -r p; do
    if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q 'lockstep-forward-bench\.'; then kill "$p" 2>/dev/null || true; fi
  done < "$pidfile"
  rm -f "$pidfile"
fi
if [ -z "$skip_lsyncd" ] && [ -f "$PEER_RUN/lsyncd.pid" ]; then
  echo "stopping an lsyncd peer left running (pid $(cat "$PEER_RUN/lsyncd.pid"))"
  "$peer" stop lsyncd
fi

work=$(mktemp -d /tmp/lockstep-forward-bench.XXXXXX)
pids=()
lsyncd_started=
started() { pids+=("$1"); echo "$1" >> "$pidfile"; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$lsyncd_started" ]; then "$peer" stop lsyncd; fi
  wait 2>/dev/null || true
  rm -f "$pidfile"
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# until SECONDS CMD…: true as soon as CMD succeeds, false after SECONDS.
until_ok() {
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ "$SECONDS" -lt "$end" ] || return 1; sleep 0.05; done
}
same_file() { cmp -s "$1" "$2"; }
serves() { curl -s --max-time 2 "$1" | cmp -s - "$2"; } # URL FILE

echo "== forward: $edits single-file edits in $rounds rounds, ${pause_ms} ms apart, ${size}-byte page, poll every ${poll_us} us =="
printf '<p>seed %s</p>\n' "$work" > seed.html
echo "lockstep $(cd "$root" && git describe --always --dirty 2>/dev/null || echo '?'), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%M:%SZ)"

if [ -z "$skip_lsyncd" ]; then
  "$peer" start lsyncd
  lsyncd_started=1
  cp seed.html "$lsrc/src/page.html"
  for d in dst-1 dst-2; do
    until_ok "$seed_timeout" same_file seed.html "$lsrc/$d/page.html" || {
      echo "forward.sh: lsyncd did not copy the seed file to $d within ${seed_timeout}s; its log:" >&2
      tail -20 "$PEER_RUN/lsyncd.log" >&2; exit 1; }
  done
  echo "lsyncd: $lsrc/src -> dst-1, dst-2 (seed file copied)"
fi

if [ -z "$skip_lockstep" ]; then
  [ -x "$bin" ] || { echo "forward.sh: no lockstep binary at $bin" >&2; exit 1; }
  (umask 077
   head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > agent.token
   head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > publish.token)
  hub=http://127.0.0.1:7791
  hub_tls=""; agent_tls() { :; }; pub_args=(--token-file publish.token)
  hub_auth=(-H "Authorization: Bearer $(cat agent.token)")
  if [ -n "${TRUST:-}" ]; then
    hub=https://127.0.0.1:7791
    "$bin" ca init --dir ca --farm bench > /dev/null
    mkdir -p pki
    "$bin" ca issue lb --role hub --ip 127.0.0.1 --dir ca --out pki > /dev/null
    "$bin" ca issue ci --role publisher --dir ca --out pki > /dev/null
    for i in 1 2 3; do "$bin" ca issue "a$i" --role agent --ip 127.0.0.1 --dir ca --out pki > /dev/null; done
    "$bin" keygen --out publisher.key > /dev/null
    hub_tls="  tls:
    certificates: [{ cert: pki/lb.crt, key: pki/lb.key }]
    client_ca: ca/ca.crt
    crl: ca/crl.pem"
    agent_tls() { printf 'tls: { ca: %s/ca/ca.crt, crl: %s/ca/crl.pem, cert: %s/pki/a%s.crt, key: %s/pki/a%s.key }\ntrusted_keys: [%s/publisher.key.pub]\n' "$work" "$work" "$work" "$1" "$work" "$1" "$work"; }
    pub_args=(--ca-file ca/ca.crt --cert pki/ci.crt --key pki/ci.key --sign-key publisher.key)
    hub_auth=(--cacert ca/ca.crt --cert pki/ci.crt --key pki/ci.key)
  fi
  cat > hub.yaml <<EOF
sync:
  bind: "127.0.0.1:7791"
  store: hub-store
  cadence: 1s
  lead: 1s
  agent_token_file: agent.token
  publish_token_file: publish.token
$hub_tls
admin:
  bind: "127.0.0.1:9991"
EOF
  NO_COLOR=1 "$bin" serve --workers 1 -c "$work/hub.yaml" 2> hub.log &
  started $!
  mkdir -p site
  printf '<h1>base</h1>\n' > site/index.html
  extra=${debounce:+, debounce: $debounce}
  for i in 1 2 3; do
    mkdir -p "a$i"
    cp -r site "a$i/edit"
    cat > "a$i.yaml" <<EOF
name: a$i
hub: "$hub"
token_file: agent.token
store: a$i/store
serve: "127.0.0.1:$((8180 + i))"
watch: { dir: a$i/edit, mode: immediate$extra }
$(agent_tls "$i")
EOF
  done
  until_ok 10 curl -s -o /dev/null "${hub_auth[@]}" "$hub/sync/v1/time" || { echo "forward.sh: the hub did not start; its log:" >&2; cat hub.log >&2; exit 1; }
  for i in 1 2 3; do
    NO_COLOR=1 "$bin" agent -c "$work/a$i.yaml" 2> "a$i.log" &
    started $!
  done
  known() { # the number of agents in the hub's registry
    curl -s --max-time 2 "${hub_auth[@]}" "$hub/sync/v1/agents" |
      python3 -c 'import json, sys; print(len(json.load(sys.stdin)["agents"]))' 2>/dev/null || echo 0
  }
  end=$((SECONDS + 15))
  until [ "$(known)" -ge 3 ]; do
    for i in 1 2 3; do
      if ! kill -0 "${pids[$i]}" 2>/dev/null; then
        echo "forward.sh: agent a$i exited; its log:" >&2; tail -20 "a$i.log" >&2
        echo "forward.sh: (if it rejected \`debounce\`, this build predates the key: DEBOUNCE= leaves it out)" >&2
        exit 1
      fi
    done
    [ "$SECONDS" -lt "$end" ] || { echo "forward.sh: the hub knows $(known) of 3 agents after 15 s; hub.log:" >&2; tail -20 hub.log >&2; exit 1; }
    sleep 0.1
  done
  if [ "$base" = 1 ]; then
    "$bin" publish --hub "$hub" "${pub_args[@]}" --at +2s site > publish.log
    for i in 1 2 3; do
      until_ok 20 serves "http://127.0.0.1:$((8180 + i))/index.html" site/index.html ||
        { echo "forward.sh: agent a$i does not serve the base release; its log:" >&2; tail -20 "a$i.log" >&2; exit 1; }
    done
  fi
  cp seed.html a1/edit/page.html
  for i in 2 3; do
    if ! until_ok "$seed_timeout" serves "http://127.0.0.1:$((8180 + i))/page.html" seed.html; then
      echo "forward.sh: agents 2 and 3 never served the seed file (a1/edit/page.html) within ${seed_timeout}s: is watch mode implemented in this build?" >&2
      for j in 2 3; do
        echo "  a$j: GET /page.html -> $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$((8180 + j))/page.html")" >&2
      done
      for j in 1 2 3; do echo "--- a$j.log (last lines)" >&2; tail -8 "a$j.log" >&2; done
      exit 1
    fi
  done
  echo "lockstep: a1/edit -> agents a2, a3 (:8182, :8183) (seed file served)"
fi

common=(--pause-ms "$pause_ms" --poll-us "$poll_us" --timeout-ms "$timeout_ms" --size "$size")
[ -z "${SAME_SIZE:-}" ] || common+=(--same-size)
run_lsyncd() { # ROUND COUNT
  [ -z "$skip_lsyncd" ] || return 0
  "$watch" "${common[@]}" --count "$2" --label "lsyncd   round $1" --raw "raw-lsyncd-$1.txt" \
    --edit "$lsrc/src/page.html" --target "$lsrc/dst-1/page.html" --target "$lsrc/dst-2/page.html"
}
run_lockstep() { # ROUND COUNT
  [ -z "$skip_lockstep" ] || return 0
  "$watch" "${common[@]}" --count "$2" --label "lockstep round $1" --raw "raw-lockstep-$1.txt" \
    --edit a1/edit/page.html --target http://127.0.0.1:8182/page.html --target http://127.0.0.1:8183/page.html
}
for r in $(seq 1 "$rounds"); do
  n=$((edits * r / rounds - edits * (r - 1) / rounds))
  if [ $((r % 2)) -eq 1 ]; then run_lsyncd "$r" "$n"; run_lockstep "$r" "$n"; else run_lockstep "$r" "$n"; run_lsyncd "$r" "$n"; fi
done

echo "== all rounds (ms; nearest-rank percentiles; a failure counts as a timeout) =="
lines=()
[ -n "$skip_lockstep" ] || lines+=("$("$watch" --summary --label lockstep raw-lockstep-*.txt)")
[ -n "$skip_lsyncd" ] || lines+=("$("$watch" --summary --label "lsyncd  " raw-lsyncd-*.txt)")
printf '%s\n' "${lines[@]}"
if [ "${#lines[@]}" -eq 2 ]; then
  printf '%s\n' "${lines[@]}" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^p99=/) p[NR] = substr($i, 5) }
    END { if (p[1] ~ /^[0-9.]+$/ && p[2] ~ /^[0-9.]+$/ && p[2] + 0 > 0) printf "lockstep p99 / lsyncd p99 = %.2f\n", p[1] / p[2];
          else printf "lockstep p99 / lsyncd p99 = n/a (p99 %s vs %s)\n", p[1], p[2] }'
fi
