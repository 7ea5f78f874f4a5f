#!/usr/bin/env bash
# Builds the Debian package: target/debian/lockstep_<version>-1_<arch>.deb
#
#   deploy/build-deb.sh            # release build, completions, man pages, then cargo deb
#
# Needs cargo-deb (`cargo install cargo-deb --locked --version 3.8.0`; .ci/run installs it).
# What goes where is [package.metadata.deb] in Cargo.toml; the units and the sysusers file come
# from systemd/, the maintainer scripts from deploy/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."
# The package's asset paths name ./target: build there whatever the caller's environment says.
unset CARGO_TARGET_DIR

cargo build --release --locked
bin=target/release/lockstep
assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/man"
"$bin" completions bash >"$assets/completions/lockstep.bash"
"$bin" completions zsh >"$assets/completions/_lockstep"
"$bin" completions fish >"$assets/completions/lockstep.fish"
"$bin" manpages --dir "$assets/man"
gzip -9n "$assets"/man/*.1

cargo deb --no-build --locked "$@"
