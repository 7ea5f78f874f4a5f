#!/usr/bin/env bash
# Installs lockstep on a host without dpkg (the .deb is the way on Debian and Ubuntu):
#
#   deploy/install.sh                       # into /usr/local, units into /etc/systemd/system
#   deploy/install.sh --prefix /opt/lockstep
#   deploy/install.sh --destdir /tmp/stage  # stage a tree (packaging, tests); touches no user
#   deploy/install.sh --uninstall           # removes what it installed; keeps /etc/lockstep
#                                           # and /var/lib/lockstep
#
# The binary is --bin PATH, else target/release/lockstep (built with cargo when missing).
# Configs already in /etc/lockstep are never overwritten; the token files are created once
# (deploy/setup-host). The units are installed, not enabled: edit /etc/lockstep/*.yaml, then
# `systemctl enable --now lockstep lockstep-agent`.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"

prefix=/usr/local
destdir=""
bin=""
uninstall=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --destdir) destdir="${2:?--destdir needs a directory}"; shift 2 ;;
    --bin) bin="${2:?--bin needs a file}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be absolute, not '$prefix'" >&2; exit 2 ;; esac

P="$destdir$prefix"
files=(
  "$P/bin/lockstep"
  "$P/lib/lockstep/setup-host"
  "$destdir/etc/systemd/system/lockstep.service"
  "$destdir/etc/systemd/system/lockstep-agent.service"
  "$destdir/etc/sysusers.d/lockstep.conf"
  "$P/share/doc/lockstep/README.md"
  "$P/share/doc/lockstep/examples/lockstep.yaml"
  "$P/share/doc/lockstep/examples/agent.yaml"
  "$P/share/bash-completion/completions/lockstep"
  "$P/share/zsh/site-functions/_lockstep"
  "$P/share/fish/vendor_completions.d/lockstep.fish"
)

systemd_running() { [ -z "$destdir" ] && [ -d /run/systemd/system ]; }

if [ "$uninstall" = 1 ]; then
  if systemd_running; then
    systemctl disable --now lockstep.service lockstep-agent.service 2>/dev/null || true
  fi
  rm -f "${files[@]}" "$P"/share/man/man1/lockstep*.1
  rmdir "$P/lib/lockstep" "$P/share/doc/lockstep/examples" "$P/share/doc/lockstep" 2>/dev/null || true
  systemd_running && systemctl daemon-reload
  echo "lockstep removed from $P; /etc/lockstep and /var/lib/lockstep kept"
  exit 0
fi

if [ -z "$bin" ]; then
  bin="$src/target/release/lockstep"
  if [ ! -x "$bin" ]; then
    (cd "$src" && CARGO_TARGET_DIR="$src/target" cargo build --release --locked)
  fi
fi
[ -x "$bin" ] || { echo "install.sh: no executable at $bin" >&2; exit 1; }

install -d -m 0755 "$P/bin" "$P/lib/lockstep" "$destdir/etc/systemd/system" "$destdir/etc/sysusers.d" \
  "$P/share/doc/lockstep/examples" "$P/share/man/man1" "$P/share/bash-completion/completions" \
  "$P/share/zsh/site-functions" "$P/share/fish/vendor_completions.d"
install -m 0755 "$bin" "$P/bin/lockstep"
install -m 0755 "$src/deploy/setup-host" "$P/lib/lockstep/setup-host"
for unit in lockstep.service lockstep-agent.service; do
  # The units name /usr/bin/lockstep (the .deb's path).
  sed "s#/usr/bin/lockstep#$prefix/bin/lockstep#g" "$src/systemd/$unit" >"$destdir/etc/systemd/system/$unit"
  chmod 0644 "$destdir/etc/systemd/system/$unit"
done
install -m 0644 "$src/systemd/lockstep.sysusers" "$destdir/etc/sysusers.d/lockstep.conf"
install -m 0644 "$src/README.md" "$P/share/doc/lockstep/README.md"
install -m 0644 "$src/deploy/examples/lockstep.yaml" "$src/deploy/examples/agent.yaml" "$P/share/doc/lockstep/examples/"
"$bin" completions bash >"$P/share/bash-completion/completions/lockstep"
"$bin" completions zsh >"$P/share/zsh/site-functions/_lockstep"
"$bin" completions fish >"$P/share/fish/vendor_completions.d/lockstep.fish"
"$bin" manpages --dir "$P/share/man/man1"
chmod 0644 "$P"/share/bash-completion/completions/lockstep "$P"/share/zsh/site-functions/_lockstep \
  "$P"/share/fish/vendor_completions.d/lockstep.fish "$P"/share/man/man1/lockstep*.1

install -d -m 0755 "$destdir/etc/lockstep"
for conf in lockstep.yaml agent.yaml; do
  if [ -e "$destdir/etc/lockstep/$conf" ]; then
    echo "kept $destdir/etc/lockstep/$conf (the new default is $P/share/doc/lockstep/examples and $src/deploy/etc/$conf)"
  else
    install -m 0644 "$src/deploy/etc/$conf" "$destdir/etc/lockstep/$conf"
  fi
done
ROOT="$destdir" "$src/deploy/setup-host"

if systemd_running; then
  systemctl daemon-reload
fi
echo "lockstep installed in $P. Next: edit $destdir/etc/lockstep/lockstep.yaml and agent.yaml, then"
echo "  lockstep check -c /etc/lockstep/lockstep.yaml && systemctl enable --now lockstep lockstep-agent"
