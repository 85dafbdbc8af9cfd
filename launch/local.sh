#!/usr/bin/env bash
# N processes of one hybridlm command on this machine, joined by jax.distributed on the
# loopback: for testing and debugging multi-host code paths on a CPU.
#
#   launch/local.sh 2 train --config configs/tiny.py --workdir runs/x
#   launch/local.sh 2 eval --workdir runs/x --task niah,ppl
#
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 8/N). Process 0's output
# goes to the terminal; process i's to <workdir or .>/process_<i>.log for train, and to
# <workdir>/<command>_process_<i>.log for the others (eval, analyze, generate), so that they
# do not replace the training run's logs. If any process fails, the others are stopped and
# the script exits with that process's status.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES <hybridlm command> [flags...]" >&2
  exit 2
fi
n=$1; shift
per=${DEVICES_PER_PROCESS:-$(( 8 / n ))}
if [ "$per" -lt 1 ]; then echo "DEVICES_PER_PROCESS must be >= 1" >&2; exit 2; fi
port=${PORT:-$(( 20000 + RANDOM % 20000 ))}
logdir=.
prev=""
for a in "$@"; do
  if [ "$prev" = "--workdir" ]; then logdir=$a; fi
  case "$a" in --workdir=*) logdir=${a#--workdir=} ;; esac
  prev=$a
done
mkdir -p "$logdir"
log_prefix=""
if [ "$1" != train ]; then log_prefix="$1_"; fi
# HYBRIDLM: how to run hybridlm, e.g. "python -m hybridlm.cli" from a checkout
read -r -a hybridlm_cmd <<< "${HYBRIDLM:-hybridlm}"
pids=()
# shellcheck disable=SC2317  # called by the trap
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
# drop a device count from the caller's XLA_FLAGS (the last one given would win)
other_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
for ((i = 0; i < n; i++)); do
  env XLA_FLAGS="--xla_force_host_platform_device_count=$per $other_flags" \
      JAX_PLATFORMS=cpu \
      "${hybridlm_cmd[@]}" "$@" --coordinator "127.0.0.1:$port" --num_processes "$n" \
      --process_id "$i" > >(if [ "$i" = 0 ]; then cat; else cat > "$logdir/${log_prefix}process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
status=0
while [ ${#pids[@]} -gt 0 ]; do
  if wait -n "${pids[@]}"; then :; else status=$?; break; fi
  alive=()
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  pids=("${alive[@]}")
done
if [ "$status" -ne 0 ]; then echo "launch/local.sh: a process exited with status $status; stopping the others" >&2; fi
exit "$status"
