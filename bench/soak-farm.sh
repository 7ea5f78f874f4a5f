# Sourced by bench/soak.sh and bench/attack-sets.sh: the soak's farm on loopback. One
# `lockstep serve --workers 1` (proxy :8190 in front of the peers' two benchmark backends, sync
# hub :7790, admin API :9994) and one `lockstep agent` serving :8181, with fresh tokens in $dir.
#
# soak_farm_setup (first): builds lockstep and examples/soakattack, sets bin (BIN, or the release
# build), attacker, dir (a fresh temporary directory) and pids, raises the open-file limit, and
# traps EXIT to kill what pids holds (and any background job left), stop the backends and remove dir. Needs root (the
# project's directory) and peer.
#
# soak_farm_start needs: peer, bin, dir, PEER_RUN; on_appliance and on_load (command prefixes such as
# `taskset -c 0`, or empty arrays), backend_cpu (the core for the backends, or empty: not
# pinned), pids (an array the caller's cleanup kills). Optional: SYNC_CAP (2048), ADMIN_CAP and
# AGENT_CAP (the defaults when unset): the listeners' max_connections.
# Sets: serve_pid, agent_pid; defines wait_port.

soak_farm_setup() {
  (cd "$root" && cargo build --release --quiet --bins --example soakattack)
  bin=${BIN:-$root/target/release/lockstep}
  attacker=$root/target/release/examples/soakattack
  ulimit -n "$(ulimit -Hn)"
  dir=$(mktemp -d)
  pids=()
  trap soak_farm_cleanup EXIT
}

soak_farm_cleanup() {
  # What pids holds and any background job still running (attackers, fetchers on an early exit).
  local left; left=("${pids[@]}" $(jobs -p))
  for p in "${left[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${left[@]}"; do wait "$p" 2>/dev/null || true; done
  "$peer" stop backends >/dev/null 2>&1 || true
  rm -rf "$dir"
}

wait_port() { # wait_port PORT: until it accepts, else the serve log and exit
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; cat "$dir/serve.log" >&2; exit 1
}

soak_farm_start() {
  "$peer" stop backends >/dev/null 2>&1 || true   # a leftover instance would share the ports
  "$peer" start backends >/dev/null
  if [ -n "$backend_cpu" ]; then
    local m p
    for m in $(pgrep -f "nginx -c $PEER_RUN/backends.nginx.conf"); do
      for p in "$m" $(pgrep -P "$m"); do taskset -a -p -c "$backend_cpu" "$p" >/dev/null 2>&1 || true; done
    done
  fi

  head -c 32 /dev/urandom | base64 > "$dir/agent.token"
  head -c 32 /dev/urandom | base64 > "$dir/publish.token"
  chmod 600 "$dir"/*.token
  cat > "$dir/lockstep.yaml" <<EOF
listeners:
  - name: http
    bind: "127.0.0.1:8190"
    max_connections: 12000     # within this machine's hard open-file limit (20000) beside the hub's
routes:
  - { path_prefix: "/", pool: farm }
pools:
  - name: farm
    backends:
      - { name: b1, address: "127.0.0.1:9101" }
      - { name: b2, address: "127.0.0.1:9102" }
    health: { path: /healthz, interval: 2s, timeout: 1s }
sync:
  bind: "127.0.0.1:7790"
  store: hub
  cadence: 2s
  lead: 1s
  agent_token_file: agent.token
  publish_token_file: publish.token
  max_connections: ${SYNC_CAP:-2048}
admin:
  bind: "127.0.0.1:9994"
${ADMIN_CAP:+  max_connections: $ADMIN_CAP}
EOF
  cat > "$dir/agent.yaml" <<EOF
name: web-1
hub: "http://127.0.0.1:7790"
token_file: agent.token
store: agent
serve: "127.0.0.1:8181"
${AGENT_CAP:+max_connections: $AGENT_CAP}
EOF
  (cd "$dir" && RUST_LOG=warn exec "${on_appliance[@]}" "$bin" serve -c lockstep.yaml --workers 1 2>serve.log) &
  serve_pid=$!; pids+=("$serve_pid")
  wait_port 8190; wait_port 7790; wait_port 9994
  (cd "$dir" && RUST_LOG=warn exec "${on_load[@]}" "$bin" agent -c agent.yaml 2>agent.log) &
  agent_pid=$!; pids+=("$agent_pid")
  wait_port 8181
}
