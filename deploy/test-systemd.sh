#!/usr/bin/env bash
# The real-systemd test: boots a Debian tree under systemd-nspawn, installs the .deb and drives
# lockstep and lockstep-agent with systemctl, dig and curl inside it (deploy/nspawn/inside.sh
# lists the steps). Run as root:
#
#   deploy/test-systemd.sh                # builds the .deb (deploy/build-deb.sh) first
#   DEB=target/debian/lockstep_0.1.0-1_amd64.deb deploy/test-systemd.sh
#
# Needs the Debian packages systemd-container and debootstrap (installed when missing) and the
# Debian mirror. The debootstrapped base is cached in $CACHE (default /var/tmp/lockstep-nspawn,
# about 250 MB; delete it to start afresh); each run boots a fresh copy of it. The container has
# its own network namespace (loopback only), so :53, :80 and :7700 inside do not touch the host.
# Time on the 2-core CI machine: about 1 min for debootstrap (first run), well under a minute
# for the boot and the steps, plus the release build and cargo-deb.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cache="${CACHE:-/var/tmp/lockstep-nspawn}"
suite="${SUITE:-bookworm}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
timeout_s="${TIMEOUT:-600}"

[ "$(id -u)" -eq 0 ] || { echo "test-systemd.sh: run as root (systemd-nspawn, debootstrap)" >&2; exit 2; }

missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

deb="${DEB:-}"
if [ -z "$deb" ]; then
  "$repo/deploy/build-deb.sh"
  deb="$(ls -t "$repo"/target/debian/lockstep_*.deb | head -n1)"
fi
[ -f "$deb" ] || { echo "test-systemd.sh: no package at '$deb'" >&2; exit 2; }

# The base tree: minbase plus systemd and the tools the steps use. Built once, then copied.
base="$cache/base-$suite"
if [ ! -e "$base/.complete" ]; then
  rm -rf "$base"
  mkdir -p "$cache"
  echo "== debootstrap $suite into $base"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,bind9-dnsutils,curl,procps,iproute2,passwd \
    "$suite" "$base" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 30 "$cache/debootstrap.log"; exit 1; }
  touch "$base/.complete"
fi

run="$cache/run.$$"
cleanup() { rm -rf "$run"; }
trap cleanup EXIT
echo "== copying the base tree"
cp -a "$base" "$run"
root="$run"
rm -f "$root/.complete"

# The package, the steps, and a unit that runs them once the system is up, then powers off.
install -m 0644 "$deb" "$root/root/lockstep.deb"
install -m 0755 "$here/nspawn/inside.sh" "$root/root/inside.sh"
cat >"$root/etc/systemd/system/lockstep-test.service" <<'UNIT'
[Unit]
Description=lockstep systemd test steps
After=multi-user.target

[Service]
# Not oneshot: the steps wait for the boot to finish, which a oneshot would hold up.
Type=simple
StandardOutput=append:/root/test.log
StandardError=inherit
ExecStart=/bin/bash -c '/root/inside.sh; echo $? > /root/test.rc; systemctl poweroff'

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/lockstep-test.service \
  "$root/etc/systemd/system/multi-user.target.wants/lockstep-test.service"
echo lockstep-test >"$root/etc/hostname"

echo "== booting $suite under systemd-nspawn (log: $cache/boot.log)"
started=$(date +%s)
set +e
timeout --kill-after=10 "$timeout_s" systemd-nspawn --register=no --keep-unit --private-network \
  --quiet -D "$root" -b >"$cache/boot.log" 2>&1 </dev/null
nspawn_rc=$?
set -e
echo "== the container ran $(( $(date +%s) - started )) s (systemd-nspawn exit $nspawn_rc)"

cat "$root/root/test.log" 2>/dev/null || echo "(no test log: the steps never ran)"
rc="$(cat "$root/root/test.rc" 2>/dev/null || echo none)"
if [ "$rc" != 0 ]; then
  echo "== FAILED (steps exit: $rc); the end of the console:"
  tail -n 40 "$cache/boot.log"
  exit 1
fi
echo "== systemd test passed"
