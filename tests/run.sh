#!/usr/bin/env bash
# berth's test command (README "Run the tests"): on a fresh Debian 12 machine, as root, installs
# what the tests need, starts dockerd if none runs, builds everything and runs the whole suite
# with BERTH_REQUIRE_REAL=1, so a missing component fails the run instead of skipping a test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: needs root (network namespaces, nftables, dockerd); run it with sudo" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "tests/run.sh: cargo not found; install Rust with rustup (the toolchain is pinned in rust-toolchain.toml)" >&2
  exit 1
fi

packages=(docker.io nftables cryptsetup-bin iproute2 ca-certificates curl chromium fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "tests/run.sh: starting dockerd (log: /var/log/berth-test-dockerd.log)"
  nohup dockerd >/var/log/berth-test-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "tests/run.sh: dockerd did not start; see /var/log/berth-test-dockerd.log" >&2
    exit 1
  fi
fi

cargo build --workspace --bins --locked
BERTH_REQUIRE_REAL=1 cargo test --workspace --locked -- --test-threads="${BERTH_TEST_THREADS:-4}"
