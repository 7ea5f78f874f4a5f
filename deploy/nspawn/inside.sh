#!/bin/bash
# The steps of deploy/test-systemd.sh, run by a unit inside the booted container (as root, as
# an operator would): install the .deb, start both units, check routing with dig and curl,
# publish a release, reload good and broken configs, kill -9 the service, restart it and upgrade
# the package under load (nothing may fail). Exit 0 = all passed.
set -euo pipefail
exec 2>&1

step() { echo; echo "== $*"; }
fail() { echo "FAILED: $*"; exit 1; }
# contains PATTERN: whether stdin holds PATTERN (case-insensitive). Reads all of stdin first:
# `cmd | grep -q` stops reading at the first match, and under pipefail the writer's SIGPIPE
# then fails the step at random (seen with curl writing a 14 KiB page in two writes).
contains() { local all; all=$(cat); grep -qi -- "$1" <<<"$all"; }
# wait_for SECONDS CMD...: runs CMD every 0.2 s until it succeeds.
wait_for() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out waiting for: $*"
    sleep 0.2
  done
}
body_is() { [ "$(curl -s --max-time 2 "$1")" = "$2" ]; }
# cursor UNIT: where UNIT's journal ends now; since CURSOR UNIT: what it logged after that.
cursor() { journalctl -u "$1" -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
since() { journalctl -u "$2" --no-pager -o cat --after-cursor="$1"; }
conf=/etc/lockstep/lockstep.yaml

step "boot finished: $(systemctl is-system-running --wait || true)"

step "dpkg -i lockstep.deb"
dpkg -i /root/lockstep.deb
getent passwd lockstep
for t in agent publish; do
  perms="$(stat -c '%a %U %G' /etc/lockstep/$t.token)"
  [ "$perms" = "640 root lockstep" ] || fail "$t.token is '$perms', not '640 root lockstep'"
done
test -s /usr/share/man/man1/lockstep.1.gz
test -s /usr/share/bash-completion/completions/lockstep
dpkg-query -W -f='${Conffiles}\n' lockstep | contains /etc/lockstep/lockstep.yaml \
  || fail "/etc/lockstep/lockstep.yaml is not a conffile"
[ "$(systemctl is-enabled lockstep.service)" = disabled ] || fail "installing enabled the unit"
lockstep check -c "$conf"

step "systemctl enable --now lockstep lockstep-agent"
systemctl enable --now lockstep.service lockstep-agent.service
systemctl is-active lockstep.service lockstep-agent.service
systemctl show -p StatusText lockstep.service lockstep-agent.service
ps -o user=,comm= -C lockstep | grep -v '^lockstep ' && fail "a lockstep process runs as another user"
# The control plane's thread runs at nice +10 (the unit's system-call filter lets it lower itself).
main_pid=$(systemctl show -p MainPID --value lockstep.service)
ps -L -o comm=,nice= -p "$main_pid"
ps -L -o comm=,nice= -p "$main_pid" | awk '$1 == "lockstep-contro" && $2 == 10 {ok=1} END {exit !ok}' \
  || fail "the control thread does not run at nice 10 under the unit"

step "dig answers for www.farm.test, authoritatively"
dig @127.0.0.1 www.farm.test +norec
dig @127.0.0.1 www.farm.test +norec | contains 'flags: qr aa' || fail "the answer is not authoritative"
[ "$(dig @127.0.0.1 www.farm.test +short)" = 127.0.0.1 ] || fail "dig did not answer 127.0.0.1"
[ "$(dig @127.0.0.1 nope.farm.test +short +norec | wc -l)" = 0 ] || fail "unknown name answered"
dig @127.0.0.1 nope.farm.test | contains 'status: NXDOMAIN' || fail "no NXDOMAIN"

step "before any release: no healthy backend, 503"
code="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/)"
[ "$code" = 503 ] || fail "expected 503 before the first release, got $code"

step "lockstep publish; the release is served through the proxy"
mkdir -p /root/site
echo "release one" >/root/site/index.html
lockstep publish --hub http://127.0.0.1:7700 --token-file /etc/lockstep/publish.token --at +2s /root/site
wait_for 30 body_is http://127.0.0.1/ "release one"
curl -si http://127.0.0.1/ | grep -i '^x-lockstep-release:' || fail "no X-Lockstep-Release header"
lockstep status --hub http://127.0.0.1:7700 --token-file /etc/lockstep/publish.token --admin http://127.0.0.1:9900
curl -sf http://127.0.0.1:9900/api/pools | contains '"web-1"' || fail "/api/pools lacks web-1"
curl -sf http://127.0.0.1:9900/status | contains '<html' || fail "/status is not a page"

step "systemctl reload with a good change: a new DNS name appears"
cp "$conf" /root/lockstep.yaml.good
sed -i 's/^        - { name: www, pool: www }.*/&\n        - { name: lb, addresses: ["192.0.2.10"] }/' "$conf"
systemctl reload lockstep.service
[ "$(dig @127.0.0.1 lb.farm.test +short)" = 192.0.2.10 ] || fail "the reloaded zone lacks lb.farm.test"

step "systemctl reload with a broken config fails loudly; the old config keeps serving"
sed -i 's/balance: round_robin/balance: round_robbin/' "$conf"
c="$(cursor lockstep.service)"
if systemctl reload lockstep.service; then fail "reload of a broken config succeeded"; fi
since "$c" lockstep.service | tee /root/reload.journal
grep -Eq '^/etc/lockstep/lockstep.yaml:20:[0-9]+: unknown value .round_robbin.' /root/reload.journal \
  || fail "the journal does not name the file, line and column"
if grep -q $'\x1b\[' /root/reload.journal; then fail "colour escape codes in the journal"; fi
systemctl is-active lockstep.service
body_is http://127.0.0.1/ "release one" || fail "the old config stopped serving"
[ "$(dig @127.0.0.1 lb.farm.test +short)" = 192.0.2.10 ] || fail "DNS lost the running zone"

step "a start with a broken config fails in ExecStartPre, with line and column"
c="$(cursor lockstep.service)"
if systemctl restart lockstep.service; then fail "restart with a broken config succeeded"; fi
since "$c" lockstep.service | tee /root/start.journal
grep -Eq '^/etc/lockstep/lockstep.yaml:20:[0-9]+: unknown value' /root/start.journal \
  || fail "ExecStartPre's error lacks line and column"
pre="$(systemctl show -p ExecStartPre --value lockstep.service)"
echo "$pre"
grep -q 'status=2 ' <<<"$pre" || fail "the failure was not ExecStartPre's (exit 2, bad config)"
cp /root/lockstep.yaml.good "$conf"
systemctl reset-failed lockstep.service
systemctl start lockstep.service
wait_for 30 body_is http://127.0.0.1/ "release one"

step "kill -9 of the service: systemd restarts it"
pid="$(systemctl show -p MainPID --value lockstep.service)"
restarts="$(systemctl show -p NRestarts --value lockstep.service)"
kill -9 "$pid"
wait_for 30 bash -c "[ \"\$(systemctl show -p MainPID --value lockstep.service)\" != $pid ] && systemctl is-active -q lockstep.service"
systemctl show -p NRestarts lockstep.service
[ "$(systemctl show -p NRestarts --value lockstep.service)" -gt "$restarts" ] || fail "NRestarts did not move"
wait_for 30 body_is http://127.0.0.1/ "release one"
[ "$(dig @127.0.0.1 www.farm.test +short)" = 127.0.0.1 ] || fail "DNS did not come back"

# load SECONDS OUT: clients in a loop through the proxy, three keep-alive requests per
# connection, one line per request: status code (000 = refused or failed), time, and curl's exit
# code and error (why a request failed).
load() {
  local end=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    curl -s -w '%{http_code} %{time_total} %{exitcode} %{errormsg}\n' --max-time 30 -o /dev/null http://127.0.0.1/ \
      -o /dev/null http://127.0.0.1/ -o /dev/null http://127.0.0.1/ || true
  done >>"$2"
}
# dig_load SECONDS OUT: DNS queries in a loop, one line per query: OK, or FAIL when dig
# failed or did not answer the farm's address.
dig_load() {
  local end=$(( $(date +%s) + $1 )) a
  while [ "$(date +%s)" -lt "$end" ]; do
    a="$(dig @127.0.0.1 www.farm.test +short +tries=1 +timeout=20 2>/dev/null)" || a=FAIL
    if [ "$a" = 127.0.0.1 ]; then echo OK; else echo FAIL; fi
  done >>"$2"
}
# under_load WHAT CMD...: runs CMD (a restart) two seconds into 10 s of load from four clients
# and a DNS client; fails unless the main PID changed and every request and query succeeded.
under_load() {
  local what="$1"; shift
  local out="/root/load.$what" dns="/root/dns.$what"
  rm -f "$out" "$dns"
  local pid; pid="$(systemctl show -p MainPID --value lockstep.service)"
  for _ in 1 2 3 4; do load 10 "$out" & done
  dig_load 10 "$dns" &
  sleep 2
  "$@"
  wait
  local new; new="$(systemctl show -p MainPID --value lockstep.service)"
  [ "$new" != "$pid" ] || fail "$what: the main PID did not change ($pid)"
  local total ok slowest
  total="$(wc -l <"$out")"; ok="$(grep -c '^200 ' "$out" || true)"
  slowest="$(sort -k2 -n "$out" | tail -n1 | cut -d' ' -f2)"
  echo "$what: $ok of $total requests answered 200 (slowest ${slowest}s), pid $pid -> $new"
  echo "$what: $(grep -c . "$dns") DNS queries, $(grep -c FAIL "$dns" || true) failed"
  [ "$total" -gt 100 ] || fail "$what: too few requests ($total)"
  [ "$(grep -c OK "$dns" || true)" -gt 10 ] || fail "$what: too few DNS answers"
  [ "$ok" = "$total" ] || { grep -v '^200 ' "$out" | sort | uniq -c; fail "$what: requests failed"; }
  ! grep -q FAIL "$dns" || fail "$what: DNS queries failed"
}

step "systemctl restart under load: no request fails, no connection is refused"
c="$(cursor lockstep.service)"
under_load restart systemctl restart lockstep.service
since "$c" lockstep.service | contains 'listening sockets handed back by systemd' \
  || fail "the new process bound its own sockets instead of systemd's"

step "a package upgrade under load (dpkg -i: postinst restarts the running unit): nothing fails"
c="$(cursor lockstep.service)"
under_load upgrade dpkg -i /root/lockstep.deb
systemctl is-active lockstep.service
since "$c" lockstep.service | contains 'listening sockets handed back by systemd' \
  || fail "after the upgrade the new process bound its own sockets"

step "a world-readable token is refused with a clear error, by the agent's ExecStartPre"
chmod 0644 /etc/lockstep/agent.token
c="$(cursor lockstep-agent.service)"
if systemctl restart lockstep-agent.service; then fail "the agent started with a world-readable token"; fi
since "$c" lockstep-agent.service | grep 'agent.token is readable by every user: `chmod 600' \
  || fail "no clear error about the token"
pre="$(systemctl show -p ExecStartPre --value lockstep-agent.service)"
echo "$pre"
grep -q 'status=2 ' <<<"$pre" || fail "the agent's failure was not its ExecStartPre's (exit 2)"
chmod 0640 /etc/lockstep/agent.token
systemctl reset-failed lockstep-agent.service
systemctl start lockstep-agent.service
wait_for 30 body_is http://127.0.0.1/ "release one"

step "--pin-workers under the unit: each worker thread bound to one CPU"
mkdir -p /etc/systemd/system/lockstep.service.d
cat >/etc/systemd/system/lockstep.service.d/pin.conf <<'UNIT'
[Service]
ExecStart=
ExecStart=/usr/bin/lockstep serve -c /etc/lockstep/lockstep.yaml --workers 2 --pin-workers
UNIT
systemctl daemon-reload
c="$(cursor lockstep.service)"
systemctl restart lockstep.service
main_pid=$(systemctl show -p MainPID --value lockstep.service)
for t in /proc/"$main_pid"/task/*; do
  echo "$(cat "$t/comm") $(awk '/^Cpus_allowed_list/ {print $2}' "$t/status")"
done | tee /tmp/affinity
# Thread names are cut at 15 bytes: lockstep-worker-0 reads lockstep-worker.
awk '$1 == "lockstep-worker" && $2 !~ /[-,]/ {n++} END {exit n != 2}' /tmp/affinity \
  || fail "the two workers are not each bound to one CPU under the unit"
since "$c" lockstep.service | grep -q 'cannot pin' && fail "a worker could not be pinned under the unit"
wait_for 30 body_is http://127.0.0.1/ "release one"
rm /etc/systemd/system/lockstep.service.d/pin.conf
systemctl daemon-reload
systemctl restart lockstep.service
wait_for 30 body_is http://127.0.0.1/ "release one"

step "exposure as systemd sees the installed units"
systemd-analyze security lockstep.service lockstep-agent.service --no-pager | tail -n 3 || true

step "systemctl stop: both stop cleanly"
systemctl stop lockstep.service lockstep-agent.service
for u in lockstep lockstep-agent; do
  r="$(systemctl show -p Result --value $u.service)"
  [ "$r" = success ] || fail "$u stopped with result $r"
done
# Stopped (not restarted): systemd closed the sockets it kept, so connections are refused.
rc=0; curl -s -o /dev/null --max-time 5 http://127.0.0.1/ || rc=$?
[ "$rc" = 7 ] || fail "after systemctl stop, curl gave $rc, not 7 (connection refused)"

echo
echo "ALL STEPS PASSED"
