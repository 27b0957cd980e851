#!/usr/bin/env bash
# A 3-member etcd cluster on loopback for `berth-bench api --etcd`: members on client ports
# 23791-23793 (peers 23801-23803), data under DIR (default a new temp directory). Prints the
# --etcd argument; stops the members on Ctrl-C or when the shell that started it ends.
set -euo pipefail
dir="${1:-$(mktemp -d /var/tmp/berth-etcd.XXXXXX)}"
mkdir -p "$dir"
cluster="m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803"
pids=()
for i in 1 2 3; do
  etcd --name "m$i" --data-dir "$dir/m$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token berth-bench \
    >"$dir/m$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
echo "--etcd http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793   (data and logs: $dir)"
wait
