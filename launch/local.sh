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
# do not replace the training run's logs. If any process fails, the others are killed at once
# (they cannot go on without it) and the script exits with that process's status. Ctrl-C or
# SIGTERM is passed on to every process as SIGTERM: they stop together after one step, with a
# checkpoint of it.
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
# HYBRIDLM: how to run hybridlm, e.g. "python -m hybridlm" from a checkout
read -r -a hybridlm_cmd <<< "${HYBRIDLM:-hybridlm}"
pids=()
stopping=0
# Ctrl-C or SIGTERM: pass SIGTERM to every process (they stop together at one step, with a
# checkpoint of it) and keep waiting for them.
# shellcheck disable=SC2317  # called by the traps
forward() { stopping=1; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
# shellcheck disable=SC2317  # (reaped here, quietly: no "Killed" notice per process)
kill_all() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap forward INT TERM
trap kill_all EXIT
# drop a device count from the caller's XLA_FLAGS (the last one given would win)
other_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
for ((i = 0; i < n; i++)); do
  env XLA_FLAGS="--xla_force_host_platform_device_count=$per $other_flags" \
      JAX_PLATFORMS=cpu \
      "${hybridlm_cmd[@]}" "$@" --coordinator "127.0.0.1:$port" --num_processes "$n" \
      --process_id "$i" > >(if [ "$i" = 0 ]; then cat; else cat > "$logdir/${log_prefix}process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
# A process that fails takes the job with it: the others cannot finish a collective (a step,
# a save) without it, and would only wait for the heartbeat timeout and abort. Kill them at
# once; the last complete checkpoint is what a rerun resumes from.
status=0
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  done_pid=""
  if wait -n -p done_pid "${running[@]}" 2>/dev/null; then rc=0; else rc=$?; fi
  if [ -z "$done_pid" ]; then  # a trapped signal interrupted the wait (forwarded above)
    if [ "$rc" -eq 127 ]; then break; fi  # nothing left to wait for
    continue
  fi
  still=()
  for p in "${running[@]}"; do [ "$p" = "$done_pid" ] || still+=("$p"); done
  running=("${still[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    for ((i = 0; i < n; i++)); do [ "${pids[$i]}" = "$done_pid" ] && who=$i; done
    how="exited with status $rc" hint=""
    if [ "$rc" -gt 128 ]; then
      how="was killed by SIG$(kill -l $((rc - 128))) (status $rc)"
      hint=" Rerun the same command to resume from the last checkpoint."
    fi
    if [ "$stopping" = 0 ] && [ ${#running[@]} -gt 0 ]; then
      echo "launch/local.sh: process $who $how; stopping the others now (they cannot go on without it).$hint" >&2
      kill_all
      break
    else
      echo "launch/local.sh: process $who $how" >&2
    fi
  fi
done
exit "$status"
