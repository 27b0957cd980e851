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

# A build from scratch takes about 5 GB under target/ (measured on a clean checkout with
# CARGO_INCREMENTAL=0, as .ci/run builds), and the tests some hundred MB more. Out of disk, the
# linker dies with a bus error a quarter of an hour in: say so before anything starts.
needed_mib=$((6 * 1024 - $(du -sm target 2>/dev/null | cut -f1 || echo 0)))
free_mib=$(df -Pm . | awk 'NR == 2 { print $4 }')
if [ "$needed_mib" -gt "$free_mib" ]; then
  echo "tests/run.sh: ${free_mib} MiB free on $(df -P . | awk 'NR == 2 { print $6 }'), the build and the tests need about ${needed_mib} MiB more; free some disk (\`cargo clean\` removes target/)" >&2
  exit 1
fi

packages=(docker.io nftables cryptsetup-bin iproute2 ca-certificates curl openssl chromium
  fonts-dejavu-core lintian debootstrap systemd qemu-system-x86 qemu-utils busybox-static
  linux-image-amd64 cpio kmod openssh-client openssh-server restic
  etcd-server protobuf-compiler libprotobuf-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  # Installed packages start no service (the tests start sshd, and dockerd below, themselves).
  no_start=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    no_start=yes
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$no_start" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# systemd mounts / shared at boot, so the network namespace files Docker binds under
# /run/docker/netns reach services that have a mount namespace of their own (the agent's unit
# does); a machine booted without systemd leaves / private. The multi-host tests run agents
# under `ip netns exec` (its own mount namespace) and their health checks enter those files.
if ! awk '$5 == "/" { for (i = 7; $i != "-"; i++) if ($i ~ /^shared:/) found = 1 } END { exit !found }' /proc/self/mountinfo; then
  echo "tests/run.sh: mounting / shared, as systemd does"
  mount --make-rshared /
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

# The packaging tools, pinned (the package tests check what they build).
for tool in cargo-deb@3.8.0 cargo-generate-rpm@0.21.1; do
  name="${tool%@*}"
  version="${tool#*@}"
  if ! "$name" --version 2>/dev/null | grep -q "$version"; then
    echo "tests/run.sh: installing $tool"
    cargo install --locked --quiet "$tool"
  fi
done

# A Debian 12 root the package tests install the .deb files into and the systemd hosts in qemu
# boot from: made once with debootstrap (a few minutes), then copied by each run; made again
# when the package list below changes.
debian_root="${BERTH_DEBIAN_ROOT:-/var/cache/berth-test/bookworm}"
root_packages=adduser,ca-certificates,nftables,iproute2,docker.io,init-system-helpers,systemd,e2fsprogs,mount,systemd-sysv,udev,cryptsetup-bin,openssh-server,kmod,apparmor
if [ ! -x "$debian_root/usr/bin/dpkg" ] || [ "$(cat "$debian_root.packages" 2>/dev/null)" != "$root_packages" ]; then
  echo "tests/run.sh: making a Debian 12 root in $debian_root (log: /var/log/berth-test-debootstrap.log)"
  rm -rf "$debian_root.partial"
  mkdir -p "$(dirname "$debian_root")"
  debootstrap --variant=minbase --include="$root_packages" \
    bookworm "$debian_root.partial" http://deb.debian.org/debian >/var/log/berth-test-debootstrap.log 2>&1
  rm -rf "$debian_root"
  mv "$debian_root.partial" "$debian_root"
  echo "$root_packages" >"$debian_root.packages"
fi
export BERTH_DEBIAN_ROOT="$debian_root"

cargo build --workspace --bins --locked

# The packages: .deb for both daemons (the agent built for size with the `agent` profile, the
# coordinator for speed with `release`), the agent again as the "previous" version for the
# upgrade test, and .rpm.
rm -rf target/packages
mkdir -p target/packages/previous
cargo deb --locked -p berth-node-agent --profile agent --output target/packages/
cargo deb --locked -p berth-coordinator --output target/packages/
cargo deb --locked -p berth-node-agent --profile agent --no-build --deb-version 0.0.9-1 --output target/packages/previous/
cargo generate-rpm -p node-agent --profile agent -o target/packages/
cargo generate-rpm -p coordinator -o target/packages/
BERTH_REQUIRE_REAL=1 cargo test --workspace --locked -- --test-threads="${BERTH_TEST_THREADS:-4}"
