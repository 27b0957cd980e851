#!/usr/bin/env bash
# berth's main job on embedded defaults (README "Try it"): on a fresh Debian 12 machine, as
# root, runs a coordinator (embedded sled store, a freshly made fleet CA) and a berth-agent on
# this same machine, enrolled over mutual TLS, and prints where the API is. Ctrl-C purges the
# sample tenant (container first, then its volume, its rules last) and stops both.
#
# Environment: BERTH_QUICKSTART_DIR (state, default /var/lib/berth-quickstart),
# BERTH_BIN_DIR (use these binaries instead of building).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
state="${BERTH_QUICKSTART_DIR:-/var/lib/berth-quickstart}"

fail() { echo "quickstart: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "needs root (the agent manages containers and firewall rules); run it with sudo"

need=()
command -v nft >/dev/null || need+=(nftables)
command -v docker >/dev/null || need+=(docker.io)
# The coordinator's etcd client is generated at build time by protoc, from protos that import
# Google's well-known types.
if [ -z "${BERTH_BIN_DIR:-}" ]; then
  command -v protoc >/dev/null || need+=(protobuf-compiler)
  [ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "quickstart: installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || fail "could not install ${need[*]} with apt-get"
fi
if ! docker info >/dev/null 2>&1; then
  echo "quickstart: starting dockerd"
  # A session of its own: the Ctrl-C that stops the quickstart must not stop Docker.
  setsid dockerd >/var/log/berth-quickstart-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not start; see /var/log/berth-quickstart-dockerd.log"
fi

if [ -n "${BERTH_BIN_DIR:-}" ]; then
  bin="$BERTH_BIN_DIR"
else
  command -v cargo >/dev/null || fail "cargo not found; install Rust with rustup"
  echo "quickstart: building the release binaries (cargo build --release: about 15 minutes on 2 cores the first time, seconds after)"
  (cd "$root" && cargo build --release --locked --bins -q)
  bin="$root/target/release"
fi
for b in berth-coordinator berth-agent berthctl berth-test-tenant; do [ -x "$bin/$b" ] || fail "$bin/$b missing"; done

mkdir -p "$state" && chmod 700 "$state"
cat >"$state/coordinator.toml" <<TOML
state_dir = "$state/coordinator"
agent_listen = "127.0.0.1:7443"
operator_listen = "127.0.0.1:7444"
http_listen = "127.0.0.1:7480"
TOML
cat >"$state/agent.toml" <<TOML
state_dir = "$state/agent"
volume_root = "$state/volumes"
provider = "other"
region = "local"
instance_type = "$(hostname -s | tr 'A-Z_' 'a-z-' | cut -c1-63)"
memory_reserved = "1GiB"
[egress]
# A table of its own: stopping the quickstart removes it, never a real agent's.
table = "berth_quickstart"
TOML
coord=("$bin/berth-coordinator" --config "$state/coordinator.toml")
[ -f "$state/coordinator/ca/ca.crt" ] || "${coord[@]}" ca init >/dev/null

# The sample tenant's image: the test tenant (a tiny HTTP gateway) in a FROM scratch image
# with the shared libraries it needs. No registry is involved.
image=berth-sample-tenant:latest
ctx="$(mktemp -d)"
cp "$bin/berth-test-tenant" "$ctx/"
for lib in $(ldd "$bin/berth-test-tenant" | grep -o '/[^ ]*') /lib/x86_64-linux-gnu/libgcc_s.so.1; do
  [ -e "$lib" ] || continue
  mkdir -p "$ctx$(dirname "$lib")" && cp -L "$lib" "$ctx$lib"
done
printf 'FROM scratch\nCOPY . /\nUSER 65534:65534\nENTRYPOINT ["/berth-test-tenant"]\n' >"$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null 2>&1 || fail "could not build the sample tenant image"
rm -rf "$ctx"

pids=()
host_id=""
# The quickstart host's containers and networks (every tenant placed on it).
leftovers() {
  [ -n "$host_id" ] || return 0
  docker ps -aq --filter "label=berth.host=$host_id"
  docker network ls -q --filter "label=berth.host=$host_id"
}
cleanup() {
  trap '' INT TERM
  # The tenants go first, while the daemons still run: through berth itself, so the agent
  # removes each container before its rules. The daemons run in sessions of their own, so the
  # Ctrl-C that brought us here did not stop them.
  if [ -n "${BERTH_COORDINATOR:-}" ]; then
    "$bin/berthctl" remove sample --purge >/dev/null 2>&1 || true
    for _ in $(seq 1 150); do
      [ -z "$(leftovers)" ] && break
      sleep 0.1
    done
  fi
  # Whatever berth could not remove (a daemon gone, say) goes directly: container first.
  if [ -n "$(leftovers)" ]; then
    echo "quickstart: removing the quickstart's containers and networks directly" >&2
    docker ps -aq --filter "label=berth.host=$host_id" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network ls -q --filter "label=berth.host=$host_id" | xargs -r docker network rm >/dev/null 2>&1 || true
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # A volume the agent could not release (its container gone) is unmounted; its image stays.
  grep -o " $state/volumes/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount 2>/dev/null || true
  # The rules go last, and only when no container of the quickstart is left to need them.
  if [ -z "$(docker ps -aq --filter "label=berth.host=$host_id" 2>/dev/null)" ]; then
    nft delete table inet berth_quickstart 2>/dev/null || true
  else
    echo "quickstart: a container of the quickstart is still there; its rules (table inet berth_quickstart) stay" >&2
  fi
}
trap cleanup EXIT
trap 'exit 0' INT TERM

rm -f "$state/coordinator/endpoints.json"
# Each daemon in a session of its own (setsid): a Ctrl-C in this terminal reaches this script,
# which removes the tenants while both still run, and not the daemons.
setsid "${coord[@]}" serve >>"$state/coordinator.log" 2>&1 </dev/null &
pids+=($!)
for _ in $(seq 1 100); do [ -f "$state/coordinator/endpoints.json" ] && break; kill -0 "${pids[0]}" 2>/dev/null || break; sleep 0.1; done
[ -f "$state/coordinator/endpoints.json" ] || fail "the coordinator did not start: $(tail -n 3 "$state/coordinator.log" | tr '\n' ' ')"

fingerprint="$("${coord[@]}" ca fingerprint)"
if [ ! -f "$state/agent/enrollment.json" ]; then
  new_host="local-$(hostname -s | tr 'A-Z_' 'a-z-' | tr -cd 'a-z0-9-' | cut -c1-40)"
  token="$("${coord[@]}" token create --host-id "$new_host" --ttl 5m 2>/dev/null)"
  BERTH_ENROLL_TOKEN="$token" "$bin/berth-agent" enroll --coordinator https://127.0.0.1:7444 \
    --ca-fingerprint "$fingerprint" --state-dir "$state/agent" >/dev/null
fi
host_id="$(grep -o '"host_id": "[^"]*"' "$state/agent/enrollment.json" | cut -d'"' -f4)"
setsid "$bin/berth-agent" run --config "$state/agent.toml" >>"$state/agent.log" 2>&1 </dev/null &
pids+=($!)

if [ ! -f "$state/operator.token" ]; then
  (umask 077 && "${coord[@]}" operator-token create --name quickstart 2>/dev/null >"$state/operator.token")
fi
cat >"$state/berthctl.env" <<ENV
export BERTH_COORDINATOR=https://127.0.0.1:7444
export BERTH_CA_CERT=$state/coordinator/ca/ca.crt
export BERTH_TOKEN_FILE=$state/operator.token
ENV
# shellcheck disable=SC1091
. "$state/berthctl.env"
# Outputs are read whole before grep: `grep -q` closing a pipe early would fail the pipeline.
for _ in $(seq 1 100); do
  hosts="$("$bin/berthctl" hosts --json 2>/dev/null || true)"
  grep -q '"state": "ready"' <<<"$hosts" && break
  sleep 0.1
done
grep -q '"state": "ready"' <<<"$hosts" || fail "the agent did not report: $(tail -n 3 "$state/agent.log" | tr '\n' ' ')"

# One sample tenant, 128 MiB cap, a 256 MiB volume. Its volume is unencrypted: encrypted
# volumes need a kernel with dm-crypt, which a machine like this may lack.
cat >"$state/sample.toml" <<TOML
tenant_id = "sample"
image = "$image"
tier = "individual"
[resources]
memory = "128MiB"
[volume]
encrypted = false
size = "256MiB"
TOML
"$bin/berthctl" place "$state/sample.toml" >/dev/null || fail "placing the sample tenant failed"
for _ in $(seq 1 100); do
  tenants="$("$bin/berthctl" tenants --json)"
  grep -q '"state": "running"' <<<"$tenants" && break
  sleep 0.1
done
port="$(grep -o '"published_port": [0-9]*' <<<"$tenants" | grep -o '[0-9]*$')"

cat <<INFO

berth is running on this machine:
  coordinator  operator API (gRPC, TLS): https://127.0.0.1:7444   agent port (mTLS): 127.0.0.1:7443
               dashboard: http://127.0.0.1:7480/   metrics: http://127.0.0.1:7480/metrics
  agent        enrolled as $host_id, reporting every 5 s
  CA fingerprint $fingerprint
  logs         $state/coordinator.log  $state/agent.log

  tenant       sample (128 MiB cap, 256 MiB volume), gateway on http://127.0.0.1:$port/healthz

Try:  . $state/berthctl.env && $bin/berthctl tenants
INFO
"$bin/berthctl" hosts
echo
"$bin/berthctl" tenants

echo
echo "Ctrl-C stops both."
wait
