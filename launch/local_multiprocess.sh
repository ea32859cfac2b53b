#!/usr/bin/env bash
# Runs N JAX processes on this machine (CPU devices), connected through jax.distributed on 127.0.0.1 —
# the multi-host code path without a cluster.
# Usage: launch/local_multiprocess.sh N DEVICES_PER_PROCESS -- python -m recogdrive_jax.main --config=... --workdir=...
set -euo pipefail
n=${1:?number of processes}; per=${2:?devices per process}; shift 2
[ "${1:-}" = "--" ] && shift
port=${JAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    "$@" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
