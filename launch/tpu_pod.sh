#!/usr/bin/env bash
# hybridlm on every worker of a Cloud TPU VM pod slice, through gcloud.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE            # copy this checkout, install with [tpu]
#   launch/tpu_pod.sh run   TPU_NAME ZONE train --config configs/paper.py:variant=rnope_swa,size=8b \
#       --config.mesh.fsdp=-1 --workdir /mnt/shared/runs/x
#
# The coordinator is worker 0's internal IP with an explicit port (PORT, default 12357);
# each worker reads its process id from the metadata server. Set PROJECT to pass --project.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 setup|run TPU_NAME ZONE [hybridlm command and flags]" >&2; exit 2
fi
mode=$1 tpu=$2 zone=$3; shift 3
project=()
if [ -n "${PROJECT:-}" ]; then project=(--project="$PROJECT"); fi
remote_dir=${REMOTE_DIR:-hybridlm}
port=${PORT:-12357}
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all --command "$1"; }
case "$mode" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$zone" "${project[@]}" . "$tpu:~/$remote_dir"
    ssh_all "cd ~/$remote_dir && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
    ;;
  run)
    ips=$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" "${project[@]}" \
          --format='value(networkEndpoints[].ipAddress)' | tr ';' ' ')
    read -r -a workers <<< "$ips"
    n=${#workers[@]}
    coordinator="${workers[0]}:$port"
    echo "hybridlm: $n workers, coordinator $coordinator"
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$remote_dir && . .venv/bin/activate && \
      id=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) && \
      hybridlm $args --coordinator $coordinator --num_processes $n --process_id \$id"
    ;;
  *) echo "unknown mode $mode (setup | run)" >&2; exit 2 ;;
esac
